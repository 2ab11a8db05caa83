//! Change streams: what one subscriber to a set of users is told, and when.
//!
//! Every stream of a node reads the node's single KV watch through the
//! in-process [`ChangeFeed`], which hands each stream only its users'
//! changes; none opens a NATS consumer. A stream keeps
//! its own copy of its users' records, so it computes each user's effective
//! presence after every change without touching the shared cache, and tells
//! the subscriber only when that presence changed in a way a client shows
//! (heartbeats that only move `lastSeen` are not events).
//!
//! Event IDs are KV revisions, increasing along a stream. A client that
//! reconnects with `Last-Event-ID: r` gets every change after `r` from the
//! node's [`EventLog`](crate::event_log::EventLog) (its recent visible changes, in revision order) when
//! the log covers `r`. When it doesn't, it gets one event per user changed
//! after `r` with the user's current presence, which is still gapless while
//! `r` is younger than the bucket keeps removal markers ([`RESUME_HORIZON`](presence_contract::bucket::RESUME_HORIZON));
//! an older `r` gets a full snapshot.

use crate::event_log::EventLog;
use crate::feed::{ChangeFeed, FeedReceiver};
use crate::record::{PresenceView, UserRecord};
use crate::store::Change;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

/// Most users one stream may follow.
pub const MAX_STREAM_USERS: usize = 1000;
/// How many changes of its own users the feed queues for a slow stream
/// before that stream is told it lagged (and ends, to resume with
/// `Last-Event-ID`). Per stream: what a stalled client holds until its send
/// timeout ends it (pointers to changes the other streams share). As large
/// as the broadcast it replaced, so no stream lags sooner than it did.
pub const FEED_CAPACITY: usize = 16 * 1024;

/// The node's open streams and the feed they read.
#[derive(Clone)]
pub struct StreamHub {
    feed: ChangeFeed,
    log: Arc<EventLog>,
    open: Arc<AtomicUsize>,
    /// Users followed by all open streams together.
    follows: Arc<AtomicUsize>,
    caps: StreamCaps,
    /// Open streams per caller (`sub`); a caller without any has no entry.
    callers: Arc<Mutex<HashMap<String, usize>>>,
}

/// What a node's streams may hold: each follow keeps a user's ID and
/// record for as long as its stream lasts, so the users followed are
/// capped besides the streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamCaps {
    /// Streams at once (`STREAM_MAX_CONNECTIONS`).
    pub streams: usize,
    /// Streams of one caller (`STREAM_MAX_PER_CALLER`).
    pub per_caller: usize,
    /// Users followed by all streams together (`STREAM_MAX_FOLLOWS`).
    pub follows: usize,
}

/// One open stream's place under the caps; released on drop.
#[derive(Debug)]
pub struct StreamPermit {
    open: Arc<AtomicUsize>,
    follows: Arc<AtomicUsize>,
    followed: usize,
    callers: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.follows.fetch_sub(self.followed, Ordering::AcqRel);
        let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = callers.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                callers.remove(&self.caller);
            }
        }
    }
}

/// Why a stream could not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node serves its most streams (`STREAM_MAX_CONNECTIONS`).
    Node,
    /// This caller holds its most streams (`STREAM_MAX_PER_CALLER`).
    Caller,
    /// The node's streams follow their most users (`STREAM_MAX_FOLLOWS`).
    Follows,
    /// This stream alone follows more users than the node's streams may
    /// together: it can never open here, so retrying is pointless.
    TooManyUsers,
}

