//! A single-process store for trying the API without NATS (`--store memory`)
//! and for unit tests. It keeps KV semantics: increasing revisions, and a
//! watch that replays then follows.

use super::{
    BucketIdentity, Change, ChangeStream, Connectivity, EchoFilter, Entry, Expect, PresenceStore,
    StoreError, WatchStart,
};
use crate::keys::encode_key;
use crate::keys::key_of;
use crate::record::Update;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::broadcast;

struct Inner {
    revision: u64,
    /// The latest change of every key, removals included (like a KV bucket
    /// with history 1 keeps delete markers).
    latest: HashMap<String, Change>,
}

/// A map with revisions, TTLs and change notifications.
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
    created: OffsetDateTime,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding the lock can't leave the map half-updated
    // (every update is a single insert), so a poisoned lock is still usable.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last revision `expect` is about: one key's, or the highest among
/// the user's session keys; 0 when there is none.
fn last_revision(inner: &Inner, user_id: &str, key: &str, expect: Expect) -> u64 {
    match expect {
        Expect::Key(_) => inner.latest.get(key).map_or(0, |c| c.revision),
        Expect::Sessions(_) => {
            let sessions = format!("{}.s.", encode_key(user_id));
            inner
                .latest
                .iter()
                .filter(|(key, _)| key.starts_with(&sessions))
                .map(|(_, c)| c.revision)
                .max()
                .unwrap_or(0)
        }
    }
}

/// Records `update` as the next revision and tells the watchers.
fn record(
    inner: &Mutex<Inner>,
    changes: &broadcast::Sender<Change>,
    user_id: &str,
    update: Update,
) -> u64 {
    record_locked(lock(inner), changes, user_id, update)
}

fn record_locked(
    mut inner: std::sync::MutexGuard<'_, Inner>,
    changes: &broadcast::Sender<Change>,
    user_id: &str,
    update: Update,
) -> u64 {
    inner.revision += 1;
    let change = Change {
        user_id: user_id.to_owned(),
        update,
        revision: inner.revision,
        stored_at: OffsetDateTime::now_utc(),
        pending: 0,
    };
    let key = key_of(user_id, &change.update.part());
    inner.latest.insert(key, change.clone());
    let _ = changes.send(change);
    inner.revision
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(4096);
        MemoryStore {
            inner: Arc::new(Mutex::new(Inner {
                revision: 0,
                latest: HashMap::new(),
            })),
            changes,
            created: OffsetDateTime::now_utc(),
        }
    }
}

#[async_trait::async_trait]
impl PresenceStore for MemoryStore {
    async fn load(&self, user_id: &str) -> Result<Vec<Change>, StoreError> {
        let user = encode_key(user_id);
        let others = format!("{user}.");
        let inner = lock(&self.inner);
        Ok(inner
            .latest
            .iter()
            .filter(|(key, _)| **key == user || key.starts_with(&others))
            .map(|(_, change)| change.clone())
            .collect())
    }

