//! Everything known about one user (manual status, last sign of life,
//! sessions) and the fold that turns it into the effective presence.
//!
//! Each of the user's keys keeps its own KV revision, and a change only
//! replaces what it is newer than, removals included (as tombstones). That
//! makes [`UserRecord::merge`] order-independent: a watch event and a store
//! read racing each other give the same record whichever lands first.

use crate::keys::Part;
use crate::model::{Presence, Status};
use crate::session::{Seen, Session};
use bytes::Bytes;
use once_cell::race::OnceBox;
use serde::Serialize;
use std::sync::Arc;
use time::OffsetDateTime;

/// How many removed sessions a record remembers (by revision) so that a
/// late copy of them can't come back; older tombstones are dropped.
const MAX_TOMBSTONES: usize = 16;

/// A new value of one of a user's keys, or its removal (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Manual(Option<Presence>),
    Seen(Option<Seen>),
    Session(String, Option<Arc<Session>>),
}

impl Update {
    /// The key this update is for.
    pub fn part(&self) -> Part {
        match self {
            Update::Manual(_) => Part::Manual,
            Update::Seen(_) => Part::Seen,
            Update::Session(id, _) => Part::Session(id.clone()),
        }
    }

    /// The same key, removed.
    pub fn removal(part: Part) -> Update {
        match part {
            Part::Manual => Update::Manual(None),
            Part::Seen => Update::Seen(None),
            Part::Session(id) => Update::Session(id, None),
        }
    }
}

/// One key's latest known state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Component<T> {
    revision: u64,
    /// `None`: removed (deleted, or expired by its TTL).
    value: Option<T>,
}

/// A key never heard of: revision 0, which no KV revision is.
impl<T> Default for Component<T> {
    fn default() -> Self {
        Component {
            revision: 0,
            value: None,
        }
    }
}

fn newer<T>(current: Option<&Component<T>>, revision: u64) -> bool {
    current.is_none_or(|c| revision > c.revision)
}

/// Drops the oldest removed sessions beyond [`MAX_TOMBSTONES`].
fn forget_old_tombstones(sessions: &mut Vec<(String, Component<Arc<Session>>)>) {
    let tombstones = sessions.iter().filter(|(_, c)| c.value.is_none()).count();
    if tombstones <= MAX_TOMBSTONES {
        return;
    }
    let mut revisions: Vec<u64> = sessions
        .iter()
        .filter(|(_, c)| c.value.is_none())
        .map(|(_, c)| c.revision)
        .collect();
    revisions.sort_unstable();
    let cutoff = revisions[tombstones - MAX_TOMBSTONES];
    sessions.retain(|(_, c)| c.value.is_some() || c.revision >= cutoff);
}

/// A user's keys, each at its own revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRecord {
    /// Not an `Option`: revision 0 says "never heard of" (see
    /// [`UserRecord::manual`]). A `Box` rather than an `Arc` (no counts:
    /// a 56-byte allocation instead of 80) and rather than inline (which
    /// would double the record, 48 to 96 bytes with its `Arc` counts, for
    /// users with sessions and no manual status). Tests hold both sizes.
    manual: Component<Box<Presence>>,
    /// Boxed because users of the Go-style API have neither, and the cache
    /// holds one record per user: it keeps such a record small.
    extras: Option<Box<Extras>>,
    /// The view's JSON, made by the first read that needs it, so a cached
    /// read is a reference-count increment instead of a fold and a
    /// serialization. A merged record is a new one, without it.
    rendered: RenderedSlot,
}

impl UserRecord {
    /// The manual status key, once heard of.
    fn manual(&self) -> Option<&Component<Box<Presence>>> {
        (self.manual.revision != 0).then_some(&self.manual)
    }
}

/// The view of a record as JSON, and the time span it holds for: the view
/// changes with the clock only when a manual status or a session expires.
#[derive(Debug)]
struct Rendered {
    json: Bytes,
    from: OffsetDateTime,
    /// The first expiry after `from`, if any.
    until: Option<OffsetDateTime>,
}

impl Rendered {
    fn holds_at(&self, now: OffsetDateTime) -> bool {
        self.from <= now && self.until.is_none_or(|until| now < until)
    }
}

