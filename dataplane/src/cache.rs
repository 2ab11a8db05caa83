//! The node's presence cache: moka in front of the KV bucket.
//!
//! Each slot remembers the KV revision it reflects and is only ever replaced
//! by a newer one, so the watch, the writer's own read-your-writes update and
//! a slow cache-miss read can race without a stale value winning. A slot can
//! also record that a user has no presence (a negative entry), so repeated
//! lookups of unknown users don't all go to the hub.

use crate::metrics::CacheCounters;
use crate::record::UserRecord;
use crate::store::Change;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the cache knows about one user.
#[derive(Debug, Clone)]
pub struct Slot {
    pub record: Arc<UserRecord>,
    /// Every key of the user is in `record`. A slot is incomplete while a
    /// read from the store is filling it.
    pub complete: bool,
}

/// What [`PresenceCache::apply`] did with a change.
#[derive(Debug)]
pub enum Applied {
    /// The user's complete record changed from `before` to `after`.
    Changed {
        before: Arc<UserRecord>,
        after: Arc<UserRecord>,
    },
    /// The record already held this or a newer revision of the key.
    Stale,
    /// The user is not (completely) cached, so what changed is not known here.
    Unknown,
}

/// Fixed per-entry overhead estimate (moka's node, the `Arc`, the `String`
/// headers, timestamps) added to the variable-length bytes.
const ENTRY_OVERHEAD: usize = 160;

/// The JSON a read keeps beside a record (see `UserRecord::view_json`):
/// field names, times and IDs, plus the record's own strings again. Counted
/// up front, as moka weighs an entry only when it is inserted.
const RENDERED_OVERHEAD: usize = 200;

fn weight(key: &str, slot: &Slot) -> u32 {
    let record = slot.record.weight();
    let rendered = RENDERED_OVERHEAD + key.len() + record / 2;
    u32::try_from(ENTRY_OVERHEAD + key.len() + record + rendered).unwrap_or(u32::MAX)
}

/// How many of this node's own recent write revisions the cache remembers
/// for the watch (see [`OwnWrites`]).
const OWN_WRITES: usize = 4096;

/// Revisions of this node's own writes that the cache applied already, so
/// the watch's echo of each is answered without a cache lookup. A
/// direct-mapped table: revision `r` lives in slot `r % OWN_WRITES` until a
/// later one takes the slot, and then its echo just takes the lookup.
/// Bucket revisions are consecutive, so the last 4096 writes of the whole
/// bucket never collide.
struct OwnWrites(Box<[AtomicU64]>);

impl OwnWrites {
    fn new() -> Self {
        OwnWrites((0..OWN_WRITES).map(|_| AtomicU64::new(0)).collect())
    }

    fn slot(&self, revision: u64) -> &AtomicU64 {
        // The modulo is below OWN_WRITES, so it fits a usize and indexes.
        &self.0[(revision % OWN_WRITES as u64) as usize]
    }

    fn remember(&self, revision: u64) {
        self.slot(revision).store(revision, Ordering::Release);
    }

