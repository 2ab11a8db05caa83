//! The node's presence cache: moka in front of the KV bucket.
//!
//! Each slot remembers the KV revision it reflects and is only ever replaced
//! by a newer one, so the watch, the writer's own read-your-writes update and
//! a slow cache-miss read can race without a stale value winning. A slot can
//! also record that a user has no presence (a negative entry), so repeated
//! lookups of unknown users don't all go to the hub.

use crate::metrics::CacheCounters;
use crate::model::Presence;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use std::sync::Arc;

/// What the cache knows about one user at one KV revision.
#[derive(Debug, Clone)]
pub struct Slot {
    pub revision: u64,
    /// `None`: the user has no presence (never set, or deleted/expired).
    pub presence: Option<Arc<Presence>>,
}

/// Fixed per-entry overhead estimate (moka's node, the `Arc`, the `String`
/// headers, timestamps) added to the variable-length bytes.
const ENTRY_OVERHEAD: usize = 160;

fn weight(key: &str, slot: &Slot) -> u32 {
    let variable = key.len()
        + slot
            .presence
            .as_ref()
            .map_or(0, |p| p.user_id.len() + p.message.len() + p.node_id.len());
    u32::try_from(ENTRY_OVERHEAD + variable).unwrap_or(u32::MAX)
}

/// Snapshot for `/api/v2/cache/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
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
}

impl PresenceCache {
    /// `max_cost` bounds the estimated bytes held; `initial_capacity` pre-sizes
    /// the table for the expected number of users.
    pub fn new(max_cost: u64, initial_capacity: usize, counters: CacheCounters) -> Self {
        let evicted = counters.clone();
        let inner = Cache::builder()
            .max_capacity(max_cost)
            .initial_capacity(initial_capacity)
            .weigher(|key: &String, slot: &Slot| weight(key, slot))
            .eviction_listener(move |key: Arc<String>, slot: Slot, cause| {
                if cause == RemovalCause::Size {
                    evicted.keys_evicted.inc();
                    evicted.cost_evicted.inc_by(u64::from(weight(&key, &slot)));
                }
            })
            .build();
        PresenceCache {
            inner,
            counters,
            max_cost,
        }
    }

    /// Looks a user up, counting the hit or miss.
    pub async fn get(&self, user_id: &str) -> Option<Slot> {
        let found = self.inner.get(user_id).await;
        match found {
            Some(_) => self.counters.hits.inc(),
            None => self.counters.misses.inc(),
        }
        found
    }

    /// Records `presence` (or its absence) at `revision`, unless the cache
    /// already holds the same or a newer revision for this user.
    pub async fn apply(&self, user_id: &str, revision: u64, presence: Option<Arc<Presence>>) {
        let slot = Slot { revision, presence };
        let cost = u64::from(weight(user_id, &slot));
        let result = self
            .inner
            .entry_by_ref(user_id)
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if entry.value().revision >= revision => Op::Nop,
                    _ => Op::Put(slot),
                };
                std::future::ready(op)
            })
            .await;
        match result {
            CompResult::Inserted(_) => {
                self.counters.keys_added.inc();
                self.counters.cost_added.inc_by(cost);
            }
            CompResult::ReplacedWith(_) => self.counters.cost_added.inc_by(cost),
            _ => {}
        }
    }

    /// Forgets everything (the bucket was recreated: every revision we hold
    /// belongs to data that no longer exists).
    pub fn clear(&self) {
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
    use crate::model::{Status, ValidUpdate};
    use time::OffsetDateTime;

    fn presence(user: &str, message: &str) -> Arc<Presence> {
        Arc::new(Presence::accepted(
            ValidUpdate {
                user_id: user.into(),
                status: Status::Online,
                message: message.into(),
            },
            "n",
            OffsetDateTime::UNIX_EPOCH,
        ))
    }

    fn cache(max_cost: u64) -> PresenceCache {
        PresenceCache::new(max_cost, 16, Metrics::new().unwrap().cache)
    }

    #[tokio::test]
    async fn older_revisions_never_replace_newer_ones() {
        let c = cache(1 << 20);
        c.apply("u", 5, Some(presence("u", "five"))).await;
        c.apply("u", 3, Some(presence("u", "three"))).await;
        c.apply("u", 4, None).await;
        let slot = c.get("u").await.unwrap();
        assert_eq!(slot.revision, 5);
        assert_eq!(slot.presence.unwrap().message, "five");
        c.apply("u", 6, None).await;
        let slot = c.get("u").await.unwrap();
        assert_eq!(slot.revision, 6);
        assert!(slot.presence.is_none());
    }

    #[tokio::test]
    async fn counts_hits_misses_and_additions() {
        let c = cache(1 << 20);
        assert!(c.get("a").await.is_none());
        c.apply("a", 1, Some(presence("a", ""))).await;
        c.apply("a", 2, Some(presence("a", ""))).await;
        assert!(c.get("a").await.is_some());
        let stats = c.stats().await;
        assert_eq!((stats.hits, stats.misses, stats.keys_added), (1, 1, 1));
        assert_eq!(stats.entries, 1);
        assert!((stats.hit_ratio - 0.5).abs() < f64::EPSILON);
        assert!(stats.cost_added >= 2 * ENTRY_OVERHEAD as u64);
    }

    #[tokio::test]
    async fn stays_within_its_cost_budget() {
        let c = cache(64 * 1024);
        for i in 0..5_000u64 {
            let user = format!("user-{i}");
            c.apply(&user, i + 1, Some(presence(&user, "m"))).await;
        }
        let stats = c.stats().await;
        assert!(stats.weighted_size <= 64 * 1024, "{stats:?}");
        assert!(stats.keys_evicted > 0, "{stats:?}");
        assert!(stats.cost_evicted > 0, "{stats:?}");
    }
}
