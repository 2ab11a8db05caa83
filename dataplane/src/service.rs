//! The read and write paths shared by every handler: cache first, store on a
//! miss; writes acknowledged by the store before they are answered.
//!
//! Every write names the revision it expects the bucket to hold for the key
//! (or, for a new session, for all of the user's sessions), and the bucket
//! checks it on arrival. So a write we answered 503 for can't land later
//! over a newer one, and concurrent new sessions can't pass the per-user
//! cap. When another write got there first, the user is read again from the
//! bucket and the write decided again (a set still overwrites; a `seen`
//! only moves forward; a new session is counted again).

use crate::cache::{Applied, PresenceCache};
use crate::event_log::{EventLog, visible_change};
use crate::keys::Part;
use crate::metrics::Metrics;
use crate::model::{Presence, ValidUpdate};
use crate::node_id::NodeId;
use crate::record::{PresenceView, Update, UserRecord};
use crate::session::{MAX_SESSIONS_PER_USER, Seen, ValidHeartbeat};
use crate::store::{Change, Expect, PresenceStore, StoreError};
use crate::watch::WatchStatus;
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// How many KV operations one request keeps in flight at once.
pub const PIPELINE_DEPTH: usize = 256;
/// How many writes a batch keeps in flight: all of a full batch (the API
/// caps it at 1000 items), sent before the first acknowledgement is awaited,
/// as a pipelining client would.
pub const BATCH_PIPELINE_DEPTH: usize = 1000;
/// How many times a write is tried while other writes keep changing the
/// user first; then it fails with [`StoreError::Conflict`].
pub const WRITE_ATTEMPTS: u32 = 8;

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
    node_id: NodeId,
    log: Arc<EventLog>,
    metrics: Metrics,
    /// One lock per user creating sessions on this node, so its new
    /// sessions are counted one at a time here instead of racing each
    /// other in the bucket (other nodes' still race, and are refused).
    new_sessions: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
}

/// What a write left in this node's cache: what its answer is built from.
enum Written {
    /// Nothing needed writing.
    Nothing,
    /// The cache took the write: the user's record right after it.
    Cached(Arc<UserRecord>),
    /// Written, but the cache had it (or something newer) already, or does
    /// not hold the user completely.
    Elsewhere,
}

impl Written {
    /// What two writes of one request left together: the record of the
    /// only one the cache took, else unknown (the two raced, so neither
    /// record need hold both).
    fn and(self, other: Written) -> Written {
        match (self, other) {
            (Written::Nothing, other) | (other, Written::Nothing) => other,
            _ => Written::Elsewhere,
        }
    }
}

/// What to store for a user, decided from what is known of the user.
enum Plan {
    /// Store `update` if the bucket still holds what `expect` says.
    Write {
        update: Update,
        expect: Expect,
        ttl: Option<Duration>,
    },
    /// Nothing to write: the bucket already holds something as new.
    Nothing,
}

impl PresenceService {
    /// Wires the cache, the store, the watch status and the event log together.
    pub fn new(
        store: Arc<dyn PresenceStore>,
        cache: PresenceCache,
        watch: Arc<WatchStatus>,
        node_id: &str,
        log: Arc<EventLog>,
        metrics: Metrics,
    ) -> Self {
        PresenceService {
            store,
            cache,
            watch,
            node_id: NodeId::new(node_id),
            log,
            metrics,
            new_sessions: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(60))
                .build(),
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
        match self.cached_record(user_id) {
            Some(record) => Ok(record),
            None => self.load_record(user_id).await,
        }
    }

    /// What the cache alone can say about a user: its record, an empty one
    /// when the cache is a replica of the bucket, `None` when only the
    /// store can tell (or the start-up replay is still running).
    fn cached_record(&self, user_id: &str) -> Option<Arc<UserRecord>> {
        if self.watch.replaying() {
            return None;
        }
        self.cache.known(user_id)
    }

    /// Reads a user from the store into the cache.
    async fn load_record(&self, user_id: &str) -> Result<Arc<UserRecord>, StoreError> {
        let reservation = self.cache.begin_load(user_id);
        let changes = self.store.load(user_id).await?;
        Ok(reservation.finish(changes))
    }

    /// One user's effective presence now as JSON (what `GET` answers);
    /// `None` if nothing is stored. A cached user's JSON is made once and
    /// reused until the user changes or something in it expires.
    pub async fn get_json(&self, user_id: &str) -> Result<Option<Bytes>, StoreError> {
        let record = self.record(user_id).await?;
        json_of(&record, user_id, OffsetDateTime::now_utc())
    }