    async fn write(
        &self,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let update = update.clone();
        let part = update.part();
        let revision = {
            // Checked and written under one lock, as the bucket does.
            let inner = lock(&self.inner);
            let expected = match expect {
                Expect::Key(r) | Expect::Sessions(r) => r,
            };
            if last_revision(&inner, user_id, &key_of(user_id, &part), expect) != expected {
                return Err(StoreError::Conflict);
            }
            record_locked(inner, &self.changes, user_id, update)
        };
        if let Some(ttl) = ttl {
            let (inner, changes, user_id) =
                (self.inner.clone(), self.changes.clone(), user_id.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(ttl).await;
                let key = key_of(&user_id, &part);
                let current = lock(&inner).latest.get(&key).map(|c| c.revision);
                if current == Some(revision) {
                    record(&inner, &changes, &user_id, Update::removal(part));
                }
            });
        }
        Ok(revision)
    }

    async fn watch(
        &self,
        start: WatchStart,
        echoes: EchoFilter,
    ) -> Result<ChangeStream, StoreError> {
        let after = match start {
            WatchStart::LatestPerKey => 0,
            WatchStart::After(revision) => revision,
        };
        let (mut replay, receiver) = {
            let inner = lock(&self.inner);
            let replay: Vec<Change> = inner
                .latest
                .values()
                .filter(|c| c.revision > after)
                .cloned()
                .collect();
            (replay, self.changes.subscribe())
        };
        replay.sort_by_key(|c| c.revision);
        let total = replay.len() as u64;
        for (i, change) in (1u64..).zip(replay.iter_mut()) {
            change.pending = total - i;
        }
        // Claimed echoes come as the NATS store gives them, so the watch's
        // handling of them is tested here too.
        let entry = move |change: Change| {
            if echoes(change.revision, &change.user_id) {
                Entry::Echo {
                    user_id: change.user_id,
                    revision: change.revision,
                    stored_at: change.stored_at,
                    pending: change.pending,
                }
            } else {
                Entry::Change(change)
            }
        };
        let replayed = replay.into_iter().map({
            let entry = entry.clone();
            move |c| Ok(entry(c))
        });
        let live = futures::stream::unfold(receiver, move |mut rx| {
            let entry = entry.clone();
            async move {
                let item = match rx.recv().await {
                    Ok(change) => Ok(entry(change)),
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(StoreError::Unavailable(
                        format!("watch fell {n} changes behind"),
                    )),
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                Some((item, rx))
            }
        });
        Ok(futures::stream::iter(replayed).chain(live).boxed())
    }

    async fn identity(&self) -> Result<BucketIdentity, StoreError> {
        let inner = lock(&self.inner);
        Ok(BucketIdentity {
            created: self.created,
            last_revision: inner.revision,
            messages: inner.latest.len() as u64,
        })
    }

    async fn first_after(&self, revision: u64) -> Result<Option<u64>, StoreError> {
        let inner = lock(&self.inner);
        Ok(inner
            .latest
            .values()
            .map(|c| c.revision)
            .filter(|r| *r > revision)
            .min())
    }

    async fn ensure_bucket(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn opened_bucket(&self) -> Option<OffsetDateTime> {
        Some(self.created)
    }

    fn connectivity(&self) -> Connectivity {
        Connectivity {
            connected: true,
            bucket_open: true,
        }
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Part;
    use crate::session::Seen;
    use crate::store::decode_every_entry;

    /// A key (or session set) that holds nothing yet.
    const NEW: Expect = Expect::Key(0);

    #[tokio::test]
    async fn writes_are_refused_when_the_bucket_moved_on() {
        let store = MemoryStore::new();
        let session = |id: &str| {
            Update::Session(
                id.into(),
                Some(Arc::new(crate::session::Session {
                    device: String::new(),
                    status: crate::model::Status::Online,
                    last_seen: OffsetDateTime::now_utc(),
                    ttl_seconds: 30,
                    node_id: "n".into(),
                })),
            )
        };
        assert_eq!(store.write("u", &seen(), None, NEW).await.unwrap(), 1);
        // A late write expecting the key empty.
        let late = store.write("u", &seen(), None, NEW).await;
        assert!(matches!(late, Err(StoreError::Conflict)));
        assert_eq!(
            store
                .write("u", &seen(), None, Expect::Key(1))
                .await
                .unwrap(),
            2
        );
        // New sessions expect the whole set of the user's sessions.
        let first = Expect::Sessions(0);
        assert_eq!(
            store.write("u", &session("a"), None, first).await.unwrap(),
            3
        );
        let raced = store.write("u", &session("b"), None, first).await;
        assert!(matches!(raced, Err(StoreError::Conflict)));
        assert_eq!(
            store
                .write("u", &session("b"), None, Expect::Sessions(3))
                .await
                .unwrap(),
            4
        );
        // Other users' sessions don't count.
        assert_eq!(
            store.write("v", &session("a"), None, first).await.unwrap(),
            5
        );
    }

    fn change(entry: Result<Entry, StoreError>) -> Change {
        match entry {
            Ok(Entry::Change(change)) => change,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn seen() -> Update {
        Update::Seen(Some(Seen {
            last_seen: OffsetDateTime::now_utc(),
            node_id: "n".into(),
        }))
    }

    #[tokio::test]
    async fn watch_replays_then_follows() {
        let store = MemoryStore::new();
        assert_eq!(store.write("a", &seen(), None, NEW).await.unwrap(), 1);
        assert_eq!(store.write("b", &seen(), None, NEW).await.unwrap(), 2);
        let mut all = store
            .watch(WatchStart::LatestPerKey, decode_every_entry())
            .await
            .unwrap();
        let mut resumed = store
            .watch(WatchStart::After(1), decode_every_entry())
            .await
            .unwrap();
        store.write("c", &seen(), None, NEW).await.unwrap();
        let seen_changes: Vec<(u64, u64)> = all
            .by_ref()
            .take(3)
            .map(|e| {
                let c = change(e);
                (c.revision, c.pending)
            })
            .collect()
            .await;
        assert_eq!(seen_changes, [(1, 1), (2, 0), (3, 0)]);
        let revs: Vec<u64> = resumed
            .by_ref()
            .take(2)
            .map(|e| change(e).revision)
            .collect()
            .await;
        assert_eq!(revs, [2, 3]);
        assert_eq!(store.load("b").await.unwrap().len(), 1);
        assert!(store.load("zz").await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_with_a_ttl_is_removed_unless_rewritten() {
        let store = MemoryStore::new();
        let session = Part::Session("s".into());
        let mut changes = store
            .watch(WatchStart::LatestPerKey, decode_every_entry())
            .await
            .unwrap();
        store
            .write("u", &seen(), Some(Duration::from_secs(5)), NEW)
            .await
            .unwrap();
        store
            .write(
                "u",
                &Update::removal(session.clone()),
                Some(Duration::from_secs(1)),
                NEW,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Rewritten before it expired: the first TTL no longer applies.
        store
            .write("u", &seen(), Some(Duration::from_secs(10)), Expect::Key(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        let revisions: Vec<(u64, bool)> = changes
            .by_ref()
            .take(5)
            .map(|e| {
                let c = change(e);
                (
                    c.revision,
                    matches!(c.update, Update::Seen(None) | Update::Session(_, None)),
                )
            })
            .collect()
            .await;
        assert_eq!(
            revisions,
            [(1, false), (2, true), (3, true), (4, false), (5, true)]
        );
    }
}