/// A [`Rendered`] view filled at most once; a clone starts empty (a clone
/// is made to merge a change, which makes the view stale), and it never
/// makes two records differ.
#[derive(Debug, Default)]
struct RenderedSlot(OnceBox<Rendered>);

impl Clone for RenderedSlot {
    fn clone(&self) -> Self {
        RenderedSlot::default()
    }
}

impl PartialEq for RenderedSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for RenderedSlot {}

/// The keys a heartbeating user has besides the manual one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Extras {
    seen: Option<Component<Seen>>,
    /// Sorted by session ID.
    sessions: Vec<(String, Component<Arc<Session>>)>,
    /// The latest `lastSeen` of any session value merged into this record,
    /// removed and superseded ones included. A heartbeat writes the durable
    /// `seen` key only once per lease length, so after a session expires
    /// this is what keeps `lastSeen` exact on every node that followed it.
    /// A maximum, so merge order doesn't matter.
    sessions_seen: Option<OffsetDateTime>,
}

/// One live session as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct SessionView {
    pub id: String,
    pub device: String,
    pub status: Status,
    #[serde(rename = "lastSeen", with = "crate::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub last_seen: OffsetDateTime,
    #[serde(rename = "expiresAt", with = "crate::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub expires_at: OffsetDateTime,
}

/// The effective presence: the Go service's fields plus `sessions` and the
/// manual status' `expiresAt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct PresenceView {
    #[serde(rename = "userID")]
    pub user_id: String,
    pub status: Status,
    pub message: String,
    /// `null` only for a user the bucket knows nothing about (streams).
    #[serde(rename = "lastSeen", with = "crate::rfc3339::option")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub last_seen: Option<OffsetDateTime>,
    #[serde(rename = "updatedAt", with = "crate::rfc3339::option")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub updated_at: Option<OffsetDateTime>,
    #[serde(rename = "nodeID")]
    pub node_id: String,
    pub revision: u64,
    #[serde(
        rename = "expiresAt",
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<OffsetDateTime>,
    pub sessions: Vec<SessionView>,
}

impl PresenceView {
    /// The view of a user with no keys at all.
    pub fn unknown(user_id: &str) -> Self {
        PresenceView {
            user_id: user_id.to_owned(),
            status: Status::Offline,
            message: String::new(),
            last_seen: None,
            updated_at: None,
            node_id: String::new(),
            revision: 0,
            expires_at: None,
            sessions: Vec::new(),
        }
    }

    /// Rough heap size of the view (the struct, its strings, its
    /// sessions), for the event log's byte budget.
    pub fn weight(&self) -> usize {
        let sessions: usize = self
            .sessions
            .iter()
            .map(|s| std::mem::size_of::<SessionView>() + s.id.len() + s.device.len())
            .sum();
        std::mem::size_of::<PresenceView>()
            + self.user_id.len()
            + self.message.len()
            + self.node_id.len()
            + sessions
    }

    /// Whether a subscriber would see a difference: everything but the
    /// timestamps that every heartbeat moves.
    pub fn same_state(&self, other: &PresenceView) -> bool {
        self.status == other.status
            && self.message == other.message
            && self.expires_at == other.expires_at
            && self.sessions.len() == other.sessions.len()
            && self
                .sessions
                .iter()
                .zip(&other.sessions)
                .all(|(a, b)| a.id == b.id && a.device == b.device && a.status == b.status)
    }
}

impl UserRecord {
    fn seen(&self) -> Option<&Component<Seen>> {
        self.extras.as_ref().and_then(|e| e.seen.as_ref())
    }

    fn sessions(&self) -> &[(String, Component<Arc<Session>>)] {
        self.extras.as_ref().map_or(&[], |e| e.sessions.as_slice())
    }

    fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// Applies `update`, stored at `revision`, if it is newer
    /// than what the record holds for that key. Returns whether it was.
    pub fn merge(&mut self, update: Update, revision: u64) -> bool {
        match update {
            Update::Manual(value) => {
                // A key never heard of is at revision 0, below every KV
                // revision: one comparison decides for both.
                if revision <= self.manual.revision {
                    return false;
                }
                self.manual = Component {
                    revision,
                    value: value.map(Box::new),
                };
            }
            Update::Seen(value) => {
                if !newer(self.seen(), revision) {
                    return false;
                }
                self.extras_mut().seen = Some(Component { revision, value });
            }
            Update::Session(id, value) => {
                let extras = self.extras_mut();
                let seen = value.as_ref().map(|s| s.last_seen);
                let seen_moved = seen > extras.sessions_seen;
                extras.sessions_seen = extras.sessions_seen.max(seen);
                let component = Component { revision, value };
                let sessions = &mut extras.sessions;
                match sessions.binary_search_by(|(s, _)| s.as_str().cmp(&id)) {
                    Ok(i) => {
                        if sessions[i].1.revision >= revision {
                            return seen_moved;
                        }
                        sessions[i].1 = component;
                    }
                    Err(i) => sessions.insert(i, (id, component)),
                }
                forget_old_tombstones(sessions);
            }
        }
        true
    }

    /// The revision of one of the user's keys as the record knows it,
    /// removal included; 0 when the record knows nothing of that key.
    pub fn key_revision(&self, part: &Part) -> u64 {
        match part {
            Part::Manual => self.manual.revision,
            Part::Seen => self.seen().map_or(0, |c| c.revision),
            Part::Session(id) => self.session_revision(id),
        }
    }

    /// [`UserRecord::key_revision`] of the key `update` is for, without
    /// building its [`Part`] (the watch asks this of every change).
    pub fn revision_for(&self, update: &Update) -> u64 {
        match update {
            Update::Manual(_) => self.key_revision(&Part::Manual),
            Update::Seen(_) => self.key_revision(&Part::Seen),
            Update::Session(id, _) => self.session_revision(id),
        }
    }

    fn session_revision(&self, id: &str) -> u64 {
        self.sessions()
            .iter()
            .find(|(s, _)| s == id)
            .map_or(0, |(_, c)| c.revision)
    }

    /// The highest revision among the user's session keys, removals
    /// included (only the oldest removals are ever forgotten).
    pub fn sessions_revision(&self) -> u64 {
        self.sessions()
            .iter()
            .map(|(_, c)| c.revision)
            .max()
            .unwrap_or(0)
    }

    /// The stored manual status, expired or not, while its key holds one.
    pub fn manual_status(&self) -> Option<&Presence> {
        self.manual.value.as_deref()
    }

    /// The stored durable sign of life, if any.
    pub fn seen_at(&self) -> Option<OffsetDateTime> {
        self.seen()
            .and_then(|c| c.value.as_ref())
            .map(|s| s.last_seen)
    }

    /// The highest revision of any of the user's keys, removals included:
    /// the user changed after revision `r` exactly when this exceeds `r`.
    pub fn revision(&self) -> u64 {
        let manual = self.manual.revision;
        let seen = self.seen().map_or(0, |c| c.revision);
        let sessions = self.sessions().iter().map(|(_, c)| c.revision);
        sessions.fold(manual.max(seen), u64::max)
    }

    /// Sessions whose lease still runs at `now`.
    pub fn live_sessions(&self, now: OffsetDateTime) -> impl Iterator<Item = (&str, &Session)> {
        self.sessions().iter().filter_map(move |(id, c)| {
            c.value
                .as_deref()
                .filter(|s| s.is_live_at(now))
                .map(|s| (id.as_str(), s))
        })
    }

    /// Whether session `id` is live at `now`.
    pub fn has_live_session(&self, id: &str, now: OffsetDateTime) -> bool {
        self.live_sessions(now).any(|(s, _)| s == id)
    }

    /// The manual status that applies at `now`, if any, and the effective
    /// status: that manual status, else the best live session, else offline.
    fn fold(&self, now: OffsetDateTime) -> (Option<&Presence>, Status) {
        let manual = self
            .manual()
            .and_then(|c| c.value.as_deref())
            .filter(|m| m.is_valid_at(now));
        let mut best_session = None;
        for (_, session) in self.live_sessions(now) {
            best_session = Some(session.status);
            if session.status == Status::Online {
                break;
            }
        }
        let status = manual
            .map(|m| m.status)
            .or(best_session)
            .unwrap_or(Status::Offline);
        (manual, status)
    }

    /// Whether the two records' [`UserRecord::stored_view`]s look the same
    /// to a subscriber ([`PresenceView::same_state`]), without building
    /// either view: the watch asks this of every change it applies.
    pub fn same_stored_state(&self, other: &UserRecord) -> bool {
        self.shown_parts() == other.shown_parts()
            && self.shown_sessions().eq(other.shown_sessions())
    }