impl StreamHub {
    /// A hub within `caps`, with an event log of at most `log_bytes`.
    pub fn new(caps: StreamCaps, log_bytes: usize) -> Self {
        StreamHub {
            feed: ChangeFeed::new(FEED_CAPACITY),
            log: Arc::new(EventLog::with_max_bytes(log_bytes)),
            open: Arc::new(AtomicUsize::new(0)),
            follows: Arc::new(AtomicUsize::new(0)),
            caps,
            callers: Arc::default(),
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

    /// Users followed by the open streams now, for metrics.
    pub fn follows(&self) -> usize {
        self.follows.load(Ordering::Acquire)
    }

    /// The caps, for error messages.
    pub fn caps(&self) -> StreamCaps {
        self.caps
    }

    /// A place for one more stream of `caller`, following `users` users,
    /// unless the node, the caller or the node's follows are at their cap.
    pub fn open(&self, caller: &str, users: usize) -> Result<StreamPermit, Refused> {
        let caps = self.caps;
        if users > caps.follows {
            return Err(Refused::TooManyUsers);
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < caps.streams).then_some(n + 1)
            })
            .map_err(|_| Refused::Node)?;
        let reserved = self
            .follows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(users).filter(|total| *total <= caps.follows)
            });
        if reserved.is_err() {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Follows);
        }
        let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        let held = callers.entry(caller.to_owned()).or_default();
        if *held >= caps.per_caller {
            if *held == 0 {
                callers.remove(caller);
            }
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.follows.fetch_sub(users, Ordering::AcqRel);
            return Err(Refused::Caller);
        }
        *held += 1;
        Ok(StreamPermit {
            open: self.open.clone(),
            follows: self.follows.clone(),
            followed: users,
            callers: self.callers.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Starts receiving the changes of `user_ids`; subscribe before
    /// reading the snapshot.
    pub fn subscribe(&self, user_ids: &[String]) -> FeedReceiver {
        self.feed.subscribe(user_ids)
    }
}

/// Something to tell the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A user's effective presence; `id` is the revision it reflects
    /// (none inside a full snapshot, whose end carries the ID). The view
    /// is shared with the subscription or the event log, never copied.
    Presence {
        id: Option<u64>,
        view: Arc<PresenceView>,
    },
    /// The snapshot (or the catch-up after a resume) is complete: from
    /// here on every event is a live change. `id` covers everything sent.
    SnapshotEnd { id: u64, users: usize },
}

struct Followed {
    record: UserRecord,
    /// What the subscriber was last told (or would have been: the
    /// snapshot's state).
    shown: Arc<PresenceView>,
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
                let shown = Arc::new(record.stored_view(id));
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
            user.shown = Arc::new(user.record.stored_view(&change.user_id));
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
        user.shown = Arc::new(view);
        Some(StreamEvent::Presence {
            id: Some(change.revision),
            view: user.shown.clone(),
        })
    }

    /// The users this subscription follows.
    pub fn users(&self) -> std::collections::HashSet<&str> {
        self.order.iter().map(String::as_str).collect()
    }

    /// What a resuming subscriber gets first when the node's [`EventLog`](crate::event_log::EventLog)
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
                view,
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
                let mut changed: Vec<(u64, &Arc<PresenceView>)> = self
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
    last_event_id <= applied
        && stored_no_earlier_than
            .is_some_and(|t| now - t < presence_contract::bucket::RESUME_HORIZON)
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

    fn caps(streams: usize, per_caller: usize, follows: usize) -> StreamCaps {
        StreamCaps {
            streams,
            per_caller,
            follows,
        }
    }

    #[test]
    fn the_caps_are_enforced_and_released() {
        let hub = StreamHub::new(caps(3, 2, 1000), 1 << 20);
        let a = hub.open("greedy", 1).unwrap();
        let _b = hub.open("greedy", 1).unwrap();
        assert_eq!(hub.open("greedy", 1).unwrap_err(), Refused::Caller);
        let c = hub.open("modest", 1).unwrap();
        assert_eq!(hub.open("other", 1).unwrap_err(), Refused::Node);
        drop(a);
        let _again = hub.open("greedy", 1).unwrap();
        drop(c);
        assert_eq!(hub.open_streams(), 2);
        assert_eq!(hub.follows(), 2, "a refusal reserves no follows");
        assert_eq!(
            hub.callers.lock().unwrap().len(),
            1,
            "no entry for a caller without streams"
        );
    }

    #[test]
    fn the_users_followed_are_capped_across_streams() {
        let hub = StreamHub::new(caps(10, 10, 100), 1 << 20);
        assert_eq!(hub.open("a", 101).unwrap_err(), Refused::TooManyUsers);
        assert_eq!((hub.open_streams(), hub.follows()), (0, 0));
        let big = hub.open("a", 60).unwrap();
        assert_eq!(hub.open("b", 41).unwrap_err(), Refused::Follows);
        assert_eq!(hub.open_streams(), 1, "the refused stream holds no place");
        let fits = hub.open("b", 40).unwrap();
        assert_eq!(hub.follows(), 100);
        drop(big);
        assert_eq!(hub.follows(), 40);
        let _again = hub.open("c", 60).unwrap();
        drop(fits);
        assert_eq!(hub.follows(), 60);
    }
}
