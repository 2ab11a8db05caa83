//! Keeps the cache coherent with the bucket: one KV watch per node applies
//! every change to the cache. When the watch fails (hub restart, leafnode
//! outage) it is re-established from the last revision it applied, so no
//! change is skipped and none is applied twice out of order.

use crate::cache::{Applied, PresenceCache};
use crate::event_log::{EventLog, visible_change};
use crate::metrics::Metrics;
use crate::store::{Change, ChangeFeed, PresenceStore, StoreError, WatchStart};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Notify;

/// How far apart the revision/time checkpoints are.
const CHECKPOINT_EVERY: time::Duration = time::Duration::seconds(10);
/// How many checkpoints are kept (with one each 10 s: about 3 hours).
const MAX_CHECKPOINTS: usize = 1000;

/// What the watch has done so far; read by `/health` and the read path.
#[derive(Debug, Default)]
pub struct WatchStatus {
    applied_revision: AtomicU64,
    active: AtomicBool,
    /// A full replay of the bucket is under way: the cache may hold part of
    /// a user's keys, so reads go to the store.
    replaying: AtomicBool,
    /// The cache's eviction count when the current replay started.
    replay_evictions: AtomicU64,
    last_applied_unix_ms: AtomicI64,
    last_lag_micros: AtomicU64,
    restarts: AtomicU64,
    applied: Notify,
    /// (revision, time stored) samples, oldest first: tell how old a
    /// revision is, so a stream resume knows whether it can be exact.
    checkpoints: Mutex<VecDeque<(u64, OffsetDateTime)>>,
}

/// `/health`'s view of the watch.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchSnapshot {
    pub active: bool,
    pub applied_revision: u64,
    /// Hub-write-to-cache delay of the last applied change.
    pub last_lag_ms: f64,
    /// Seconds since the last change was applied (`null` before the first).
    pub seconds_since_last_change: Option<f64>,
    pub restarts: u64,
}

impl WatchStatus {
    /// Highest revision applied to the cache. Every change after it will
    /// still reach the cache, which is what makes negative cache entries safe.
    pub fn applied_revision(&self) -> u64 {
        self.applied_revision.load(Ordering::Acquire)
    }

    /// Whether a full replay is under way (reads must not trust the cache).
    pub fn replaying(&self) -> bool {
        self.replaying.load(Ordering::Acquire)
    }

    /// Waits until every change up to `revision` has been applied (and
    /// sent to the change feed); `false` if that took longer than `limit`.
    pub async fn wait_applied(&self, revision: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.applied.notified();
            if self.applied_revision() >= revision {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.applied_revision() >= revision;
            }
        }
    }

    /// An upper bound on the age of `revision`: the time of the newest
    /// checkpoint at or before it. `None` when it is older than anything
    /// this node has seen (or from another incarnation of the bucket).
    pub fn stored_no_earlier_than(&self, revision: u64) -> Option<OffsetDateTime> {
        let checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        checkpoints
            .iter()
            .rev()
            .find(|(r, _)| *r <= revision)
            .map(|(_, t)| *t)
    }

    fn checkpoint(&self, revision: u64, at: OffsetDateTime) {
        let mut checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        let due = checkpoints
            .back()
            .is_none_or(|(_, last)| at - *last >= CHECKPOINT_EVERY);
        if due {
            checkpoints.push_back((revision, at));
            if checkpoints.len() > MAX_CHECKPOINTS {
                checkpoints.pop_front();
            }
        }
    }

    fn restart_from_scratch(&self) {
        self.applied_revision.store(0, Ordering::Release);
        self.checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Current state, for `/health`.
    pub fn snapshot(&self) -> WatchSnapshot {
        let last_ms = self.last_applied_unix_ms.load(Ordering::Relaxed);
        let now_ms = unix_millis(OffsetDateTime::now_utc());
        WatchSnapshot {
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

/// Where applied changes go besides the status counters.
struct Sinks<'a> {
    cache: &'a PresenceCache,
    status: &'a WatchStatus,
    metrics: &'a Metrics,
    feed: &'a ChangeFeed,
    log: &'a EventLog,
}

impl Sinks<'_> {
    async fn apply(&self, change: Change) {
        let now = OffsetDateTime::now_utc();
        let lag = (now - change.stored_at).max(time::Duration::ZERO);
        let replaying = self.status.replaying();
        let applied = self.cache.apply(&change, replaying).await;
        if replaying {
            if change.pending == 0 {
                self.finish_replay(change.revision).await;
            }
        } else {
            self.log_event(&change, applied);
        }
        let revision = change.revision;
        self.status.checkpoint(revision, change.stored_at);
        // Feed first, then publish the revision: a stream that waited for
        // revision r has every change up to r in its receiver.
        let _ = self.feed.send(Arc::new(change));
        let status = self.status;
        status
            .applied_revision
            .fetch_max(revision, Ordering::AcqRel);
        status.applied.notify_waiters();
        status
            .last_applied_unix_ms
            .store(unix_millis(now), Ordering::Relaxed);
        let lag_micros = u64::try_from(lag.whole_microseconds()).unwrap_or(u64::MAX);
        status.last_lag_micros.store(lag_micros, Ordering::Relaxed);
        self.metrics.watch_lag.observe(lag.as_seconds_f64());
        self.metrics
            .watch_applied_revision
            .set(i64::try_from(status.applied_revision()).unwrap_or(i64::MAX));
    }

    /// Records a change subscribers would see in the event log, for
    /// exact stream resumes.
    fn log_event(&self, change: &Change, applied: Applied) {
        match applied {
            Applied::Changed { before, after } => {
                if let Some(view) = visible_change(&change.user_id, &before, &after) {
                    self.log.push(change.revision, view);
                }
            }
            Applied::Stale => self.log.echo(change.revision),
            Applied::Unknown => self.log.gap(change.revision),
        }
    }

    fn start_replay(&self) {
        self.log.reset();
        self.status
            .replay_evictions
            .store(self.cache.evictions(), Ordering::Release);
        self.status.replaying.store(true, Ordering::Release);
    }

    /// The replay ended with the change at `revision`.
    async fn finish_replay(&self, revision: u64) {
        let before = self.status.replay_evictions.load(Ordering::Acquire);
        let replica = self.cache.mark_replica(before).await;
        self.log.start_after(revision);
        self.status.replaying.store(false, Ordering::Release);
        tracing::info!(
            revision = self.status.applied_revision(),
            cache_holds_every_user = replica,
            "replay of the KV bucket complete"
        );
    }
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
    status: Arc<WatchStatus>,
    metrics: Metrics,
    feed: ChangeFeed,
    log: Arc<EventLog>,
) {
    let sinks = Sinks {
        cache: &cache,
        status: &status,
        metrics: &metrics,
        feed: &feed,
        log: &log,
    };
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
                    status.restart_from_scratch();
                }
                followed = Some(id.created);
                if status.applied_revision() == 0 {
                    // A full replay starts; with nothing to replay it is done.
                    sinks.start_replay();
                    if id.messages == 0 {
                        sinks.finish_replay(id.last_revision).await;
                    }
                }
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
                            Some(Ok(change)) => sinks.apply(change).await,
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
                            // Everything expired between counting and watching:
                            // nothing will arrive to end the replay.
                            if status.replaying()
                                && store.identity().await.is_ok_and(|id| id.messages == 0)
                            {
                                sinks.finish_replay(status.applied_revision()).await;
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
