-- Runs health.lua against sample PresenceCluster statuses:
--   lua5.4 config/argocd/health_test.lua
local dir = arg[0]:match("(.*/)") or "./"
local source = assert(io.open(dir .. "health.lua")):read("a")

local function health(obj)
  local env = setmetatable({ obj = obj }, { __index = _G })
  return assert(load(source, "health.lua", "t", env))()
end

local function cond(type_, status, reason, message)
  return { type = type_, status = status, reason = reason, message = message }
end

local paused = { ["presencecluster.io/paused"] = "true" }
local function paused_message(generation)
  return 'reconciling is paused by the annotation presencecluster.io/paused="true"; '
    .. "remove it to resume (the status describes generation " .. generation .. ")"
end

local cases = {
  { "no status yet", { metadata = { generation = 1 } }, "Progressing" },
  { "ready for the current generation",
    { metadata = { generation = 3 }, status = { observedGeneration = 3, conditions = {
      cond("Degraded", "False", "AsExpected", "no problems found"),
      cond("Ready", "True", "AllRegionsReady", "3 regions ready") } } }, "Healthy" },
  { "ready, but for an older generation",
    { metadata = { generation = 4 }, status = { observedGeneration = 3, conditions = {
      cond("Ready", "True", "AllRegionsReady", "3 regions ready") } } }, "Progressing" },
  { "degraded wins over everything",
    { metadata = { generation = 2 }, status = { observedGeneration = 2, conditions = {
      cond("Degraded", "True", "SecretNotFound", "Secret ns/mine does not exist"),
      cond("Ready", "False", "SecretNotFound", "Secret ns/mine does not exist") } } }, "Degraded" },
  { "not ready yet",
    { metadata = { generation = 1 }, status = { observedGeneration = 1, conditions = {
      cond("Degraded", "False", "AsExpected", ""),
      cond("Ready", "False", "HubNotReady", "waiting for the hub") } } }, "Progressing" },
  { "paused",
    { metadata = { generation = 1, annotations = paused }, status = { observedGeneration = 1, conditions = {
      cond("Degraded", "False", "AsExpected", "no problems found"),
      cond("Progressing", "False", "Paused", paused_message(1)),
      cond("Ready", "Unknown", "Paused", paused_message(1)) } } }, "Suspended" },
  { "paused with a newer generation that was never applied",
    { metadata = { generation = 5, annotations = paused }, status = { observedGeneration = 4, conditions = {
      cond("Degraded", "False", "AsExpected", "no problems found"),
      cond("Progressing", "False", "Paused", paused_message(4)),
      cond("Ready", "Unknown", "Paused", paused_message(4)) } } }, "Suspended" },
  { "paused by an older operator (Ready left as it was)",
    { metadata = { generation = 2, annotations = paused }, status = { observedGeneration = 2, conditions = {
      cond("Progressing", "False", "Paused", "paused"),
      cond("Ready", "True", "AllRegionsReady", "3 regions ready") } } }, "Suspended" },
  { "paused, then resumed and applied",
    { metadata = { generation = 5, annotations = {} }, status = { observedGeneration = 5, conditions = {
      cond("Degraded", "False", "AsExpected", "no problems found"),
      cond("Progressing", "False", "ReconcileComplete", "every object is applied and ready"),
      cond("Ready", "True", "AllRegionsReady", "3 regions ready") } } }, "Healthy" },
  { "annotation removed, operator not there yet",
    { metadata = { generation = 5 }, status = { observedGeneration = 4, conditions = {
      cond("Progressing", "False", "Paused", paused_message(4)),
      cond("Ready", "Unknown", "Paused", paused_message(4)) } } }, "Progressing" },
  { "degraded stays degraded while paused",
    { metadata = { generation = 3, annotations = paused }, status = { observedGeneration = 2, conditions = {
      cond("Degraded", "True", "SecretNotFound", "Secret ns/mine does not exist"),
      cond("Progressing", "False", "Paused", paused_message(2)),
      cond("Ready", "Unknown", "Paused", paused_message(2)) } } }, "Degraded" },
}

local failures = 0
for _, case in ipairs(cases) do
  local name, obj, want = case[1], case[2], case[3]
  local got = health(obj)
  if got.status ~= want then
    failures = failures + 1
    print(string.format("FAIL %s: want %s, got %s (%s)", name, want, got.status, got.message))
  else
    print(string.format("ok   %s: %s (%s)", name, got.status, got.message))
  end
end
local checks = 0
local function expect_message(case, needle)
  checks = checks + 1
  local message = health(cases[case][2]).message
  if not message:find(needle, 1, true) then
    failures = failures + 1
    print("FAIL message of '" .. cases[case][1] .. "' names " .. needle .. ": " .. message)
  end
end
expect_message(4, "SecretNotFound")
expect_message(6, "presencecluster.io/paused")
expect_message(7, "generation 4")
expect_message(10, "Resuming")
print(string.format("%d passed, %d failed", #cases + checks - failures, failures))
os.exit(failures == 0 and 0 or 1)
