//! A single-process store for trying the API without NATS (`--store memory`)
//! and for unit tests. It keeps KV semantics: increasing revisions, and a
//! watch that replays then follows.

use super::{
    BucketIdentity, Change, ChangeStream, Connectivity, PresenceStore, StoreError, WatchStart,
};
use crate::model::Presence;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Mutex;
use time::OffsetDateTime;
use tokio::sync::broadcast;

struct Inner {
    revision: u64,
    values: HashMap<String, Presence>,
}

/// A map with revisions and change notifications.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    created: OffsetDateTime,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(4096);
        MemoryStore {
            inner: Mutex::new(Inner {
                revision: 0,
                values: HashMap::new(),
            }),
            changes,
            created: OffsetDateTime::now_utc(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock can't leave the map half-updated
        // (every update is a single insert), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl PresenceStore for MemoryStore {
    async fn get(&self, user_id: &str) -> Result<Option<Presence>, StoreError> {
        Ok(self.lock().values.get(user_id).cloned())
    }

    async fn put(&self, presence: &Presence) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        inner.revision += 1;
        let mut stored = presence.clone();
        stored.revision = inner.revision;
        inner.values.insert(stored.user_id.clone(), stored.clone());
        let _ = self.changes.send(Change {
            user_id: stored.user_id.clone(),
            revision: stored.revision,
            presence: Some(stored),
            stored_at: OffsetDateTime::now_utc(),
        });
        Ok(inner.revision)
    }

    async fn watch(&self, start: WatchStart) -> Result<ChangeStream, StoreError> {
        let after = match start {
            WatchStart::LatestPerKey => 0,
            WatchStart::After(revision) => revision,
        };
        let (mut replay, receiver) = {
            let inner = self.lock();
            let replay: Vec<Change> = inner
                .values
                .values()
                .filter(|p| p.revision > after)
                .map(|p| Change {
                    user_id: p.user_id.clone(),
                    revision: p.revision,
                    presence: Some(p.clone()),
                    stored_at: p.updated_at,
                })
                .collect();
            (replay, self.changes.subscribe())
        };
        replay.sort_by_key(|c| c.revision);
        let live = futures::stream::unfold(receiver, |mut rx| async move {
            match rx.recv().await {
                Ok(change) => Some((Ok(change), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((
                    Err(StoreError::Unavailable(format!(
                        "watch fell {n} changes behind"
                    ))),
                    rx,
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(futures::stream::iter(replay.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }

    async fn identity(&self) -> Result<BucketIdentity, StoreError> {
        Ok(BucketIdentity {
            created: self.created,
            last_revision: self.lock().revision,
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
    use crate::model::{Status, ValidUpdate};

    fn presence(user: &str) -> Presence {
        Presence::accepted(
            ValidUpdate {
                user_id: user.into(),
                status: Status::Away,
                message: String::new(),
            },
            "n",
            OffsetDateTime::now_utc(),
        )
    }

    #[tokio::test]
    async fn watch_replays_then_follows() {
        let store = MemoryStore::new();
        assert_eq!(store.put(&presence("a")).await.unwrap(), 1);
        assert_eq!(store.put(&presence("b")).await.unwrap(), 2);
        let mut all = store.watch(WatchStart::LatestPerKey).await.unwrap();
        let mut resumed = store.watch(WatchStart::After(1)).await.unwrap();
        store.put(&presence("c")).await.unwrap();
        let revs: Vec<u64> = all
            .by_ref()
            .take(3)
            .map(|c| c.unwrap().revision)
            .collect()
            .await;
        assert_eq!(revs, [1, 2, 3]);
        let revs: Vec<u64> = resumed
            .by_ref()
            .take(2)
            .map(|c| c.unwrap().revision)
            .collect()
            .await;
        assert_eq!(revs, [2, 3]);
        assert_eq!(store.get("b").await.unwrap().unwrap().revision, 2);
        assert!(store.get("zz").await.unwrap().is_none());
    }
}