    /// Status, message and manual expiry of the stored view.
    fn shown_parts(&self) -> (Status, &str, Option<OffsetDateTime>) {
        let (manual, status) = self.fold(OffsetDateTime::UNIX_EPOCH);
        let message = manual.map_or("", |m| &*m.message);
        (status, message, manual.and_then(|m| m.expires_at()))
    }

    /// The sessions of the stored view, as a subscriber tells them apart.
    fn shown_sessions(&self) -> impl Iterator<Item = (&str, &str, Status)> {
        self.live_sessions(OffsetDateTime::UNIX_EPOCH)
            .map(|(id, s)| (id, s.device.as_str(), s.status))
    }

    /// The effective presence at `now`, or `None` when no key of the user
    /// holds a value (never seen, or everything removed):
    ///
    /// 1. a manual status (`POST`) wins while it has not expired;
    /// 2. else the best live session: online over away;
    /// 3. else offline.
    ///
    /// `lastSeen` is the latest sign of life of any kind, expired ones
    /// included: exact on a node that followed the user's heartbeats, and
    /// at most one lease length early on one that started after the last
    /// of them (it knows only the durable `seen` key).
    pub fn view(&self, user_id: &str, now: OffsetDateTime) -> Option<PresenceView> {
        let manual = self.manual.value.as_deref();
        let seen = self.seen().and_then(|c| c.value.as_ref());
        let any_session = self.sessions().iter().any(|(_, c)| c.value.is_some());
        if manual.is_none() && seen.is_none() && !any_session {
            return None;
        }
        let (active_manual, status) = self.fold(now);
        let sessions: Vec<SessionView> = self
            .live_sessions(now)
            .map(|(id, s)| SessionView {
                id: id.to_owned(),
                device: s.device.clone(),
                status: s.status,
                last_seen: s.last_seen,
                expires_at: s.expires_at(),
            })
            .collect();
        let last_seen = [
            manual.map(|m| m.last_seen()),
            seen.map(|s| s.last_seen),
            self.extras.as_ref().and_then(|e| e.sessions_seen),
        ]
        .into_iter()
        .flatten()
        .max();
        // Written by the nodes that took the updates, so every node shows
        // the same value; an expiry itself changes neither time.
        let updated_at = last_seen.max(manual.map(|m| m.updated_at()));
        let node_id = self.latest_node().unwrap_or_default().to_owned();
        Some(PresenceView {
            user_id: user_id.to_owned(),
            status,
            message: active_manual
                .map(|m| m.message.to_string())
                .unwrap_or_default(),
            last_seen,
            updated_at,
            node_id,
            revision: self.revision(),
            expires_at: active_manual.and_then(|m| m.expires_at()),
            sessions,
        })
    }

