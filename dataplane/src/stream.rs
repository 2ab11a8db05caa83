//! Change streams: what one subscriber to a set of users is told, and when.
//!
//! Every stream of a node reads the node's single KV watch through the
//! in-process [`ChangeFeed`]; none opens a NATS consumer. A stream keeps
//! its own copy of its users' records, so it computes each user's effective
//! presence after every change without touching the shared cache, and tells
//! the subscriber only when that presence changed in a way a client shows
//! (heartbeats that only move `lastSeen` are not events).
//!
//! Event IDs are KV revisions, increasing along a stream. A client that
//! reconnects with `Last-Event-ID: r` gets every change after `r` from the
//! node's [`EventLog`] (its recent visible changes, in revision order) when
//! the log covers `r`. When it doesn't, it gets one event per user changed
//! after `r` with the user's current presence, which is still gapless while
//! `r` is younger than the bucket keeps removal markers ([`RESUME_HORIZON`]);
//! an older `r` gets a full snapshot.

use crate::record::{PresenceView, UserRecord};
use crate::store::Change;
use crate::sync::ChangeFeed;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// Most users one stream may follow.
pub const MAX_STREAM_USERS: usize = 1000;
/// How many changes the feed buffers for a slow stream before that stream
/// is told it lagged (and ends, to resume with `Last-Event-ID`).
pub const FEED_CAPACITY: usize = 16 * 1024;
/// How old a `Last-Event-ID` may be for an exact resume: the bucket keeps
/// the markers of removed keys for an hour, and this leaves a margin.
pub const RESUME_HORIZON: time::Duration = time::Duration::minutes(50);

/// The node's open streams and the feed they read.
#[derive(Clone)]
pub struct StreamHub {
    feed: ChangeFeed,
    log: Arc<EventLog>,
    open: Arc<AtomicUsize>,
    max_open: usize,
}

/// One open stream's place under the cap; released on drop.
#[derive(Debug)]
pub struct StreamPermit(Arc<AtomicUsize>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StreamHub {
    /// A hub allowing `max_open` streams at once.
    pub fn new(max_open: usize) -> Self {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        StreamHub {
            feed,
            log: Arc::new(EventLog::default()),
            open: Arc::new(AtomicUsize::new(0)),
            max_open,
        }
    }

    /// Where the watch sends what it applied.
    pub fn feed(&self) -> ChangeFeed {
        self.feed.clone()
    }

    /// The node's recent events, written by the watch.
    pub fn log(&self) -> Arc<EventLog> {
        self.log.clone()
    }

    /// Streams open now, for metrics.
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The cap, for error messages.
    pub fn max_open(&self) -> usize {
        self.max_open
    }

    /// A place for one more stream, or `None` at the cap.
    pub fn open(&self) -> Option<StreamPermit> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_open).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| StreamPermit(self.open.clone()))
    }

    /// Starts receiving changes; subscribe before reading the snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.feed.subscribe()
    }
}

/// How many presence changes the node remembers for exact resumes.
pub const EVENT_LOG_CAPACITY: usize = 32 * 1024;

/// The node's recent presence events (every visible change of every user,
/// as the watch applied them), so a stream resuming after `Last-Event-ID`
/// gets each change it missed, not only each user's latest state.
#[derive(Default)]
pub struct EventLog {
    inner: std::sync::Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    events: std::collections::VecDeque<(u64, Arc<PresenceView>)>,
    /// Visible changes this node wrote and applied itself, by revision,
    /// until the watch brings them in order (it then finds them stale).
    local: HashMap<u64, PresenceView>,
    /// Every visible change after this revision is in `events`; `None`
    /// while nothing is known (start, replay, recreated bucket).
    complete_after: Option<u64>,
}

