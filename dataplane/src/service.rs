//! The read and write paths shared by every handler: cache first, store on a
//! miss; writes acknowledged by the store before they are answered.

use crate::cache::PresenceCache;
use crate::model::{Presence, ValidUpdate};
use crate::store::{PresenceStore, StoreError};
use crate::sync::SyncStatus;
use futures::StreamExt;
use std::sync::Arc;
use time::OffsetDateTime;

/// How many KV operations one request keeps in flight at once.
pub const PIPELINE_DEPTH: usize = 256;

/// Reads and writes presences for one node.
#[derive(Clone)]
pub struct PresenceService {
    store: Arc<dyn PresenceStore>,
    cache: PresenceCache,
    sync: Arc<SyncStatus>,
    node_id: Arc<str>,
}

impl PresenceService {
    /// Wires the cache, the store and the watch status together.
    pub fn new(
        store: Arc<dyn PresenceStore>,
        cache: PresenceCache,
        sync: Arc<SyncStatus>,
        node_id: &str,
    ) -> Self {
        PresenceService {
            store,
            cache,
            sync,
            node_id: node_id.into(),
        }
    }

    /// The store, for health checks.
    pub fn store(&self) -> &Arc<dyn PresenceStore> {
        &self.store
    }

    /// The cache, for metrics.
    pub fn cache(&self) -> &PresenceCache {
        &self.cache
    }

    /// One user's presence: from the cache, else from the store (and then
    /// cached, including the fact that there is none).
    pub async fn get(&self, user_id: &str) -> Result<Option<Arc<Presence>>, StoreError> {
        if let Some(slot) = self.cache.get(user_id).await {
            return Ok(slot.presence);
        }
        // Any change after this revision will still arrive through the watch
        // and replace what we cache here, so caching a miss at it is safe.
        let floor = self.sync.applied_revision();
        match self.store.get(user_id).await? {
            Some(presence) => {
                let revision = presence.revision;
                let presence = Arc::new(presence);
                self.cache
                    .apply(user_id, revision, Some(presence.clone()))
                    .await;
                Ok(Some(presence))
            }
            None => {
                self.cache.apply(user_id, floor, None).await;
                Ok(None)
            }
        }
    }

    /// Several users at once; cache misses go to the store concurrently.
    pub async fn get_many(
        &self,
        user_ids: &[String],
    ) -> Vec<Result<Option<Arc<Presence>>, StoreError>> {
        futures::stream::iter(user_ids.iter().cloned())
            .map(|id| async move { self.get(&id).await })
            .buffered(PIPELINE_DEPTH)
            .collect()
            .await
    }

    /// Stores an update stamped by this node; answers only after the store
    /// acknowledged it, and updates this node's cache at once so the writer
    /// reads its own write.
    pub async fn set(&self, update: ValidUpdate) -> Result<Arc<Presence>, StoreError> {
        let mut presence = Presence::accepted(update, &self.node_id, OffsetDateTime::now_utc());
        presence.revision = self.store.put(&presence).await?;
        let presence = Arc::new(presence);
        self.cache
            .apply(&presence.user_id, presence.revision, Some(presence.clone()))
            .await;
        Ok(presence)
    }

    /// Stores many updates with up to [`PIPELINE_DEPTH`] writes in flight,
    /// returning one result per update in input order.
    pub async fn set_many(
        &self,
        updates: Vec<ValidUpdate>,
    ) -> Vec<Result<Arc<Presence>, StoreError>> {
        futures::stream::iter(updates)
            .map(|update| self.set(update))
            .buffered(PIPELINE_DEPTH)
            .collect()
            .await
    }
}