    /// [`UserRecord::view`] as JSON, made once per record and reused while
    /// the clock changes nothing in it; `Ok(None)` when no key of the user
    /// holds a value.
    pub fn view_json(
        &self,
        user_id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Bytes>, serde_json::Error> {
        if let Some(rendered) = self.rendered.0.get()
            && rendered.holds_at(now)
        {
            return Ok(Some(rendered.json.clone()));
        }
        let Some(view) = self.view(user_id, now) else {
            return Ok(None);
        };
        let json = Bytes::from(serde_json::to_vec(&view)?);
        let rendered = Rendered {
            json: json.clone(),
            from: now,
            until: self.next_expiry(now),
        };
        // Another read may have filled it first; both made the same bytes.
        let _ = self.rendered.0.set(Box::new(rendered));
        Ok(Some(json))
    }

    /// The first moment after `now` at which the view changes by itself:
    /// the manual status or a live session expiring.
    fn next_expiry(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let manual = self
            .manual()
            .and_then(|c| c.value.as_deref())
            .and_then(|m| m.expires_at())
            .filter(|at| *at > now);
        let sessions = self.live_sessions(now).map(|(_, s)| s.expires_at());
        sessions.chain(manual).min()
    }

    /// The presence as the bucket holds it, for change streams: a session
    /// counts until the bucket removes it (its TTL ran out), a manual
    /// status until its expiry marker arrives, and a user with no keys is
    /// offline. Every stream event is then a change of the bucket, the same
    /// on every node, live or replayed from the event log. (`GET` instead
    /// applies the clock, so it is exact even before the removal arrives.)
    pub fn stored_view(&self, user_id: &str) -> PresenceView {
        // At the epoch nothing has expired yet: only removals count.
        self.view(user_id, OffsetDateTime::UNIX_EPOCH)
            .unwrap_or_else(|| PresenceView::unknown(user_id))
    }

    /// The node that accepted the newest value the record holds.
    fn latest_node(&self) -> Option<&str> {
        let manual = self
            .manual()
            .and_then(|c| c.value.as_ref().map(|m| (c.revision, m.node_id.as_str())));
        let seen = self
            .seen()
            .and_then(|c| c.value.as_ref().map(|s| (c.revision, s.node_id.as_str())));
        let sessions = self
            .sessions()
            .iter()
            .filter_map(|(_, c)| c.value.as_ref().map(|s| (c.revision, s.node_id.as_str())));
        manual
            .into_iter()
            .chain(seen)
            .chain(sessions)
            .max_by_key(|(revision, _)| *revision)
            .map(|(_, node)| node)
    }

    /// Rough heap size, for the cache's cost accounting.
    pub fn weight(&self) -> usize {
        let manual = self
            .manual()
            .and_then(|c| c.value.as_deref())
            .map_or(0, |m| {
                // Node IDs are shared (interned): not counted per user.
                100 + m.message.len()
            });
        let sessions: usize = self
            .sessions()
            .iter()
            .map(|(id, c)| 64 + id.len() + c.value.as_ref().map_or(0, |s| 96 + s.device.len()))
            .sum();
        manual + sessions + if self.extras.is_some() { 64 } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ValidUpdate;
    use proptest::prelude::*;
    use time::Duration;

    /// With its `Arc` counts the record is a 48-byte allocation, and a
    /// manual status a 56-byte one (both allocator classes): with the key
    /// and the message's text, all a user of the Go-style API costs.
    #[test]
    fn a_record_stays_small() {
        assert!(std::mem::size_of::<Presence>() <= 56);
        assert!(std::mem::size_of::<UserRecord>() <= 32);
    }

    const T0: OffsetDateTime = OffsetDateTime::UNIX_EPOCH;

    fn manual(status: Status, expires_in: Option<i64>) -> Update {
        let update = ValidUpdate {
            user_id: "u".into(),
            status,
            message: "m".into(),
            expires_at: expires_in.map(|s| T0 + Duration::seconds(s)),
        };
        Update::Manual(Some(Presence::accepted(update, "n1", T0)))
    }

    fn session(id: &str, status: Status, at: i64, ttl: i64) -> Update {
        Update::Session(
            id.into(),
            Some(Arc::new(Session {
                device: format!("dev-{id}"),
                status,
                last_seen: T0 + Duration::seconds(at),
                ttl_seconds: ttl,
                node_id: "n2".into(),
            })),
        )
    }

    fn seen(at: i64) -> Update {
        Update::Seen(Some(Seen {
            last_seen: T0 + Duration::seconds(at),
            node_id: "n".into(),
        }))
    }

    #[test]
    fn nothing_known_is_no_view() {
        let mut r = UserRecord::default();
        assert!(r.view("u", T0).is_none());
        r.merge(Update::Session("s".into(), None), 3);
        assert!(r.view("u", T0).is_none());
        assert_eq!(r.revision(), 3);
    }

    #[test]
    fn sessions_fold_online_over_away_and_expire_by_clock() {
        let mut r = UserRecord::default();
        r.merge(session("phone", Status::Away, 0, 30), 1);
        r.merge(session("laptop", Status::Online, 5, 10), 2);
        r.merge(seen(5), 3);
        let v = r.view("u", T0 + Duration::seconds(6)).unwrap();
        assert_eq!(v.status, Status::Online);
        assert_eq!(v.sessions.len(), 2);
        assert_eq!(v.sessions[0].id, "laptop");
        assert_eq!(v.revision, 3);
        // The laptop's lease ends at 15 s: the phone's away remains.
        let v = r.view("u", T0 + Duration::seconds(15)).unwrap();
        assert_eq!(v.status, Status::Away);
        assert_eq!(v.sessions.len(), 1);
        // Both expired (and removed by the bucket): offline, lastSeen kept.
        r.merge(Update::Session("phone".into(), None), 4);
        r.merge(Update::Session("laptop".into(), None), 5);
        let v = r.view("u", T0 + Duration::seconds(60)).unwrap();
        assert_eq!(v.status, Status::Offline);
        assert!(v.sessions.is_empty());
        assert_eq!(v.last_seen, Some(T0 + Duration::seconds(5)));
    }

    #[test]
    fn last_seen_stays_exact_when_the_durable_key_lags() {
        // The durable key was written at 0; heartbeats went on until 20.
        let mut r = UserRecord::default();
        r.merge(seen(0), 1);
        r.merge(session("tab", Status::Online, 10, 30), 2);
        r.merge(session("tab", Status::Online, 20, 30), 3);
        r.merge(Update::Session("tab".into(), None), 4);
        let v = r.view("u", T0 + Duration::seconds(60)).unwrap();
        assert_eq!(v.status, Status::Offline);
        assert_eq!(v.last_seen, Some(T0 + Duration::seconds(20)));
        // A node that starts later knows only the bucket: the durable key.
        let mut later = UserRecord::default();
        later.merge(seen(0), 1);
        later.merge(Update::Session("tab".into(), None), 4);
        let v = later.view("u", T0 + Duration::seconds(60)).unwrap();
        assert_eq!(v.last_seen, Some(T0));
    }

    #[test]
    fn manual_status_wins_until_it_expires() {
        let mut r = UserRecord::default();
        r.merge(session("phone", Status::Online, 0, 300), 1);
        r.merge(manual(Status::Busy, Some(10)), 2);
        let v = r.view("u", T0 + Duration::seconds(9)).unwrap();
        assert_eq!((v.status, v.message.as_str()), (Status::Busy, "m"));
        assert_eq!(v.expires_at, Some(T0 + Duration::seconds(10)));
        let v = r.view("u", T0 + Duration::seconds(10)).unwrap();
        assert_eq!((v.status, v.message.as_str()), (Status::Online, ""));
        assert_eq!(v.expires_at, None);
        assert_eq!(v.node_id, "n1");
    }

    #[test]
    fn older_revisions_and_removals_never_win() {
        let mut r = UserRecord::default();
        assert!(r.merge(Update::Session("s".into(), None), 5));
        // The late value only tells when the user was last seen.
        assert!(r.merge(session("s", Status::Online, 0, 30), 4));
        assert!(!r.merge(session("s", Status::Online, 0, 30), 4));
        assert!(r.view("u", T0).is_none());
        assert!(r.merge(manual(Status::Away, None), 7));
        assert!(!r.merge(Update::Manual(None), 6));
        assert_eq!(r.view("u", T0).unwrap().status, Status::Away);
    }

    #[test]
    fn the_stored_view_changes_only_with_the_bucket() {
        let mut r = UserRecord::default();
        r.merge(session("s", Status::Online, 0, 5), 1);
        r.merge(manual(Status::Busy, Some(10)), 2);
        r.merge(seen(0), 3);
        // Long past both expiries, the clock says offline...
        assert_eq!(
            r.view("u", T0 + Duration::hours(1)).unwrap().status,
            Status::Offline
        );
        // ...but until the bucket removes them, streams still see them.
        assert_eq!(r.stored_view("u").status, Status::Busy);
        r.merge(Update::Manual(None), 4);
        assert_eq!(r.stored_view("u").status, Status::Online);
        r.merge(Update::Session("s".into(), None), 5);
        let view = r.stored_view("u");
        assert_eq!((view.status, view.last_seen), (Status::Offline, Some(T0)));
        assert_eq!(UserRecord::default().stored_view("x").last_seen, None);
    }

    #[test]
    fn tombstones_are_bounded() {
        let mut r = UserRecord::default();
        for i in 0..100u64 {
            r.merge(Update::Session(format!("s{i}"), None), i + 1);
        }
        assert_eq!(r.sessions().len(), MAX_TOMBSTONES);
        assert_eq!(r.revision(), 100);
    }

    #[test]
    fn same_state_ignores_heartbeat_times() {
        let mut r = UserRecord::default();
        r.merge(session("s", Status::Online, 0, 30), 1);
        let before = r.view("u", T0).unwrap();
        r.merge(session("s", Status::Online, 10, 30), 2);
        let after = r.view("u", T0 + Duration::seconds(10)).unwrap();
        assert!(before.same_state(&after));
        r.merge(session("s", Status::Away, 11, 30), 3);
        assert!(!after.same_state(&r.view("u", T0 + Duration::seconds(11)).unwrap()));
    }

    #[test]
    fn the_json_is_made_once_and_follows_expiries() {
        let mut r = UserRecord::default();
        r.merge(session("phone", Status::Online, 0, 30), 1);
        r.merge(manual(Status::Busy, Some(10)), 2);
        let json_at = |r: &UserRecord, s: i64| {
            let now = T0 + Duration::seconds(s);
            let json = r.view_json("u", now).unwrap().unwrap();
            let expected = serde_json::to_vec(&r.view("u", now).unwrap()).unwrap();
            assert_eq!(json.as_ref(), expected.as_slice(), "at {s} s");
            json
        };
        let first = json_at(&r, 1);
        // Reused (the same allocation) while nothing expires...
        assert_eq!(json_at(&r, 9).as_ptr(), first.as_ptr());
        // ...and made anew once the manual status and then the session end.
        assert!(String::from_utf8_lossy(&json_at(&r, 10)).contains("\"online\""));
        assert!(String::from_utf8_lossy(&json_at(&r, 30)).contains("\"offline\""));
        // A merged copy has no JSON of its own yet.
        let mut changed = r.clone();
        changed.merge(manual(Status::Away, None), 3);
        assert!(String::from_utf8_lossy(&json_at(&changed, 1)).contains("\"away\""));
        assert!(UserRecord::default().view_json("u", T0).unwrap().is_none());
    }

    fn any_update() -> impl Strategy<Value = Update> {
        let status = prop_oneof![Just(Status::Online), Just(Status::Away), Just(Status::Busy)];
        prop_oneof![
            (status.clone(), proptest::option::of(1..100i64)).prop_map(|(s, e)| manual(s, e)),
            Just(Update::Manual(None)),
            (0..100i64).prop_map(seen),
            ("[ab]", status, 0..100i64, 5..50i64).prop_map(|(id, s, at, ttl)| {
                let s = if s == Status::Busy { Status::Online } else { s };
                session(&id, s, at, ttl)
            }),
            "[ab]".prop_map(|id| Update::Session(id, None)),
        ]
    }

    proptest! {
        /// The allocation-free comparison agrees with comparing the views.
        #[test]
        fn same_stored_state_agrees_with_the_views(
            first in prop::collection::vec(any_update(), 0..8),
            second in prop::collection::vec(any_update(), 0..8),
        ) {
            let build = |updates: Vec<Update>| {
                let mut record = UserRecord::default();
                for (update, revision) in updates.into_iter().zip(1u64..) {
                    record.merge(update, revision);
                }
                record
            };
            let (a, b) = (build(first), build(second));
            let by_views = a.stored_view("u").same_state(&b.stored_view("u"));
            prop_assert_eq!(a.same_stored_state(&b), by_views);
        }

        /// Any delivery order of the same changes gives the same record.
        #[test]
        fn merge_is_order_independent(
            updates in prop::collection::vec(any_update(), 1..12),
            seed in any::<u64>(),
            now in 0..150i64,
        ) {
            let changes: Vec<(Update, u64)> =
                updates.into_iter().zip(1u64..).collect();
            let mut in_order = UserRecord::default();
            for (u, rev) in &changes {
                in_order.merge(u.clone(), *rev);
            }
            let mut shuffled = changes.clone();
            let len = shuffled.len();
            for i in 0..len {
                let j = usize::try_from(seed.rotate_left(u32::try_from(i).unwrap()) % len as u64).unwrap();
                shuffled.swap(i, j);
            }
            let mut other = UserRecord::default();
            for (u, rev) in shuffled {
                other.merge(u, rev);
            }
            let at = T0 + Duration::seconds(now);
            prop_assert_eq!(in_order.view("u", at), other.view("u", at));
            prop_assert_eq!(in_order.revision(), other.revision());
        }
    }
}
