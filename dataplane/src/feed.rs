//! The node's change feed: the watch hands each applied change to the
//! change streams that follow its user, and to no other.
//!
//! A broadcast to every stream woke all of them for every change; with 200
//! streams of 10 users each over 50 users, 160 of the 200 woke only to drop
//! the change, ahead of the 40 that wanted it (#17). Here each stream has a
//! queue of its own, filled in feed order by the one sender (the watch), so
//! a stream still sees its users' changes in revision order, and a stream
//! whose queue is full is told it lagged rather than silently missing one.

use crate::record::PresenceView;
use crate::store::Change;
use once_cell::race::OnceBox;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// A change as the feed hands it out: the change, and the presence the
/// node recorded for it, so that the streams showing that same presence
/// serialize it once between them instead of once each (#17: a change of a
/// user followed by 40 streams was 40 serializations of the same view).
pub struct Fed {
    pub change: Change,
    /// The user's presence after the change as the node's event log has
    /// it; `None` when the change shows nothing or its effect is unknown.
    shown: Option<Arc<PresenceView>>,
    json: OnceBox<String>,
}

impl Fed {
    /// `change`, with what the node shows of it, if known.
    pub fn new(change: Change, shown: Option<Arc<PresenceView>>) -> Self {
        Fed {
            change,
            shown,
            json: OnceBox::new(),
        }
    }

    /// `view`'s JSON, made by the first stream that asks and shared with
    /// the rest, when `view` is the presence the node recorded; `None`
    /// otherwise (a stream that opened on an older snapshot may show
    /// something else), and the stream serializes its own.
    pub fn shared_json(&self, view: &PresenceView) -> Option<&str> {
        let shown = self.shown.as_deref().filter(|shown| *shown == view)?;
        let json = self
            .json
            .get_or_try_init(|| serde_json::to_string(shown).map(Box::new));
        json.ok().map(String::as_str)
    }
}

/// Where the watch sends what it applied. Clones share the routes.
#[derive(Clone)]
pub struct ChangeFeed {
    routes: Arc<Mutex<Routes>>,
    capacity: usize,
}

#[derive(Default)]
struct Routes {
    next_id: u64,
    /// The queues of the streams following each user, by stream: a stream
    /// that ends leaves each of its users in one step, however many other
    /// streams follow them.
    by_user: HashMap<String, HashMap<u64, Route>>,
}

/// One stream's queue, as registered under one of its users.
struct Route {
    tx: mpsc::Sender<Arc<Fed>>,
    /// Set once a change for the stream didn't fit its queue.
    lagged: Arc<AtomicBool>,
}

/// Why [`FeedReceiver::recv`] returned no change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedError {
    /// A change for this stream didn't fit its queue: it can't go on
    /// gaplessly.
    Lagged,
    /// The feed is gone (the node is stopping).
    Closed,
}

impl ChangeFeed {
    /// A feed whose streams may fall `capacity` changes behind.
    pub fn new(capacity: usize) -> Self {
        ChangeFeed {
            routes: Arc::default(),
            capacity: capacity.max(1),
        }
    }

