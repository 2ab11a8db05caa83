//! The read and write paths shared by every handler: cache first, store on a
//! miss; writes acknowledged by the store before they are answered.

use crate::cache::{Applied, PresenceCache};
use crate::event_log::{EventLog, visible_change};
use crate::model::{Presence, ValidUpdate};
use crate::record::{PresenceView, Update, UserRecord};
use crate::session::{MAX_SESSIONS_PER_USER, Seen, ValidHeartbeat};
use crate::store::{Change, PresenceStore, StoreError};
use crate::watch::WatchStatus;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// How many KV operations one request keeps in flight at once.
pub const PIPELINE_DEPTH: usize = 256;

/// Why a session operation was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "user {0:?} already has {MAX_SESSIONS_PER_USER} live sessions; end one or let it expire"
    )]
    TooManySessions(String),
    #[error("user {user_id:?} has no live session {session_id:?}")]
    NotFound { user_id: String, session_id: String },
}

/// Reads and writes presences for one node.
#[derive(Clone)]
pub struct PresenceService {
    store: Arc<dyn PresenceStore>,
    cache: PresenceCache,
    watch: Arc<WatchStatus>,
    node_id: Arc<str>,
    log: Arc<EventLog>,
}

impl PresenceService {
    /// Wires the cache, the store, the watch status and the event log together.
    pub fn new(
        store: Arc<dyn PresenceStore>,
        cache: PresenceCache,
        watch: Arc<WatchStatus>,
        node_id: &str,
        log: Arc<EventLog>,
    ) -> Self {
        PresenceService {
            store,
            cache,
            watch,
            node_id: node_id.into(),
            log,
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

    /// Everything known about a user: from the cache, else from the store
    /// (and then cached, including the fact that there is nothing).
    pub async fn record(&self, user_id: &str) -> Result<Arc<UserRecord>, StoreError> {
        if !self.watch.replaying() {
            if let Some(slot) = self.cache.get(user_id).await {
                return Ok(slot.record);
            }
            if self.cache.is_replica() {
                return Ok(Arc::new(UserRecord::default()));
            }
        }
        self.cache.begin_load(user_id).await;
        let changes = self.store.load(user_id).await?;
        Ok(self.cache.finish_load(user_id, changes).await)
    }

    /// One user's effective presence now; `None` if nothing is stored.
    pub async fn get(&self, user_id: &str) -> Result<Option<PresenceView>, StoreError> {
        let record = self.record(user_id).await?;
        Ok(record.view(user_id, OffsetDateTime::now_utc()))
    }

    /// Several users at once; cache misses go to the store concurrently.
    pub async fn get_many(
        &self,
        user_ids: &[String],
    ) -> Vec<Result<Option<PresenceView>, StoreError>> {
        futures::stream::iter(user_ids.iter().cloned())
            .map(|id| async move { self.get(&id).await })
            .buffered(PIPELINE_DEPTH)
            .collect()
            .await
    }

    /// Several users' records at once, for change streams.
    pub async fn records(&self, user_ids: &[String]) -> Result<Vec<Arc<UserRecord>>, StoreError> {
        futures::stream::iter(user_ids.iter().cloned())
            .map(|id| async move { self.record(&id).await })
            .buffered(PIPELINE_DEPTH)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Writes one update and applies it to this node's cache at once, so
    /// the writer reads its own write before the watch echoes it.
    async fn write(
        &self,
        user_id: &str,
        update: Update,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let revision = self.store.write(user_id, &update, ttl).await?;
        let change = Change {
            user_id: user_id.to_owned(),
            update,
            revision,
            stored_at: OffsetDateTime::now_utc(),
            pending: 0,
        };
        if let Applied::Changed { before, after } = self.cache.apply(&change, false).await
            && let Some(view) = visible_change(user_id, &before, &after)
        {
            self.log.note_local(revision, view);
        }
        Ok(())
    }

    /// Writes a key together with the user's durable `seen` time; both are
    /// acknowledged before this returns.
    async fn write_with_seen(
        &self,
        user_id: &str,
        update: Update,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let seen = Update::Seen(Some(Seen {
            last_seen: now,
            node_id: self.node_id.to_string(),
        }));
        let (first, second) = futures::future::join(
            self.write(user_id, update, ttl),
            self.write(user_id, seen, None),
        )
        .await;
        first.and(second)
    }

    async fn view_after_write(&self, user_id: &str) -> Result<PresenceView, StoreError> {
        let now = OffsetDateTime::now_utc();
        let record = self.record(user_id).await?;
        Ok(record
            .view(user_id, now)
            .unwrap_or_else(|| PresenceView::unknown(user_id)))
    }

    /// Stores a manual status stamped by this node; answers only after the
    /// store acknowledged it. One with `expiresAt` is stored with a TTL and
    /// also records the sign of life durably, as it will vanish.
    pub async fn set(&self, update: ValidUpdate) -> Result<PresenceView, StoreError> {
        let now = OffsetDateTime::now_utc();
        let ttl = update.ttl(now);
        let user_id = update.user_id.clone();
        let presence = Presence::accepted(update, &self.node_id, now);
        let last_seen = presence.last_seen;
        let manual = Update::Manual(Some(Arc::new(presence)));
        match ttl {
            Some(ttl) => {
                self.write_with_seen(&user_id, manual, Some(ttl), last_seen)
                    .await?
            }
            None => self.write(&user_id, manual, None).await?,
        }
        self.view_after_write(&user_id).await
    }

    /// Stores many updates with up to [`PIPELINE_DEPTH`] writes in flight,
    /// returning one result per update in input order.
    pub async fn set_many(
        &self,
        updates: Vec<ValidUpdate>,
    ) -> Vec<Result<PresenceView, StoreError>> {
        futures::stream::iter(updates)
            .map(|update| self.set(update))
            .buffered(PIPELINE_DEPTH)
            .collect()
            .await
    }

    /// Creates or refreshes a session lease. The bucket removes the key
    /// `ttlSeconds` after the last heartbeat, whichever node took it.
    pub async fn heartbeat(&self, heartbeat: ValidHeartbeat) -> Result<PresenceView, SessionError> {
        let now = OffsetDateTime::now_utc();
        let user_id = heartbeat.user_id.as_str();
        let record = self.record(user_id).await?;
        if !record.has_live_session(&heartbeat.session_id, now)
            && record.live_sessions(now).count() >= MAX_SESSIONS_PER_USER
        {
            return Err(SessionError::TooManySessions(user_id.to_owned()));
        }
        let session = heartbeat.session(&self.node_id, now);
        let last_seen = session.last_seen;
        let update = Update::Session(heartbeat.session_id.clone(), Some(Arc::new(session)));
        self.write_with_seen(user_id, update, Some(heartbeat.ttl()), last_seen)
            .await?;
        Ok(self.view_after_write(user_id).await?)
    }

    /// Ends a live session at once.
    pub async fn end_session(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<PresenceView, SessionError> {
        let now = OffsetDateTime::now_utc();
        let record = self.record(user_id).await?;
        if !record.has_live_session(session_id, now) {
            return Err(SessionError::NotFound {
                user_id: user_id.to_owned(),
                session_id: session_id.to_owned(),
            });
        }
        let removal = Update::Session(session_id.to_owned(), None);
        let now = crate::model::truncate_to_millis(now);
        self.write_with_seen(
            user_id,
            removal,
            Some(presence_contract::bucket::ENDED_SESSION_MARKER_TTL),
            now,
        )
        .await?;
        Ok(self.view_after_write(user_id).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::Status;
    use crate::session::{HeartbeatRequest, validate_heartbeat};
    use crate::store::memory::MemoryStore;

    fn service() -> PresenceService {
        let cache = PresenceCache::new(1 << 20, 16, Metrics::new().unwrap().cache);
        let store = Arc::new(MemoryStore::new());
        let log = Arc::new(EventLog::default());
        PresenceService::new(store, cache, Arc::new(WatchStatus::default()), "n1", log)
    }

    fn beat(session: &str, status: &str) -> ValidHeartbeat {
        let request = HeartbeatRequest {
            status: Some(status.into()),
            device: None,
            ttl_seconds: Some(60.into()),
        };
        validate_heartbeat("u", session, request).unwrap()
    }

    #[tokio::test]
    async fn a_user_holds_a_bounded_number_of_sessions() {
        let service = service();
        for i in 0..MAX_SESSIONS_PER_USER {
            service
                .heartbeat(beat(&format!("s{i}"), "away"))
                .await
                .unwrap();
        }
        let refused = service.heartbeat(beat("one-too-many", "online")).await;
        assert!(matches!(refused, Err(SessionError::TooManySessions(_))));
        // Refreshing a live session is always allowed.
        let view = service.heartbeat(beat("s0", "online")).await.unwrap();
        assert_eq!(view.status, Status::Online);
        let view = service.end_session("u", "s0").await.unwrap();
        assert_eq!(
            (view.status, view.sessions.len()),
            (Status::Away, MAX_SESSIONS_PER_USER - 1)
        );
        let again = service.end_session("u", "s0").await;
        assert!(matches!(again, Err(SessionError::NotFound { .. })));
        service.heartbeat(beat("one-more", "online")).await.unwrap();
    }
}
