//! Keeps the cache coherent with the bucket: one KV watch per node applies
//! every change to the cache. When the watch fails (hub restart, leafnode
//! outage) it is re-established from the last revision it applied, so no
//! change is skipped and none is applied twice out of order.

use crate::cache::PresenceCache;
use crate::metrics::Metrics;
use crate::store::{Change, PresenceStore, StoreError, WatchStart};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

/// What the watch has done so far; read by `/health` and the read path.
#[derive(Debug, Default)]
pub struct SyncStatus {
    applied_revision: AtomicU64,
    active: AtomicBool,
    last_applied_unix_ms: AtomicI64,
    last_lag_micros: AtomicU64,
    restarts: AtomicU64,
}

/// `/health`'s view of the watch.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncSnapshot {
    pub active: bool,
    pub applied_revision: u64,
    /// Hub-write-to-cache delay of the last applied change.
    pub last_lag_ms: f64,
    /// Seconds since the last change was applied (`null` before the first).
    pub seconds_since_last_change: Option<f64>,
    pub restarts: u64,
}

impl SyncStatus {
    /// Highest revision applied to the cache. Every change after it will
    /// still reach the cache, which is what makes negative cache entries safe.
    pub fn applied_revision(&self) -> u64 {
        self.applied_revision.load(Ordering::Acquire)
    }

    /// Current state, for `/health`.
    pub fn snapshot(&self) -> SyncSnapshot {
        let last_ms = self.last_applied_unix_ms.load(Ordering::Relaxed);
        let now_ms = unix_millis(OffsetDateTime::now_utc());
        SyncSnapshot {
            active: self.active.load(Ordering::Relaxed),
            applied_revision: self.applied_revision(),
            last_lag_ms: self.last_lag_micros.load(Ordering::Relaxed) as f64 / 1000.0,
            seconds_since_last_change: (last_ms > 0)
                .then(|| (now_ms - last_ms).max(0) as f64 / 1000.0),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

fn unix_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

async fn apply(change: Change, cache: &PresenceCache, status: &SyncStatus, metrics: &Metrics) {
    let now = OffsetDateTime::now_utc();
    let lag = (now - change.stored_at).max(time::Duration::ZERO);
    cache
        .apply(
            &change.user_id,
            change.revision,
            change.presence.map(Arc::new),
        )
        .await;
    status
        .applied_revision
        .fetch_max(change.revision, Ordering::AcqRel);
    status
        .last_applied_unix_ms
        .store(unix_millis(now), Ordering::Relaxed);
    let lag_micros = u64::try_from(lag.whole_microseconds()).unwrap_or(u64::MAX);
    status.last_lag_micros.store(lag_micros, Ordering::Relaxed);
    metrics.watch_lag.observe(lag.as_seconds_f64());
    metrics
        .watch_applied_revision
        .set(i64::try_from(status.applied_revision()).unwrap_or(i64::MAX));
}

/// How often a running watch checks that the bucket it follows still
/// exists as the same incarnation.
const IDENTITY_CHECK: Duration = Duration::from_secs(2);

/// What the periodic check found.
enum Followed {
    Same,
    /// Deleted (the center recreates it) or recreated: start over.
    Gone,
}

async fn check_bucket(
    store: &dyn PresenceStore,
    followed: Option<time::OffsetDateTime>,
) -> Followed {
    match store.identity().await {
        Ok(id) if Some(id.created) != followed => Followed::Gone,
        Ok(_) => Followed::Same,
        Err(StoreError::NotReady(reason)) => {
            tracing::warn!(%reason, "the KV bucket is gone; recreating it where this node may");
            if let Err(err) = store.ensure_bucket().await {
                tracing::warn!(error = %err, "cannot recreate the KV bucket yet");
            }
            Followed::Gone
        }
        // Hub unreachable: keep the watch; it resumes by itself.
        Err(_) => Followed::Same,
    }
}

/// Runs forever: waits for the store, watches, applies, and re-watches
/// after any failure with a capped backoff. A bucket that was deleted and
/// created again (an R1 hub that lost its disk, an operator's Delete) is
/// noticed by its creation time: the cache is cleared and the new bucket
/// replayed, because its revisions start at 1 again.
pub async fn run(
    store: Arc<dyn PresenceStore>,
    cache: PresenceCache,
    status: Arc<SyncStatus>,
    metrics: Metrics,
) {
    let mut failures: u32 = 0;
    let mut followed: Option<time::OffsetDateTime> = None;
    loop {
        if !store.connectivity().bucket_open {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if followed.is_none() {
            followed = store.opened_bucket();
        }
        match store.identity().await {
            Ok(id) => {
                let recreated = followed.is_some_and(|f| f != id.created)
                    || id.last_revision < status.applied_revision();
                if recreated {
                    tracing::warn!(
                        "the KV bucket was recreated; clearing the cache and replaying it"
                    );
                    cache.clear();
                    status.applied_revision.store(0, Ordering::Release);
                }
                followed = Some(id.created);
            }
            Err(err) => {
                if matches!(err, StoreError::NotReady(_)) {
                    let _ = store.ensure_bucket().await;
                }
                if failures % 20 == 0 {
                    tracing::warn!(error = %err, "cannot read the KV bucket's state; retrying");
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(10)))).await;
                continue;
            }
        }
        let start = match status.applied_revision() {
            0 => WatchStart::LatestPerKey,
            revision => WatchStart::After(revision),
        };
        match store.watch(start).await {
            Ok(mut changes) => {
                tracing::info!(?start, "KV watch started");
                status.active.store(true, Ordering::Relaxed);
                metrics.watch_active.set(1);
                failures = 0;
                let mut check = tokio::time::interval(IDENTITY_CHECK);
                check.tick().await;
                loop {
                    tokio::select! {
                        item = changes.next() => match item {
                            Some(Ok(change)) => apply(change, &cache, &status, &metrics).await,
                            Some(Err(err)) => {
                                tracing::warn!(error = %err, "KV watch failed; resuming from the last applied revision");
                                break;
                            }
                            None => break,
                        },
                        _ = check.tick() => {
                            if let Followed::Gone = check_bucket(store.as_ref(), followed).await {
                                break;
                            }
                        }
                    }
                }
                status.active.store(false, Ordering::Relaxed);
                metrics.watch_active.set(0);
            }
            Err(err) => tracing::warn!(error = %err, "cannot start KV watch; retrying"),
        }
        status.restarts.fetch_add(1, Ordering::Relaxed);
        metrics.watch_restarts.inc();
        failures = failures.saturating_add(1);
        let delay = Duration::from_millis(50 * 2u64.pow(failures.min(5)));
        tokio::time::sleep(delay.min(Duration::from_secs(1))).await;
    }
}