impl EventLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on every change is recorded: the log is complete after `revision`.
    pub fn start_after(&self, revision: u64) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.local.clear();
        inner.complete_after = Some(revision);
    }

    /// Forgets everything (the bucket was recreated, or a replay begins).
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.local.clear();
        inner.complete_after = None;
    }

    /// A visible change of a user at `revision`.
    pub fn push(&self, revision: u64, view: PresenceView) {
        let mut inner = self.lock();
        if inner.complete_after.is_none() {
            return;
        }
        if inner.events.len() == EVENT_LOG_CAPACITY
            && let Some((dropped, _)) = inner.events.pop_front()
        {
            inner.complete_after = inner.complete_after.map(|after| after.max(dropped));
        }
        inner.events.push_back((revision, Arc::new(view)));
    }

    /// A visible change this node wrote and already applied to its cache:
    /// the watch will find it stale, and records it then, in order.
    pub fn note_local(&self, revision: u64, view: PresenceView) {
        let mut inner = self.lock();
        if inner.local.len() >= MAX_LOCAL {
            // Echoes that never came (a watch restart, a recreated
            // bucket): give up exactness up to here rather than grow.
            inner.local.clear();
            drop(inner);
            self.gap(revision);
            return;
        }
        inner.local.insert(revision, view);
    }

    /// The watch found the change at `revision` already applied: if this
    /// node wrote it, it is recorded now.
    pub fn echo(&self, revision: u64) {
        let view = self.lock().local.remove(&revision);
        if let Some(view) = view {
            self.push(revision, view);
        }
    }

    /// A change at `revision` whose effect is unknown here (its user is
    /// not cached): nothing up to it can be replayed exactly any more.
    pub fn gap(&self, revision: u64) {
        let mut inner = self.lock();
        inner.complete_after = inner.complete_after.map(|after| after.max(revision));
        while inner.events.front().is_some_and(|(r, _)| *r <= revision) {
            inner.events.pop_front();
        }
    }

    /// Every event of `users` after revision `after` up to `through`, in
    /// order; `None` when the log can't vouch for that whole range.
    pub fn replay(
        &self,
        after: u64,
        through: u64,
        users: &std::collections::HashSet<&str>,
    ) -> Option<Vec<(u64, Arc<PresenceView>)>> {
        let inner = self.lock();
        if inner.complete_after.is_none_or(|complete| complete > after) || after > through {
            return None;
        }
        Some(
            inner
                .events
                .iter()
                .filter(|(r, v)| *r > after && *r <= through && users.contains(v.user_id.as_str()))
                .cloned()
                .collect(),
        )
    }
}

/// Most local writes waiting for their watch echo.
const MAX_LOCAL: usize = 4096;

/// The presence a subscriber sees after a record went from `before` to
/// `after`, if it differs in a way a client shows.
pub fn visible_change(
    user_id: &str,
    before: &UserRecord,
    after: &UserRecord,
) -> Option<PresenceView> {
    (!before.same_stored_state(after)).then(|| after.stored_view(user_id))
}

/// Something to tell the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A user's effective presence; `id` is the revision it reflects
    /// (none inside a full snapshot, whose end carries the ID).
    Presence { id: Option<u64>, view: PresenceView },
    /// The snapshot (or the catch-up after a resume) is complete: from
    /// here on every event is a live change. `id` covers everything sent.
    SnapshotEnd { id: u64, users: usize },
}

struct Followed {
    record: UserRecord,
    /// What the subscriber was last told (or would have been: the
    /// snapshot's state).
    shown: PresenceView,
}

/// One stream's users and what it told about them.
pub struct Subscription {
    users: HashMap<String, Followed>,
    order: Vec<String>,
}

impl Subscription {
    /// Follows `user_ids`, starting from their `records` (same order).
    pub fn new(user_ids: Vec<String>, records: Vec<UserRecord>) -> Self {
        let users = user_ids
            .iter()
            .zip(records)
            .map(|(id, record)| {
                let shown = record.stored_view(id);
                (id.clone(), Followed { record, shown })
            })
            .collect();
        Subscription {
            users,
            order: user_ids,
        }
    }

    /// Folds a change in without telling anyone: it is part of the snapshot.
    pub fn absorb(&mut self, change: &Change) {
        if let Some(user) = self.users.get_mut(&change.user_id)
            && user.record.merge(change.update.clone(), change.revision)
        {
            user.shown = user.record.stored_view(&change.user_id);
        }
    }

