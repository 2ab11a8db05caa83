// PresenceCluster live page: plain JavaScript, no build step, no outside
// network. It reads config.json (served next to it) for the regions' APIs,
// takes its token from the URL fragment (#token=...), follows a roster of
// users on the change stream, and sets your own status.
"use strict";

const STATUSES = ["online", "away", "busy", "offline"];
const STORAGE_USERS = "presence.users";
const STORAGE_REGION = "presence.region";
// Backoff before opening a new stream after a drop: 1 s, 2 s, 4 s, ... 10 s.
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 10000;
const MAX_USERS = 1000;

const state = {
  regions: [],
  region: null,
  token: "",
  me: "",
  users: [],
  presences: new Map(),
  source: null,
  lastEventId: "",
  retryMs: RETRY_FIRST_MS,
  retryTimer: null,
  connects: 0,
  stopped: false,
};

const $ = (id) => document.getElementById(id);

// ---- URL fragment and local storage -------------------------------------

function fragment() {
  return new URLSearchParams(window.location.hash.slice(1));
}

// Writes users and region back into the fragment (keeping the token), so
// the URL can be bookmarked. replaceState fires no hashchange.
function saveFollowing() {
  const params = fragment();
  params.set("users", state.users.join(","));
  if (state.region) params.set("region", state.region.name);
  history.replaceState(null, "", "#" + params.toString());
  try {
    localStorage.setItem(STORAGE_USERS, JSON.stringify(state.users));
    if (state.region) localStorage.setItem(STORAGE_REGION, state.region.name);
  } catch (_) {
    // Storage can be off (private mode); the fragment still has them.
  }
}

function storedUsers() {
  const fromFragment = fragment().get("users");
  if (fromFragment !== null) return splitUsers(fromFragment);
  try {
    const stored = JSON.parse(localStorage.getItem(STORAGE_USERS) || "null");
    if (Array.isArray(stored)) return stored.filter((u) => typeof u === "string" && u !== "");
  } catch (_) {
    // Unreadable storage: start from the fragment or yourself.
  }
  return [];
}

function splitUsers(text) {
  return text.split(",").map((u) => u.trim()).filter((u) => u !== "");
}

function storedRegion() {
  const wanted = fragment().get("region");
  if (wanted) return wanted;
  try {
    return localStorage.getItem(STORAGE_REGION);
  } catch (_) {
    return null;
  }
}

// ---- token --------------------------------------------------------------

// The token's claims, read without verification: the page only needs `sub`
// (who "me" is) and `exp`. The API verifies the token on every request.
function decodeToken(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch (_) {
    return null;
  }
}

function tokenProblem(claims) {
  if (!state.token) return "No token. Open the page with #token=<JWT> in the URL (make dev prints such a link).";
  if (!claims || typeof claims.sub !== "string" || claims.sub === "") return "The token in the URL is not a JWT with a sub claim.";
  if (typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) return "The token has expired; mint a new one and put it in the URL.";
  return "";
}

// ---- rendering ----------------------------------------------------------

function relativeTime(iso) {
  if (!iso) return "never seen";
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const seconds = Math.max(0, Math.round((Date.now() - then) / 1000));
  if (seconds < 60) return "just now";
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return `${hours} h ago`;
  return `${Math.floor(hours / 24)} d ago`;
}

function initials(user) {
  const letters = user.replace(/@.*/, "").split(/[^\p{L}\p{N}]+/u).filter(Boolean);
  const text = letters.length > 1 ? letters[0][0] + letters[1][0] : (letters[0] || user).slice(0, 2);
  return text.toUpperCase();
}