    /// Whether `revision` was remembered; forgets it either way.
    fn take(&self, revision: u64) -> bool {
        revision != 0
            && self
                .slot(revision)
                .compare_exchange(revision, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn forget_all(&self) {
        for slot in &self.0 {
            slot.store(0, Ordering::Release);
        }
    }
}

/// Snapshot for `/api/v2/cache/metrics`.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub keys_added: u64,
    pub keys_evicted: u64,
    pub cost_added: u64,
    pub cost_evicted: u64,
    pub entries: u64,
    pub weighted_size: u64,
    pub max_cost: u64,
    pub hit_ratio: f64,
}

/// The cache and its counters.
#[derive(Clone)]
pub struct PresenceCache {
    inner: Cache<String, Slot>,
    counters: CacheCounters,
    max_cost: u64,
    /// Holds every user of the bucket: set when a full replay finished,
    /// cleared by the first eviction. While set, a user the cache doesn't
    /// know has no keys at all, so nobody needs to ask the store.
    replica: Arc<AtomicBool>,
    /// Entries evicted for size since start; a replay that saw any can't
    /// have left a replica.
    evictions: Arc<AtomicU64>,
    /// This node's own writes that are in the cache already.
    own: Arc<OwnWrites>,
}

impl PresenceCache {
    /// `max_cost` bounds the estimated bytes held; `initial_capacity` pre-sizes
    /// the table for the expected number of users.
    pub fn new(max_cost: u64, initial_capacity: usize, counters: CacheCounters) -> Self {
        let evicted = counters.clone();
        let replica = Arc::new(AtomicBool::new(false));
        let evictions = Arc::new(AtomicU64::new(0));
        let (lost, evicted_count) = (replica.clone(), evictions.clone());
        let inner = Cache::builder()
            .max_capacity(max_cost)
            .initial_capacity(initial_capacity)
            .weigher(|key: &String, slot: &Slot| weight(key, slot))
            .eviction_listener(move |key: Arc<String>, slot: Slot, cause| {
                if cause == RemovalCause::Size {
                    evicted_count.fetch_add(1, Ordering::AcqRel);
                    lost.store(false, Ordering::Release);
                    evicted.keys_evicted.inc();
                    evicted.cost_evicted.inc_by(u64::from(weight(&key, &slot)));
                }
            })
            .build();
        PresenceCache {
            inner,
            counters,
            max_cost,
            replica,
            evictions,
            own: Arc::new(OwnWrites::new()),
        }
    }

    /// Looks a user up, counting the hit or miss (an incomplete slot is a miss).
    pub async fn get(&self, user_id: &str) -> Option<Slot> {
        let found = self.inner.get(user_id).await.filter(|slot| slot.complete);
        match found {
            Some(_) => self.counters.hits.inc(),
            None => self.counters.misses.inc(),
        }
        found
    }

    /// Whether the cache holds every user of the bucket (see `replica`).
    pub fn is_replica(&self) -> bool {
        self.replica.load(Ordering::Acquire)
    }

    /// How many entries were evicted for size so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Acquire)
    }

    /// A full replay of the bucket, begun when [`PresenceCache::evictions`]
    /// was `evictions_before`, has been applied: the cache holds every user
    /// unless something was evicted meanwhile (pending evictions are
    /// settled first). Returns whether the cache is now a replica.
    pub async fn mark_replica(&self, evictions_before: u64) -> bool {
        self.inner.run_pending_tasks().await;
        self.replica.store(true, Ordering::Release);
        // Checked after the store, so an eviction racing it is not missed
        // (the listener clears the flag too).
        let complete = self.evictions() == evictions_before;
        if !complete {
            self.replica.store(false, Ordering::Release);
        }
        complete
    }

    fn count_put(&self, result: &CompResult<String, Slot>) {
        match result {
            CompResult::Inserted(entry) => {
                self.counters.keys_added.inc();
                let cost = weight(entry.key(), entry.value());
                self.counters.cost_added.inc_by(u64::from(cost));
            }
            CompResult::ReplacedWith(entry) => {
                let cost = weight(entry.key(), entry.value());
                self.counters.cost_added.inc_by(u64::from(cost));
            }
            _ => {}
        }
    }

    /// Applies one change to the user's record if it is newer than what the
    /// record holds. A user not cached yet gets a slot only when the cache
    /// is a replica (or `replaying`); otherwise the change would be all the
    /// slot knows, and the next read loads the user from the store instead.
    pub async fn apply(&self, change: &Change, replaying: bool) -> Applied {
        // The watch's echo of a write this node applied already: its own
        // writes are remembered by revision; anything else a plain lookup
        // answers, without the entry lock and the copy of the record that
        // an update takes. (A replay brings users the cache doesn't hold
        // yet: no lookup first.)
        if self.own.take(change.revision) {
            return Applied::Stale;
        }
        if !replaying
            && let Some(slot) = self.inner.get(change.user_id.as_str()).await
            && slot.record.revision_for(&change.update) >= change.revision
        {
            return Applied::Stale;
        }
        self.merge(change, replaying).await
    }