    /// Folds a live change in; an event when the user's presence changed.
    pub fn apply(&mut self, change: &Change) -> Option<StreamEvent> {
        let user = self.users.get_mut(&change.user_id)?;
        if !user.record.merge(change.update.clone(), change.revision) {
            return None;
        }
        let view = user.record.stored_view(&change.user_id);
        if view.same_state(&user.shown) {
            return None;
        }
        user.shown = view.clone();
        Some(StreamEvent::Presence {
            id: Some(change.revision),
            view,
        })
    }

    /// The users this subscription follows.
    pub fn users(&self) -> std::collections::HashSet<&str> {
        self.order.iter().map(String::as_str).collect()
    }

    /// What a resuming subscriber gets first when the node's [`EventLog`]
    /// covers its gap: every change it missed, then the snapshot's end.
    pub fn replayed(
        &self,
        missed: Vec<(u64, Arc<PresenceView>)>,
        through: u64,
    ) -> Vec<StreamEvent> {
        let mut events: Vec<StreamEvent> = missed
            .into_iter()
            .map(|(revision, view)| StreamEvent::Presence {
                id: Some(revision),
                view: PresenceView::clone(&view),
            })
            .collect();
        events.push(StreamEvent::SnapshotEnd {
            id: through,
            users: self.order.len(),
        });
        events
    }

    /// What a new subscriber gets first, covering everything up to
    /// `through` (a revision the node has applied). With `resume_after`,
    /// only the users changed since then, in revision order; otherwise
    /// every user, in the order asked for.
    pub fn opening(&self, through: u64, resume_after: Option<u64>) -> Vec<StreamEvent> {
        let mut events: Vec<StreamEvent> = match resume_after {
            Some(after) => {
                let mut changed: Vec<(u64, &PresenceView)> = self
                    .order
                    .iter()
                    .filter_map(|id| self.users.get(id))
                    .map(|u| (u.record.revision(), &u.shown))
                    .filter(|(revision, _)| *revision > after)
                    .collect();
                changed.sort_by_key(|(revision, _)| *revision);
                changed
                    .into_iter()
                    .map(|(revision, view)| StreamEvent::Presence {
                        id: Some(revision),
                        view: view.clone(),
                    })
                    .collect()
            }
            None => self
                .order
                .iter()
                .filter_map(|id| self.users.get(id))
                .map(|u| StreamEvent::Presence {
                    id: None,
                    view: u.shown.clone(),
                })
                .collect(),
        };
        events.push(StreamEvent::SnapshotEnd {
            id: through,
            users: self.order.len(),
        });
        events
    }
}