function hue(user) {
  let h = 0;
  for (const ch of user) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function row(user) {
  let li = document.querySelector(`#roster li[data-user="${CSS.escape(user)}"]`);
  if (li) return li;
  li = $("user-row").content.firstElementChild.cloneNode(true);
  li.dataset.user = user;
  li.querySelector(".name").textContent = user;
  const avatar = li.querySelector(".avatar");
  avatar.textContent = initials(user);
  avatar.style.setProperty("--hue", hue(user));
  li.querySelector(".remove").addEventListener("click", () => unfollow(user));
  if (user === state.me) {
    li.classList.add("is-me");
    const you = document.createElement("span");
    you.className = "you";
    you.textContent = "you";
    li.querySelector(".name").after(you);
  }
  return li;
}

function renderUser(user) {
  const li = row(user);
  const p = state.presences.get(user);
  const status = p && STATUSES.includes(p.status) ? p.status : "unknown";
  li.dataset.status = status;
  li.querySelector(".status-label").textContent = status;
  const message = li.querySelector(".message");
  message.textContent = p && p.message ? p.message : "";
  message.hidden = !message.textContent;
  const seen = li.querySelector(".last-seen");
  seen.dataset.at = p && p.lastSeen ? p.lastSeen : "";
  seen.dateTime = seen.dataset.at;
  seen.title = seen.dataset.at ? new Date(seen.dataset.at).toLocaleString() : "";
  seen.textContent = p ? relativeTime(p.lastSeen) : "…";
  li.querySelector(".node").textContent = p && p.nodeID ? `via ${p.nodeID}` : "";
  return li;
}

// Rebuilds the list in roster order: you first, then by user ID.
function renderRoster() {
  const list = $("roster");
  const order = [...state.users].sort((a, b) => (a === state.me ? -1 : b === state.me ? 1 : a.localeCompare(b)));
  const rows = order.map(renderUser);
  for (const li of [...list.children]) if (!state.users.includes(li.dataset.user)) li.remove();
  rows.forEach((li, i) => {
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  $("roster-count").textContent = String(state.users.length);
}

function refreshTimes() {
  for (const seen of document.querySelectorAll("#roster .last-seen")) {
    const li = seen.closest("li");
    if (state.presences.has(li.dataset.user)) seen.textContent = relativeTime(seen.dataset.at || null);
  }
}

function setConnection(kind, text) {
  const conn = $("conn");
  conn.dataset.state = kind;
  $("conn-text").textContent = text;
}

function notice(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
}

// Shows a presence unless an older revision would replace a newer one (the
// stream and a POST's answer can arrive in either order).
function applyPresence(p) {
  if (!p || typeof p.userID !== "string") return;
  const old = state.presences.get(p.userID);
  if (old && typeof old.revision === "number" && typeof p.revision === "number" && p.revision < old.revision) return;
  state.presences.set(p.userID, p);
  if (state.users.includes(p.userID)) renderUser(p.userID);
  if (p.userID === state.me && !$("status-form").dataset.touched) {
    $("status-select").value = STATUSES.includes(p.status) ? p.status : "online";
    $("message-input").value = p.message || "";
  }
}

// ---- the change stream ----------------------------------------------------

function streamUrl(resumeFrom) {
  const params = new URLSearchParams();
  params.set("users", state.users.join(","));
  params.set("access_token", state.token);
  if (resumeFrom) params.set("lastEventId", resumeFrom);
  return `${state.region.api}/api/v2/presence/stream?${params.toString()}`;
}

function noteEventId(id) {
  if (!id) return;
  state.lastEventId = id;
  $("conn").dataset.lastEventId = id;
  $("event-id").textContent = `· event ${id}`;
}

function closeStream() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (state.source) {
    state.source.close();
    state.source = null;
  }
}

// Opens a stream of the roster. `resume` continues after the last event
// seen (the server sends what was missed); otherwise a fresh snapshot.
function connect(resume) {
  closeStream();
  if (state.stopped || !state.region || state.users.length === 0) {
    if (state.users.length === 0 && !state.stopped) setConnection("idle", "follow someone");
    return;
  }
  const resumeFrom = resume ? state.lastEventId : "";
  if (!resume) state.lastEventId = "";
  const url = streamUrl(resumeFrom);
  const conn = $("conn");
  state.connects += 1;
  conn.dataset.connects = String(state.connects);
  conn.dataset.resumedFrom = resumeFrom;
  conn.dataset.streamUrl = url.replace(/access_token=[^&]*/, "access_token=REDACTED");
  const source = new EventSource(url);
  state.source = source;
  source.addEventListener("presence", (e) => {
    noteEventId(e.lastEventId);
    try {
      applyPresence(JSON.parse(e.data));
    } catch (_) {
      // A malformed event is skipped; the next one still counts.
    }
  });
  source.addEventListener("snapshot-end", (e) => {
    noteEventId(e.lastEventId);
    state.retryMs = RETRY_FIRST_MS;
    setConnection("live", `live · ${state.region.name}`);
  });
  source.addEventListener("error", (e) => onStreamError(source, e));
}

// Both the server's `event: error` (with JSON data) and a dropped or refused
// connection (no data) arrive here. Either way this stream is over: open a
// new one ourselves, so the URL carries lastEventId (and, in a real app, a
// fresh token), instead of leaving it to EventSource's own retry.
function onStreamError(source, e) {
  if (source !== state.source) return;
  let code = "";
  if (typeof e.data === "string" && e.data) {
    try {
      code = JSON.parse(e.data).error.code || "";
    } catch (_) {
      code = "unknown";
    }
  }
  source.close();
  state.source = null;
  if (code === "token_expired") {
    state.stopped = true;
    setConnection("down", "token expired");
    notice("The stream ended because the token expired. Put a fresh token in the URL (#token=...) to continue.");
    return;
  }
  let resume = true;
  if (code === "stream_reset") {
    // The bucket was recreated: old revisions mean nothing any more.
    resume = false;
    state.presences.clear();
  }
  const delay = state.retryMs;
  state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
  const why = code ? ` (${code})` : "";
  setConnection("reconnecting", `reconnecting in ${Math.round(delay / 1000)} s${why}`);
  state.retryTimer = setTimeout(() => connect(resume), delay);
}

// ---- following users ------------------------------------------------------

function follow(user) {
  const error = $("add-error");
  error.hidden = true;
  if (user.includes(",")) {
    error.textContent = "A user ID with a comma can't be followed on a stream.";
    error.hidden = false;
    return;
  }
  if (state.users.includes(user)) return;
  if (state.users.length >= MAX_USERS) {
    error.textContent = `A stream follows at most ${MAX_USERS} users.`;
    error.hidden = false;
    return;
  }
  state.users.push(user);
  saveFollowing();
  renderRoster();
  // A user added to a resumed stream gets no event until it changes, so
  // a new set of users takes a fresh stream (with a fresh snapshot).
  state.retryMs = RETRY_FIRST_MS;
  connect(false);
}

function unfollow(user) {
  state.users = state.users.filter((u) => u !== user);
  saveFollowing();
  renderRoster();
  state.retryMs = RETRY_FIRST_MS;
  connect(false);
}

// ---- setting your status --------------------------------------------------

async function setStatus(event) {
  event.preventDefault();
  const result = $("status-result");
  const button = $("status-submit");
  result.hidden = true;
  result.className = "result";
  button.disabled = true;
  const body = { status: $("status-select").value, message: $("message-input").value };
  try {
    const response = await fetch(`${state.region.api}/api/v2/presence/${encodeURIComponent(state.me)}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      const error = answer && answer.error ? answer.error : {};
      const retry = response.headers.get("Retry-After");
      showResult("error", `${error.code || `HTTP ${response.status}`}: ${error.message || response.statusText}` +
        (retry ? ` (retry in ${retry} s)` : ""));
      return;
    }
    applyPresence(answer);
    delete $("status-form").dataset.touched;
    showResult("ok", `Saved at ${state.region.name}.`);
  } catch (err) {
    showResult("error", `Cannot reach ${state.region.api}: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

function showResult(kind, text) {
  const result = $("status-result");
  result.className = `result ${kind}`;
  result.dataset.kind = kind;
  result.textContent = text;
  result.hidden = false;
}

// ---- start ----------------------------------------------------------------

function pickRegion(name) {
  state.region = state.regions.find((r) => r.name === name) || state.regions[0] || null;
  $("region").value = state.region ? state.region.name : "";
  $("region").title = state.region ? state.region.api : "";
}

// Reads the fragment (token, users, region) and (re)starts the stream.
function start() {
  closeStream();
  state.stopped = false;
  state.token = fragment().get("token") || "";
  const claims = decodeToken(state.token);
  const problem = tokenProblem(claims);
  state.me = problem ? "" : claims.sub;
  $("me-name").textContent = state.me ? `(${state.me})` : "";
  $("status-form").querySelectorAll("select, input, button").forEach((el) => {
    el.disabled = !state.me;
  });
  notice(problem);
  if (problem) {
    state.stopped = true;
    setConnection("down", "no valid token");
    return;
  }
  state.users = storedUsers();
  if (state.users.length === 0) state.users = [state.me];
  pickRegion(storedRegion());
  saveFollowing();
  $("roster").replaceChildren();
  renderRoster();
  state.retryMs = RETRY_FIRST_MS;
  connect(false);
}

async function main() {
  let config;
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = await response.json();
  } catch (err) {
    setConnection("down", "no config");
    notice(`Cannot read config.json next to this page (${err.message}).`);
    return;
  }
  state.regions = Array.isArray(config.regions) ? config.regions.filter((r) => r && r.name && r.api) : [];
  if (state.regions.length === 0) {
    setConnection("down", "no regions");
    notice("config.json lists no regions.");
    return;
  }
  $("region").replaceChildren(...state.regions.map((r) => {
    const option = new Option(r.name, r.name);
    option.title = r.api;
    return option;
  }));
  $("region").addEventListener("change", (e) => {
    pickRegion(e.target.value);
    saveFollowing();
    state.retryMs = RETRY_FIRST_MS;
    connect(false);
  });
  $("add-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const user = $("add-input").value.trim();
    if (user) follow(user);
    $("add-input").value = "";
  });
  $("status-form").addEventListener("submit", setStatus);
  $("status-form").addEventListener("input", () => {
    $("status-form").dataset.touched = "1";
  });
  window.addEventListener("hashchange", start);
  setInterval(refreshTimes, 5000);
  start();
}

main();