    /// Applies this node's own acknowledged write, and remembers its
    /// revision so the watch's echo of it costs no lookup. No echo check
    /// first: the write is new unless its echo won the race.
    pub async fn apply_own(&self, change: &Change) -> Applied {
        let applied = self.merge(change, false).await;
        if !matches!(applied, Applied::Unknown) {
            self.own.remember(change.revision);
        }
        applied
    }

    /// Merges `change` into the user's slot (see [`PresenceCache::apply`]).
    async fn merge(&self, change: &Change, replaying: bool) -> Applied {
        let create = replaying || self.is_replica();
        let mut outcome = Applied::Unknown;
        let result = self
            .inner
            .entry_by_ref(change.user_id.as_str())
            .and_compute_with(|current| {
                let (base, complete) = match current {
                    Some(entry) => {
                        let slot = entry.into_value();
                        (Some(slot.record), slot.complete)
                    }
                    None if create => (None, true),
                    None => (None, false),
                };
                let op = if base.is_none() && !create {
                    Op::Nop
                } else {
                    let mut record = base.as_deref().cloned().unwrap_or_default();
                    if record.merge(change.update.clone(), change.revision) {
                        let after = Arc::new(record);
                        outcome = match (complete, base) {
                            (true, before) => Applied::Changed {
                                before: before.unwrap_or_default(),
                                after: after.clone(),
                            },
                            (false, _) => Applied::Unknown,
                        };
                        Op::Put(Slot {
                            record: after,
                            complete,
                        })
                    } else {
                        outcome = Applied::Stale;
                        Op::Nop
                    }
                };
                std::future::ready(op)
            })
            .await;
        self.count_put(&result);
        outcome
    }

    /// Reserves an incomplete slot before reading the user from the store,
    /// so that watch changes arriving during the read are kept.
    pub async fn begin_load(&self, user_id: &str) {
        let result = self
            .inner
            .entry_by_ref(user_id)
            .and_compute_with(|current| {
                std::future::ready(match current {
                    Some(_) => Op::Nop,
                    None => Op::Put(Slot {
                        record: Arc::new(UserRecord::default()),
                        complete: false,
                    }),
                })
            })
            .await;
        self.count_put(&result);
    }

    /// Merges what the store returned into the slot reserved by
    /// [`PresenceCache::begin_load`] and marks it complete. If the slot was
    /// evicted meanwhile, the result is returned without being cached.
    pub async fn finish_load(&self, user_id: &str, changes: Vec<Change>) -> Arc<UserRecord> {
        let merged = |base: &UserRecord| {
            let mut record = base.clone();
            for change in &changes {
                record.merge(change.update.clone(), change.revision);
            }
            Arc::new(record)
        };
        let result = self
            .inner
            .entry_by_ref(user_id)
            .and_compute_with(|current| {
                std::future::ready(match current {
                    Some(entry) => Op::Put(Slot {
                        record: merged(&entry.value().record),
                        complete: true,
                    }),
                    None => Op::Nop,
                })
            })
            .await;
        self.count_put(&result);
        match result {
            CompResult::ReplacedWith(entry) | CompResult::Inserted(entry) => {
                entry.into_value().record
            }
            _ => merged(&UserRecord::default()),
        }
    }

    /// Forgets everything (the bucket was recreated: every revision we hold
    /// belongs to data that no longer exists).
    pub fn clear(&self) {
        self.replica.store(false, Ordering::Release);
        self.own.forget_all();
        self.inner.invalidate_all();
    }