/// Whether a stream can resume exactly after `last_event_id`: it must not
/// be ahead of what the node applied (an ID from a recreated bucket is),
/// and be recent enough that removal markers after it still exist.
pub fn can_resume_exactly(
    last_event_id: u64,
    applied: u64,
    stored_no_earlier_than: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> bool {
    last_event_id <= applied && stored_no_earlier_than.is_some_and(|t| now - t < RESUME_HORIZON)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;
    use crate::record::Update;
    use crate::session::Session;
    use time::Duration;

    const T0: OffsetDateTime = OffsetDateTime::UNIX_EPOCH;

    fn session(user: &str, id: &str, status: Option<Status>, at: i64, revision: u64) -> Change {
        let value = status.map(|status| {
            Arc::new(Session {
                device: "d".into(),
                status,
                last_seen: T0 + Duration::seconds(at),
                ttl_seconds: 30,
                node_id: "n".into(),
            })
        });
        Change {
            user_id: user.into(),
            update: Update::Session(id.into(), value),
            revision,
            stored_at: T0,
            pending: 0,
        }
    }

    fn status_of(event: &StreamEvent) -> (Option<u64>, Status) {
        match event {
            StreamEvent::Presence { id, view } => (*id, view.status),
            StreamEvent::SnapshotEnd { id, .. } => (Some(*id), Status::Offline),
        }
    }

    #[test]
    fn tells_only_changes_a_client_would_show() {
        let mut sub = Subscription::new(
            vec!["a".into(), "b".into()],
            vec![UserRecord::default(), UserRecord::default()],
        );
        let event = sub.apply(&session("a", "s", Some(Status::Online), 0, 5));
        assert_eq!(
            event.as_ref().map(status_of),
            Some((Some(5), Status::Online))
        );
        // A heartbeat moves lastSeen only.
        assert!(
            sub.apply(&session("a", "s", Some(Status::Online), 1, 6))
                .is_none()
        );
        // A replayed old revision changes nothing.
        assert!(
            sub.apply(&session("a", "s", Some(Status::Away), 0, 4))
                .is_none()
        );
        // Users not followed are ignored.
        assert!(
            sub.apply(&session("c", "s", Some(Status::Online), 0, 7))
                .is_none()
        );
        let event = sub.apply(&session("a", "s", None, 0, 8));
        assert_eq!(
            event.as_ref().map(status_of),
            Some((Some(8), Status::Offline))
        );
    }

    #[test]
    fn opening_is_a_snapshot_or_the_changes_since_the_last_event() {
        let mut sub = Subscription::new(
            vec!["a".into(), "b".into(), "c".into()],
            vec![UserRecord::default(); 3],
        );
        sub.absorb(&session("b", "s", Some(Status::Away), 0, 9));
        sub.absorb(&session("a", "s", Some(Status::Online), 0, 12));
        sub.absorb(&session("c", "s", Some(Status::Online), 0, 3));
        let full: Vec<_> = sub.opening(12, None).iter().map(status_of).collect();
        assert_eq!(
            full,
            [
                (None, Status::Online),
                (None, Status::Away),
                (None, Status::Online),
                (Some(12), Status::Offline)
            ]
        );
        let resumed: Vec<_> = sub.opening(12, Some(5)).iter().map(status_of).collect();
        assert_eq!(
            resumed,
            [
                (Some(9), Status::Away),
                (Some(12), Status::Online),
                (Some(12), Status::Offline)
            ]
        );
    }

    #[test]
    fn resume_needs_a_known_recent_revision() {
        let now = T0 + Duration::hours(2);
        let recent = Some(now - Duration::minutes(5));
        assert!(can_resume_exactly(10, 20, recent, now));
        assert!(
            !can_resume_exactly(30, 20, recent, now),
            "ahead of this node"
        );
        assert!(
            !can_resume_exactly(10, 20, None, now),
            "older than any checkpoint"
        );
        assert!(!can_resume_exactly(
            10,
            20,
            Some(now - Duration::hours(1)),
            now
        ));
    }

    #[test]
    fn the_event_log_replays_only_ranges_it_covers() {
        let log = EventLog::default();
        let users: std::collections::HashSet<&str> = ["a", "b"].into();
        let ids = |events: Option<Vec<(u64, Arc<PresenceView>)>>| {
            events.map(|e| e.iter().map(|(r, _)| *r).collect::<Vec<_>>())
        };
        log.push(1, PresenceView::unknown("a"));
        assert_eq!(ids(log.replay(0, 10, &users)), None, "not started");
        log.start_after(5);
        log.push(6, PresenceView::unknown("a"));
        log.push(7, PresenceView::unknown("c"));
        log.note_local(8, PresenceView::unknown("b"));
        log.echo(8);
        log.echo(8);
        log.push(9, PresenceView::unknown("b"));
        assert_eq!(ids(log.replay(5, 9, &users)), Some(vec![6, 8, 9]));
        assert_eq!(ids(log.replay(6, 9, &users)), Some(vec![8, 9]));
        assert_eq!(ids(log.replay(5, 8, &users)), Some(vec![6, 8]));
        assert_eq!(ids(log.replay(4, 9, &users)), None, "before the log");
        assert_eq!(ids(log.replay(10, 9, &users)), None, "ahead of the node");
        // A change this node could not see the effect of.
        log.gap(8);
        assert_eq!(ids(log.replay(6, 9, &users)), None);
        assert_eq!(ids(log.replay(8, 9, &users)), Some(vec![9]));
        log.reset();
        assert_eq!(ids(log.replay(8, 9, &users)), None);
    }

    #[test]
    fn the_cap_is_enforced_and_released() {
        let hub = StreamHub::new(2);
        let a = hub.open().unwrap();
        let _b = hub.open().unwrap();
        assert!(hub.open().is_none());
        drop(a);
        assert!(hub.open().is_some());
    }
}
