//! A single-process store for trying the API without NATS (`--store memory`)
//! and for unit tests. It keeps KV semantics: increasing revisions, and a
//! watch that replays then follows.

use super::{
    BucketIdentity, Change, ChangeStream, Connectivity, Entry, PresenceStore, StoreError,
    WatchStart,
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

/// Records `update` as the next revision and tells the watchers.
fn record(
    inner: &Mutex<Inner>,
    changes: &broadcast::Sender<Change>,
    user_id: &str,
    update: Update,
) -> u64 {
    let mut inner = lock(inner);
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
    ) -> Result<u64, StoreError> {
        let mut update = update.clone();
        if let Update::Manual(Some(presence)) = &mut update {
            // The stored value never carries a revision; the store assigns it.
            std::sync::Arc::make_mut(presence).revision = 0;
        }
        let part = update.part();
        let revision = record(&self.inner, &self.changes, user_id, update);
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

    async fn watch(&self, start: WatchStart) -> Result<ChangeStream, StoreError> {
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
        let live = futures::stream::unfold(receiver, |mut rx| async move {
            match rx.recv().await {
                Ok(change) => Some((Ok(Entry::Change(change)), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((
                    Err(StoreError::Unavailable(format!(
                        "watch fell {n} changes behind"
                    ))),
                    rx,
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(
            futures::stream::iter(replay.into_iter().map(|c| Ok(Entry::Change(c))))
                .chain(live)
                .boxed(),
        )
    }

    async fn identity(&self) -> Result<BucketIdentity, StoreError> {
        let inner = lock(&self.inner);
        Ok(BucketIdentity {
            created: self.created,
            last_revision: inner.revision,
            messages: inner.latest.len() as u64,
        })
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
        assert_eq!(store.write("a", &seen(), None).await.unwrap(), 1);
        assert_eq!(store.write("b", &seen(), None).await.unwrap(), 2);
        let mut all = store.watch(WatchStart::LatestPerKey).await.unwrap();
        let mut resumed = store.watch(WatchStart::After(1)).await.unwrap();
        store.write("c", &seen(), None).await.unwrap();
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
        let mut changes = store.watch(WatchStart::LatestPerKey).await.unwrap();
        store
            .write("u", &seen(), Some(Duration::from_secs(5)))
            .await
            .unwrap();
        store
            .write(
                "u",
                &Update::removal(session.clone()),
                Some(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Rewritten before it expired: the first TTL no longer applies.
        store
            .write("u", &seen(), Some(Duration::from_secs(10)))
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