    /// Several users' JSON at once, as of one instant. Cached users are
    /// answered in one pass (no task per user); the misses then go to the
    /// store concurrently.
    pub async fn get_many_json(&self, user_ids: &[&str]) -> Vec<Result<Option<Bytes>, StoreError>> {
        let now = OffsetDateTime::now_utc();
        let mut results = Vec::with_capacity(user_ids.len());
        let mut misses = Vec::new();
        for (i, id) in user_ids.iter().enumerate() {
            match self.cached_record(id) {
                Some(record) => results.push(json_of(&record, id, now)),
                None => {
                    results.push(Ok(None));
                    misses.push(i);
                }
            }
        }
        // Owned: a stream of futures borrowing the IDs is not `Send` to
        // the compiler (a higher-ranked lifetime); misses are the rare case.
        let missed: Vec<String> = misses.iter().map(|&i| user_ids[i].to_owned()).collect();
        let loaded: Vec<_> = futures::stream::iter(missed)
            .map(|id| async move {
                let record = self.load_record(&id).await?;
                json_of(&record, &id, now)
            })
            .buffered(PIPELINE_DEPTH)
            .collect()
            .await;
        for (i, result) in misses.into_iter().zip(loaded) {
            results[i] = result;
        }
        results
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

    /// The user as the bucket holds it now, bypassing the cache: what a
    /// write that lost a race decides again from.
    async fn fresh_record(&self, user_id: &str) -> Result<Arc<UserRecord>, StoreError> {
        let mut record = UserRecord::default();
        for change in self.store.load(user_id).await? {
            record.merge(change.update, change.revision);
        }
        Ok(Arc::new(record))
    }

    /// Writes what `plan` decides from the user's record, expecting the
    /// bucket to hold what the record says. When another write got there
    /// first, decides again from the bucket's current state, up to
    /// [`WRITE_ATTEMPTS`] times. The written update is applied to this
    /// node's cache at once, so the writer reads its own write before the
    /// watch echoes it.
    async fn write_planned<E, F>(&self, user_id: &str, plan: F) -> Result<Written, E>
    where
        E: From<StoreError>,
        F: FnMut(&UserRecord) -> Result<Plan, E>,
    {
        let record = self.record(user_id).await?;
        self.write_planned_from(user_id, record, plan).await
    }

    /// [`PresenceService::write_planned`] from a record the caller read
    /// already, so a request that checked the cache doesn't look twice.
    async fn write_planned_from<E, F>(
        &self,
        user_id: &str,
        mut record: Arc<UserRecord>,
        mut plan: F,
    ) -> Result<Written, E>
    where
        E: From<StoreError>,
        F: FnMut(&UserRecord) -> Result<Plan, E>,
    {
        let mut attempt = 1;
        loop {
            let (update, expect, ttl) = match plan(&record)? {
                Plan::Nothing => return Ok(Written::Nothing),
                Plan::Write {
                    update,
                    expect,
                    ttl,
                } => (update, expect, ttl),
            };
            match self.store.write(user_id, &update, ttl, expect).await {
                Ok(revision) => return Ok(self.apply_own(user_id, update, revision)),
                Err(StoreError::Conflict) => {
                    self.metrics.write_conflicts.inc();
                    if attempt == WRITE_ATTEMPTS {
                        return Err(StoreError::Conflict.into());
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    record = self.fresh_record(user_id).await?;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Applies this node's own acknowledged write to its cache.
    fn apply_own(&self, user_id: &str, update: Update, revision: u64) -> Written {
        let change = Change {
            user_id: user_id.to_owned(),
            update,
            revision,
            stored_at: OffsetDateTime::now_utc(),
            pending: 0,
        };
        let note = |applied: &Applied| {
            if let Applied::Changed { before, after } = applied
                && let Some(view) = visible_change(user_id, before, after)
            {
                self.log.note_local(revision, view);
            }
        };
        match self.cache.apply_own(&change, note) {
            Applied::Changed { after, .. } => Written::Cached(after),
            Applied::Stale | Applied::Unknown => Written::Elsewhere,
        }
    }

    /// Writes `update` over whatever the key holds (the last writer wins),
    /// but never over a value this node has not seen.
    async fn overwrite(
        &self,
        user_id: &str,
        update: Update,
        ttl: Option<Duration>,
    ) -> Result<Written, StoreError> {
        let part = update.part();
        self.write_planned(user_id, |record| {
            Ok(Plan::Write {
                update: update.clone(),
                expect: Expect::Key(record.key_revision(&part)),
                ttl,
            })
        })
        .await
    }

    /// Records a sign of life at `at` in the durable `seen` key, unless one
    /// no more than `resolution` earlier is stored already: `seen` only
    /// moves forward, and with a `resolution` not on every heartbeat.
    async fn write_seen(
        &self,
        user_id: &str,
        at: OffsetDateTime,
        resolution: Duration,
    ) -> Result<Written, StoreError> {
        let record = self.record(user_id).await?;
        self.write_seen_from(user_id, record, self.seen_here(at), resolution)
            .await
    }

    /// A sign of life at `at`, taken by this node.
    fn seen_here(&self, at: OffsetDateTime) -> Seen {
        Seen {
            last_seen: at,
            node_id: self.node_id.clone(),
        }
    }

    /// [`PresenceService::write_seen`] from a record read already, for a
    /// sign of life taken by the node `seen` names.
    async fn write_seen_from(
        &self,
        user_id: &str,
        record: Arc<UserRecord>,
        seen: Seen,
        resolution: Duration,
    ) -> Result<Written, StoreError> {
        let at = seen.last_seen;
        let recent = |record: &UserRecord| {
            record
                .seen_at()
                .is_some_and(|stored| stored >= at - resolution)
        };
        if recent(&record) {
            return Ok(Written::Nothing);
        }
        let seen = Update::Seen(Some(seen));
        self.write_planned_from(user_id, record, |record| {
            Ok(if recent(record) {
                Plan::Nothing
            } else {
                Plan::Write {
                    update: seen.clone(),
                    expect: Expect::Key(record.key_revision(&Part::Seen)),
                    ttl: None,
                }
            })
        })
        .await
    }

    /// The answer to a write: the user as the write left the cache, when
    /// it did (no second lookup), else as the cache or the store says now.
    async fn view_after_write(
        &self,
        user_id: &str,
        written: Written,
    ) -> Result<PresenceView, StoreError> {
        let record = match written {
            Written::Cached(record) => record,
            Written::Nothing | Written::Elsewhere => self.record(user_id).await?,
        };
        Ok(record
            .view(user_id, OffsetDateTime::now_utc())
            .unwrap_or_else(|| PresenceView::unknown(user_id)))
    }

    /// Stores a manual status stamped by this node; answers only after the
    /// store acknowledged it. One with `expiresAt` is stored with a TTL and
    /// also records the sign of life durably, as it will vanish.
    pub async fn set(&self, update: ValidUpdate) -> Result<PresenceView, StoreError> {
        let now = OffsetDateTime::now_utc();
        let ttl = update.ttl(now);
        let user_id = update.user_id.clone();
        let presence = Presence::accepted(update, self.node_id.clone(), now);
        let last_seen = presence.last_seen();
        let manual = Update::Manual(Some(presence));
        let written = match ttl {
            Some(ttl) => {
                let (first, second) = futures::future::join(
                    self.overwrite(&user_id, manual, Some(ttl)),
                    self.write_seen(&user_id, last_seen, Duration::ZERO),
                )
                .await;
                first?.and(second?)
            }
            None => self.overwrite(&user_id, manual, None).await?,
        };
        self.view_after_write(&user_id, written).await
    }

    /// Removes the user's manual status, as if it expired now: the status
    /// then follows the user's sessions (offline without any), and
    /// `lastSeen` keeps the manual status's sign of life. Without a manual
    /// status nothing is written; `None` for a user the bucket knows
    /// nothing of.
    pub async fn clear(&self, user_id: &str) -> Result<Option<PresenceView>, StoreError> {
        let record = self.record(user_id).await?;
        let Some(manual) = record.manual_status() else {
            return Ok(record.view(user_id, OffsetDateTime::now_utc()));
        };
        // The status's own sign of life, under the node that took it: like
        // an expiry, a clear changes neither `updatedAt` nor `nodeID`. (A
        // status another writer stored without a node ID is kept under
        // this node's, rather than under none.)
        let kept = Seen {
            last_seen: manual.last_seen(),
            node_id: if manual.node_id.is_empty() {
                self.node_id.clone()
            } else {
                manual.node_id.clone()
            },
        };
        let last_seen = kept.last_seen;
        // The status whose sign of life is kept below: only it is removed.
        let cleared = record.key_revision(&Part::Manual);
        // `seen` first, as when a session ends: if the removal fails, a
        // retry finds the status still set and clears it, and `lastSeen`
        // survives the removal either way.
        let seen = self
            .write_seen_from(user_id, record, kept, Duration::ZERO)
            .await?;
        // The record that showed a newer status, if one did: the answer.
        let mut newer = None;
        let removal = self
            .write_planned(user_id, |record| {
                let same = record.key_revision(&Part::Manual) == cleared;
                Ok::<_, StoreError>(if same && record.manual_status().is_some() {
                    Plan::Write {
                        update: Update::Manual(None),
                        expect: Expect::Key(cleared),
                        // No TTL: unlike every other removal, nothing else
                        // ends a status without `expiresAt`, so a node that
                        // missed the marker (a leaf cut off for longer than
                        // a marker TTL) would show the status for good.
                        // One marker per user at most.
                        ttl: None,
                    }
                } else {
                    // A status set since is newer than this clear: it stays.
                    newer = Some(record.clone());
                    Plan::Nothing
                })
            })
            .await?;
        if let Some(record) = newer {
            let now = OffsetDateTime::now_utc();
            return Ok(record.view(user_id, now));
        }
        let written = match removal {
            Written::Nothing => seen,
            removed => removed,
        };
        let mut view = self.view_after_write(user_id, written).await?;
        // The bucket's `seen` is at least `last_seen` now, but when another
        // node stored one as new first, this cache learns it only from the
        // watch: the answer doesn't wait for that.
        view.last_seen = view.last_seen.max(Some(last_seen));
        view.updated_at = view.updated_at.max(Some(last_seen));
        Ok(Some(view))
    }

    /// Stores many updates with up to [`BATCH_PIPELINE_DEPTH`] writes in
    /// flight, returning one result per update in input order.
    pub async fn set_many(
        &self,
        updates: Vec<ValidUpdate>,
    ) -> Vec<Result<PresenceView, StoreError>> {
        futures::stream::iter(updates)
            .map(|update| self.set(update))
            .buffered(BATCH_PIPELINE_DEPTH)
            .collect()
            .await
    }

    /// Creates or refreshes a session lease. The bucket removes the key
    /// `ttlSeconds` after the last heartbeat, whichever node took it.
    ///
    /// The durable `seen` key is written only when it lags this heartbeat
    /// by more than the lease length, so most heartbeats are one KV write;
    /// every node following the user keeps `lastSeen` exact from the
    /// session values themselves (see `UserRecord::view`).
    ///
    /// A refresh expects the session's own revision; a new session expects
    /// the user's whole set of sessions unchanged since they were counted,
    /// so the cap of [`MAX_SESSIONS_PER_USER`] holds however many nodes take
    /// new sessions at once.
    pub async fn heartbeat(&self, heartbeat: ValidHeartbeat) -> Result<PresenceView, SessionError> {
        let now = OffsetDateTime::now_utc();
        let user_id = heartbeat.user_id.as_str();
        let session = heartbeat.session(self.node_id.clone(), now);
        let last_seen = session.last_seen;
        let part = Part::Session(heartbeat.session_id.clone());
        let update = Update::Session(heartbeat.session_id.clone(), Some(Arc::new(session)));
        let plan = |record: &UserRecord| {
            let expect = if record.has_live_session(&heartbeat.session_id, now) {
                Expect::Key(record.key_revision(&part))
            } else if record.live_sessions(now).count() >= MAX_SESSIONS_PER_USER {
                return Err(SessionError::TooManySessions(user_id.to_owned()));
            } else {
                Expect::Sessions(record.sessions_revision())
            };
            Ok(Plan::Write {
                update: update.clone(),
                expect,
                ttl: Some(heartbeat.ttl()),
            })
        };
        // Refused without writing anything when the cache already says so.
        let known = self.record(user_id).await?;
        let new = match plan(&known)? {
            Plan::Write { expect, .. } => matches!(expect, Expect::Sessions(_)),
            Plan::Nothing => false,
        };
        let lock = new.then(|| {
            self.new_sessions
                .get_with_by_ref(user_id, || Arc::new(tokio::sync::Mutex::new(())))
        });
        let _one_at_a_time = match &lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        // The record read above, unless waiting for the lock let another
        // heartbeat change it.
        let record = match lock {
            Some(_) => self.record(user_id).await?,
            None => known,
        };
        let (first, second) = futures::future::join(
            self.write_planned_from(user_id, record.clone(), plan),
            self.write_seen_from(user_id, record, self.seen_here(last_seen), heartbeat.ttl()),
        )
        .await;
        let written = first?.and(second?);
        Ok(self.view_after_write(user_id, written).await?)
    }

    /// Ends a live session at once.
    pub async fn end_session(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<PresenceView, SessionError> {
        let now = OffsetDateTime::now_utc();
        let part = Part::Session(session_id.to_owned());
        let removal = Update::Session(session_id.to_owned(), None);
        let plan = |record: &UserRecord| {
            if !record.has_live_session(session_id, now) {
                return Err(SessionError::NotFound {
                    user_id: user_id.to_owned(),
                    session_id: session_id.to_owned(),
                });
            }
            Ok(Plan::Write {
                update: removal.clone(),
                expect: Expect::Key(record.key_revision(&part)),
                ttl: Some(presence_contract::bucket::ENDED_SESSION_MARKER_TTL),
            })
        };
        // Not found without writing anything when the cache already says so.
        plan(&*self.record(user_id).await?)?;
        let now = crate::model::truncate_to_millis(now);
        // `seen` first, then the removal: if the removal fails, a retry
        // finds the session live and ends it. The other way round, a retry
        // after a failed `seen` would find the session gone (404), and the
        // end's time would never be recorded.
        let seen = self.write_seen(user_id, now, Duration::ZERO).await?;
        let written = match self.write_planned(user_id, plan).await? {
            Written::Nothing => seen,
            // Applied after `seen`: its record holds both.
            removed => removed,
        };
        Ok(self.view_after_write(user_id, written).await?)
    }
}

/// A short, random pause before a write that lost a race is tried again,
/// so writers racing for one user don't collide again in lockstep:
/// up to 2 ms times the attempt.
fn backoff(attempt: u32) -> Duration {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(attempt);
    Duration::from_micros(random % (2_000 * u64::from(attempt)) + 100)
}

/// A record's view as JSON at `now` (see [`UserRecord::view_json`]).
fn json_of(
    record: &UserRecord,
    user_id: &str,
    now: OffsetDateTime,
) -> Result<Option<Bytes>, StoreError> {
    record
        .view_json(user_id, now)
        .map_err(|e| StoreError::Corrupt {
            key: user_id.to_owned(),
            reason: format!("the presence can't be written as JSON: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::Status;
    use crate::session::{HeartbeatRequest, validate_heartbeat};
    use crate::store::memory::MemoryStore;

    fn service() -> PresenceService {
        node(Arc::new(MemoryStore::new()), "n1")
    }

    /// A node on `store`, with a cache of its own and no watch (so it
    /// never learns of the other nodes' writes by itself).
    fn node(store: Arc<MemoryStore>, id: &str) -> PresenceService {
        let metrics = Metrics::new().unwrap();
        let cache = PresenceCache::new(1 << 20, 16, metrics.cache.clone());
        let log = Arc::new(EventLog::default());
        let watch = Arc::new(WatchStatus::default());
        PresenceService::new(store, cache, watch, id, log, metrics)
    }

    fn busy(message: &str) -> ValidUpdate {
        ValidUpdate {
            user_id: "u".into(),
            status: Status::Busy,
            message: message.into(),
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn a_multi_get_answers_cached_and_stored_users_in_the_asked_order() {
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node(store.clone(), "a"), node(store.clone(), "b"));
        for user in ["x", "y"] {
            a.set(ValidUpdate {
                user_id: user.into(),
                ..busy(user)
            })
            .await
            .unwrap();
        }
        // b has cached only y; x comes from the store, nobody from nowhere.
        assert!(b.get_json("y").await.unwrap().is_some());
        let answers = b.get_many_json(&["x", "nobody", "y"]).await;
        let messages: Vec<Option<String>> = answers
            .into_iter()
            .map(|a| {
                a.unwrap().map(|json| {
                    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
                    v["message"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        assert_eq!(messages, [Some("x".into()), None, Some("y".into())]);
        assert_eq!(b.metrics.cache.misses.get(), 3, "y once, then x and nobody");
    }

    #[tokio::test]
    async fn a_set_that_lost_a_race_is_decided_again_and_still_wins() {
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node(store.clone(), "a"), node(store.clone(), "b"));
        a.set(busy("first")).await.unwrap();
        // b writes after a cached the user: a's cache is behind the bucket.
        b.set(busy("second")).await.unwrap();
        let view = a.set(busy("third")).await.unwrap();
        assert_eq!(view.message, "third");
        assert_eq!(a.metrics.write_conflicts.get(), 1);
        let stored = b.fresh_record("u").await.unwrap();
        let stored = stored.view("u", OffsetDateTime::now_utc()).unwrap();
        assert_eq!(
            (stored.message.as_str(), stored.node_id.as_str()),
            ("third", "a")
        );
    }

    #[tokio::test]
    async fn a_clear_removes_only_the_status_whose_last_seen_it_kept() {
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node(store.clone(), "a"), node(store.clone(), "b"));
        a.set(busy("first")).await.unwrap();
        // b sets a newer status that a's cache has not seen: a's clear
        // finds the key moved, and the newer status stays.
        b.set(busy("second")).await.unwrap();
        let view = a.clear("u").await.unwrap().expect("a known user");
        assert_eq!(view.message, "second");
        let stored = b.fresh_record("u").await.unwrap();
        assert_eq!(stored.manual_status().map(|m| &*m.message), Some("second"));
        // Cleared where it is known: offline, seen when it was set.
        let set_at = stored.manual_status().map(Presence::last_seen);
        let view = b.clear("u").await.unwrap().expect("a known user");
        assert_eq!((view.status, view.last_seen), (Status::Offline, set_at));
        let stored = a.fresh_record("u").await.unwrap();
        assert!(stored.manual_status().is_none());
        assert_eq!(stored.seen_at(), set_at);
        // Nothing left to clear: nothing is written.
        let revision = stored.revision();
        let view = a.clear("u").await.unwrap().expect("a known user");
        assert_eq!(view.revision, revision);
        assert!(a.clear("nobody").await.unwrap().is_none());

        // Cleared by another node: like an expiry, `nodeID` and `updatedAt`
        // stay those of the status's own write.
        let set = a
            .set(ValidUpdate {
                user_id: "v".into(),
                ..busy("by a")
            })
            .await
            .unwrap();
        let view = b.clear("v").await.unwrap().expect("a known user");
        assert_eq!(view.status, Status::Offline);
        assert_eq!(
            (view.node_id.as_str(), view.updated_at, view.last_seen),
            ("a", set.updated_at, set.last_seen)
        );
        let fresh = node(store.clone(), "c").record("v").await.unwrap();
        let view = fresh.view("v", OffsetDateTime::now_utc()).expect("known");
        assert_eq!(
            (view.node_id.as_str(), view.updated_at),
            ("a", set.updated_at)
        );

        // A status stored by a writer that names no node (the Go service's
        // older values): the clearing node stands in, not an empty name.
        let update = ValidUpdate {
            user_id: "w".into(),
            ..busy("by go")
        };
        let anonymous = Presence::accepted(update, "", OffsetDateTime::now_utc());
        let manual = Update::Manual(Some(anonymous));
        store
            .write("w", &manual, None, Expect::Key(0))
            .await
            .unwrap();
        let view = b.clear("w").await.unwrap().expect("a known user");
        assert_eq!((view.status, view.node_id.as_str()), (Status::Offline, "b"));
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
    async fn a_heartbeat_within_the_lease_is_one_write_and_last_seen_stays_exact() {
        let store = Arc::new(MemoryStore::new());
        let service = node(store.clone(), "n1");
        let first = service.heartbeat(beat("tab", "online")).await.unwrap();
        // The first one writes the session and the durable `seen` key.
        assert_eq!(first.revision, 2);
        let second = service.heartbeat(beat("tab", "online")).await.unwrap();
        assert_eq!(second.revision, 3, "only the session key was written");
        let stored = service.fresh_record("u").await.unwrap();
        assert!(
            stored.seen_at() <= second.last_seen,
            "the durable key may lag"
        );
        let ended = service.end_session("u", "tab").await.unwrap();
        assert!(ended.last_seen >= second.last_seen);
        // Ending a session records the sign of life exactly.
        let stored = service.fresh_record("u").await.unwrap();
        assert_eq!(stored.seen_at(), ended.last_seen);
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