    /// Counter snapshot, for the JSON metrics endpoint.
    pub async fn stats(&self) -> CacheStats {
        self.inner.run_pending_tasks().await;
        let c = &self.counters;
        let (hits, misses) = (c.hits.get(), c.misses.get());
        let lookups = hits + misses;
        CacheStats {
            hits,
            misses,
            keys_added: c.keys_added.get(),
            keys_evicted: c.keys_evicted.get(),
            cost_added: c.cost_added.get(),
            cost_evicted: c.cost_evicted.get(),
            entries: self.inner.entry_count(),
            weighted_size: self.inner.weighted_size(),
            max_cost: self.max_cost,
            hit_ratio: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::{Presence, Status, ValidUpdate};
    use crate::record::Update;
    use time::OffsetDateTime;

    fn change(user: &str, revision: u64, message: Option<&str>) -> Change {
        let presence = message.map(|message| {
            Arc::new(Presence::accepted(
                ValidUpdate {
                    user_id: user.into(),
                    status: Status::Online,
                    message: message.into(),
                    expires_at: None,
                },
                "n",
                OffsetDateTime::UNIX_EPOCH,
            ))
        });
        Change {
            user_id: user.into(),
            update: Update::Manual(presence),
            revision,
            stored_at: OffsetDateTime::UNIX_EPOCH,
            pending: 0,
        }
    }

    fn cache(max_cost: u64) -> PresenceCache {
        PresenceCache::new(max_cost, 16, Metrics::new().unwrap().cache)
    }

    fn message(slot: &Slot) -> Option<String> {
        slot.record
            .view("u", OffsetDateTime::UNIX_EPOCH)
            .map(|v| v.message)
    }

    #[tokio::test]
    async fn older_revisions_never_replace_newer_ones() {
        let c = cache(1 << 20);
        c.apply(&change("u", 5, Some("five")), true).await;
        c.apply(&change("u", 3, Some("three")), true).await;
        c.apply(&change("u", 4, None), true).await;
        let slot = c.get("u").await.unwrap();
        assert_eq!(slot.record.revision(), 5);
        assert_eq!(message(&slot).as_deref(), Some("five"));
        c.apply(&change("u", 6, None), true).await;
        let slot = c.get("u").await.unwrap();
        assert_eq!(slot.record.revision(), 6);
        assert_eq!(message(&slot), None);
    }

    #[tokio::test]
    async fn unknown_users_are_created_only_while_the_cache_is_a_replica() {
        let c = cache(1 << 20);
        c.apply(&change("u", 1, Some("x")), false).await;
        assert!(c.get("u").await.is_none());
        assert!(c.mark_replica(0).await);
        c.apply(&change("u", 2, Some("y")), false).await;
        assert_eq!(message(&c.get("u").await.unwrap()).as_deref(), Some("y"));
        c.clear();
        assert!(!c.is_replica());
    }

    #[tokio::test]
    async fn a_load_keeps_changes_that_arrived_while_it_ran() {
        let c = cache(1 << 20);
        c.begin_load("u").await;
        assert!(c.get("u").await.is_none(), "an incomplete slot is a miss");
        // The watch delivers revision 7 while the store read (which saw
        // revision 6) is still under way.
        c.apply(&change("u", 7, Some("new")), false).await;
        let record = c.finish_load("u", vec![change("u", 6, Some("old"))]).await;
        assert_eq!(record.revision(), 7);
        assert_eq!(message(&c.get("u").await.unwrap()).as_deref(), Some("new"));
    }

    #[tokio::test]
    async fn counts_hits_misses_and_additions() {
        let c = cache(1 << 20);
        assert!(c.get("a").await.is_none());
        c.apply(&change("a", 1, Some("")), true).await;
        c.apply(&change("a", 2, Some("")), true).await;
        assert!(c.get("a").await.is_some());
        let stats = c.stats().await;
        assert_eq!((stats.hits, stats.misses, stats.keys_added), (1, 1, 1));
        assert_eq!(stats.entries, 1);
        assert!((stats.hit_ratio - 0.5).abs() < f64::EPSILON);
        assert!(stats.cost_added >= 2 * ENTRY_OVERHEAD as u64);
    }

    #[tokio::test]
    async fn stays_within_its_cost_budget_and_stops_being_a_replica() {
        let c = cache(64 * 1024);
        assert!(c.mark_replica(0).await);
        for i in 0..5_000u64 {
            let user = format!("user-{i}");
            c.apply(&change(&user, i + 1, Some("m")), false).await;
        }
        let stats = c.stats().await;
        assert!(stats.weighted_size <= 64 * 1024, "{stats:?}");
        assert!(stats.keys_evicted > 0, "{stats:?}");
        assert!(stats.cost_evicted > 0, "{stats:?}");
        assert!(!c.is_replica());
        // A replay that overflowed the cache does not make it a replica.
        assert!(!c.mark_replica(0).await);
        assert!(!c.is_replica());
    }
}