    /// Hands `change` to every stream following its user.
    pub fn send(&self, fed: Arc<Fed>) {
        let mut routes = lock(&self.routes);
        let user_id = &fed.change.user_id;
        let Some(queues) = routes.by_user.get_mut(user_id) else {
            return;
        };
        queues.retain(|_, route| {
            if route.lagged.load(Ordering::Acquire) {
                return false;
            }
            match route.tx.try_send(fed.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    route.lagged.store(true, Ordering::Release);
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
        if queues.is_empty() {
            routes.by_user.remove(user_id);
        }
    }

    /// Whether any stream follows `user_id`: a change of a user nobody
    /// follows goes nowhere, so the watch need not decode its own echoes.
    pub fn follows(&self, user_id: &str) -> bool {
        lock(&self.routes).by_user.contains_key(user_id)
    }

    /// Ends every stream following `user_id` as lagged: a change of the
    /// user was passed over, so what it did is unknown here and no event
    /// can stand for it. Each client resumes with its `Last-Event-ID`, and
    /// the event log's gap there gives it a fresh snapshot.
    pub fn lose(&self, user_id: &str) {
        let mut routes = lock(&self.routes);
        let Some(queues) = routes.by_user.remove(user_id) else {
            return;
        };
        for route in queues.values() {
            route.lagged.store(true, Ordering::Release);
        }
        // Each stream leaves the routes of its other users too, so its
        // queue's last sender goes and a stream waiting for a change wakes
        // to find itself lagged. Rare, so a pass over every route will do.
        routes.by_user.retain(|_, others| {
            others.retain(|id, _| !queues.contains_key(id));
            !others.is_empty()
        });
    }

    /// Starts receiving the changes of `user_ids` (each once, however often
    /// it is named); subscribe before reading their records, so no change
    /// falls between the two.
    pub fn subscribe(&self, user_ids: &[String]) -> FeedReceiver {
        let (tx, rx) = mpsc::channel(self.capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut users = user_ids.to_vec();
        users.sort_unstable();
        users.dedup();
        let mut routes = lock(&self.routes);
        routes.next_id += 1;
        let id = routes.next_id;
        for user in &users {
            let route = Route {
                tx: tx.clone(),
                lagged: lagged.clone(),
            };
            routes
                .by_user
                .entry(user.clone())
                .or_default()
                .insert(id, route);
        }
        FeedReceiver {
            rx,
            id,
            users,
            lagged,
            routes: Arc::downgrade(&self.routes),
        }
    }

    /// How many streams follow `user_id`, for tests.
    #[cfg(test)]
    fn followers(&self, user_id: &str) -> usize {
        lock(&self.routes)
            .by_user
            .get(user_id)
            .map_or(0, HashMap::len)
    }
}

fn lock(routes: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    routes.lock().unwrap_or_else(|p| p.into_inner())
}

/// One stream's end of the feed; leaves the routes when dropped.
pub struct FeedReceiver {
    rx: mpsc::Receiver<Arc<Fed>>,
    id: u64,
    users: Vec<String>,
    lagged: Arc<AtomicBool>,
    /// Weak: once the feed is gone, its queues' senders are too, and the
    /// stream reads [`FeedError::Closed`].
    routes: Weak<Mutex<Routes>>,
}

impl FeedReceiver {
    /// The next change for this stream's users, in feed order.
    pub async fn recv(&mut self) -> Result<Arc<Fed>, FeedError> {
        if self.lagged.load(Ordering::Acquire) {
            return Err(FeedError::Lagged);
        }
        match self.rx.recv().await {
            Some(change) => Ok(change),
            None if self.lagged.load(Ordering::Acquire) => Err(FeedError::Lagged),
            None => Err(FeedError::Closed),
        }
    }

    /// A change already queued, if any (`Ok(None)`: none yet).
    pub fn try_recv(&mut self) -> Result<Option<Arc<Fed>>, FeedError> {
        if self.lagged.load(Ordering::Acquire) {
            return Err(FeedError::Lagged);
        }
        match self.rx.try_recv() {
            Ok(change) => Ok(Some(change)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(FeedError::Closed),
        }
    }
}

impl Drop for FeedReceiver {
    fn drop(&mut self) {
        let Some(routes) = self.routes.upgrade() else {
            return;
        };
        let mut routes = lock(&routes);
        for user in &self.users {
            if let Some(queues) = routes.by_user.get_mut(user) {
                queues.remove(&self.id);
                if queues.is_empty() {
                    routes.by_user.remove(user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Update;
    use time::OffsetDateTime;

    fn change(user: &str, revision: u64) -> Arc<Fed> {
        let change = Change {
            user_id: user.into(),
            update: Update::Seen(None),
            revision,
            stored_at: OffsetDateTime::UNIX_EPOCH,
            pending: 0,
        };
        Arc::new(Fed::new(change, None))
    }

    fn users(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn a_stream_gets_only_its_users_changes_in_feed_order() {
        let feed = ChangeFeed::new(16);
        let mut ab = feed.subscribe(&users(&["a", "b"]));
        let mut c = feed.subscribe(&users(&["c"]));
        for (user, revision) in [("a", 1), ("c", 2), ("b", 3), ("x", 4), ("a", 5)] {
            feed.send(change(user, revision));
        }
        let mut got = Vec::new();
        while let Ok(Some(change)) = ab.try_recv() {
            got.push(change.change.revision);
        }
        assert_eq!(got, [1, 3, 5]);
        assert_eq!(c.recv().await.map(|c| c.change.revision), Ok(2));
        assert_eq!(c.try_recv().map(|c| c.map(|c| c.change.revision)), Ok(None));
    }

    #[tokio::test]
    async fn a_user_named_twice_is_followed_once() {
        let feed = ChangeFeed::new(4);
        let mut twice = feed.subscribe(&users(&["a", "a"]));
        feed.send(change("a", 1));
        assert_eq!(twice.recv().await.map(|c| c.change.revision), Ok(1));
        assert_eq!(
            twice.try_recv().map(|c| c.map(|c| c.change.revision)),
            Ok(None)
        );
        assert_eq!(feed.followers("a"), 1);
    }

    #[tokio::test]
    async fn a_full_queue_ends_the_stream_as_lagged_without_a_gap() {
        let feed = ChangeFeed::new(2);
        let mut slow = feed.subscribe(&users(&["a", "b"]));
        let mut other = feed.subscribe(&users(&["b"]));
        feed.send(change("a", 1));
        feed.send(change("a", 2));
        // Doesn't fit: the stream lagged, and it gets nothing after it,
        // not even a change of its other user.
        feed.send(change("a", 3));
        feed.send(change("b", 4));
        assert_eq!(slow.recv().await.err(), Some(FeedError::Lagged));
        assert_eq!(other.recv().await.map(|c| c.change.revision), Ok(4));
        assert_eq!(feed.followers("a"), 0);
        assert_eq!(feed.followers("b"), 1, "only the stream that kept up");
    }

    #[tokio::test]
    async fn a_lost_user_ends_the_streams_that_follow_it() {
        let feed = ChangeFeed::new(4);
        let mut follows = feed.subscribe(&users(&["a", "b"]));
        let mut other = feed.subscribe(&users(&["b"]));
        feed.send(change("a", 1));
        feed.lose("a");
        // Even the change queued before: the stream resumes from its last
        // event instead.
        assert_eq!(follows.recv().await.err(), Some(FeedError::Lagged));
        feed.send(change("b", 2));
        assert_eq!(other.recv().await.map(|c| c.change.revision), Ok(2));
        assert_eq!(feed.followers("a"), 0);
        assert_eq!(feed.followers("b"), 1, "the lost stream left b too");
    }

    /// A stream already waiting for a change, which its other users may
    /// never bring, is woken to end.
    #[tokio::test]
    async fn a_waiting_stream_wakes_when_its_user_is_lost() {
        let feed = ChangeFeed::new(4);
        let mut follows = feed.subscribe(&users(&["a", "b"]));
        // Bounded, so a stream that never wakes fails instead of hanging.
        let waiting = tokio::time::timeout(std::time::Duration::from_secs(10), follows.recv());
        let (ended, ()) = tokio::join!(waiting, async {
            tokio::task::yield_now().await;
            feed.lose("a");
        });
        assert_eq!(ended.map(Result::err), Ok(Some(FeedError::Lagged)));
    }

    #[tokio::test]
    async fn a_closed_stream_leaves_the_routes_and_a_dropped_feed_closes_streams() {
        let feed = ChangeFeed::new(4);
        let gone = feed.subscribe(&users(&["a", "b"]));
        let mut kept = feed.subscribe(&users(&["a"]));
        assert_eq!(feed.followers("a"), 2);
        drop(gone);
        assert_eq!((feed.followers("a"), feed.followers("b")), (1, 0));
        drop(feed);
        assert_eq!(kept.recv().await.err(), Some(FeedError::Closed));
    }
}
