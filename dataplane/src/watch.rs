//! Keeps the cache coherent with the bucket: one KV watch per node applies
//! every change to the cache. When the watch fails (hub restart, leafnode
//! outage) it is re-established from the last revision it applied, so no
//! change is skipped and none is applied twice out of order.
//!
//! The watch task is supervised ([`supervise`]): if it panics it is
//! restarted with backoff from the last revision it applied, and readiness
//! says the node is not ready meanwhile. A change that crashes it
//! [`MAX_STRIKES`] times in a row is skipped, so one bad entry can't keep
//! every node unready; its user is then read from the store again.

use crate::cache::{Applied, PresenceCache};
use crate::event_log::EventLog;
use crate::feed::{ChangeFeed, Fed};
use crate::metrics::Metrics;
use crate::store::{
    BucketIdentity, ChangeStream, EchoFilter, Entry, PresenceStore, StoreError, WatchStart,
};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
    /// The node's first replay has ended: its cache followed the whole
    /// bucket once (a later replay, after the bucket was recreated, does
    /// not take it back: every node would leave service at once).
    warmed_up: AtomicBool,
    /// When the node's first replay began (the bucket was open and its
    /// state known): how long readiness has waited for the warm-up counts
    /// from here, not from a start spent waiting for NATS.
    warm_up_began: std::sync::OnceLock<Instant>,
    /// The cache's eviction count when the current replay started.
    replay_evictions: AtomicU64,
    /// The bucket's last revision (asked of its stream leader) just before
    /// the current watch began: a replay that ends before it may have been
    /// served by a replica that lags, and is checked.
    replay_target: AtomicU64,
    /// Entries the current replay applied so far (for its log line).
    replayed: AtomicU64,
    last_applied_unix_ms: AtomicI64,
    last_lag_micros: AtomicU64,
    restarts: AtomicU64,
    /// The revision being applied right now (0 between changes): what the
    /// supervisor blames when the task panics.
    applying: AtomicU64,
    /// A revision that crashed the watch too often; it is passed over.
    skip: AtomicU64,
    /// The watch task panicked and has not been restarted yet.
    crashed: AtomicBool,
    crashes: AtomicU64,
    /// Counts the bucket incarnations seen; change streams end when it moves.
    epoch: tokio::sync::watch::Sender<u64>,
    applied: Notify,
    /// (revision, time stored) samples, oldest first: tell how old a
    /// revision is, so a stream resume knows whether it can be exact.
    checkpoints: Mutex<VecDeque<(u64, OffsetDateTime)>>,
}

/// `/health`'s view of the watch.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WatchSnapshot {
    pub active: bool,
    pub applied_revision: u64,
    /// Hub-write-to-cache delay of the last applied change.
    pub last_lag_ms: f64,
    /// Seconds since the last change was applied (`null` before the first).
    pub seconds_since_last_change: Option<f64>,
    pub restarts: u64,
    /// Times the watch task panicked and was restarted.
    pub crashes: u64,
    /// A full replay of the bucket is under way (at start, or after the
    /// bucket was recreated): reads of users not yet replayed go to the hub.
    pub replaying: bool,
    /// Entries the current (or last) replay applied so far.
    pub replayed_entries: u64,
    /// The node's first replay has ended (readiness waits for it).
    pub warmed_up: bool,
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

    /// Whether the node's first full replay of the bucket has ended, so
    /// reads are served from the cache rather than each sent to the hub.
    pub fn warmed_up(&self) -> bool {
        self.warmed_up.load(Ordering::Acquire)
    }

    /// When the node's first replay began, once it has.
    pub fn warm_up_began(&self) -> Option<Instant> {
        self.warm_up_began.get().copied()
    }

    /// Whether the watch task crashed and waits to be restarted: the cache
    /// is not following the bucket, so the node is not ready.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::Acquire)
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

    /// Tells when the bucket was recreated: the value changes each time, so
    /// open change streams, whose revisions belong to the lost bucket, end.
    pub fn resets(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn restart_from_scratch(&self) {
        self.epoch.send_modify(|epoch| *epoch += 1);
        self.applied_revision.store(0, Ordering::Release);
        // A revision passed over in the old bucket is another change here.
        self.skip.store(0, Ordering::Release);
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
            crashes: self.crashes.load(Ordering::Relaxed),
            replaying: self.replaying(),
            replayed_entries: self.replayed.load(Ordering::Relaxed),
            warmed_up: self.warmed_up(),
        }
    }
}

fn unix_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// What the watch loop does after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    /// The bucket is gone, or the watch can't be trusted to deliver: watch
    /// again from the last applied revision.
    Restart,
}

/// Where applied changes go besides the status counters.
struct Sinks<'a> {
    store: &'a dyn PresenceStore,
    cache: &'a PresenceCache,
    status: &'a WatchStatus,
    metrics: &'a Metrics,
    feed: &'a ChangeFeed,
    log: &'a EventLog,
}

impl Sinks<'_> {
    async fn apply(&self, entry: Entry) {
        let now = OffsetDateTime::now_utc();
        let (revision, stored_at, pending) = entry.position();
        self.status.applying.store(revision, Ordering::Release);
        let lag = (now - stored_at).max(time::Duration::ZERO);
        let replaying = self.status.replaying();
        if replaying {
            self.status.replayed.fetch_add(1, Ordering::Relaxed);
        }
        let fed = match entry {
            Entry::Change(change) => {
                let applied = self.cache.apply(&change, replaying);
                let shown = if !replaying {
                    self.log.watched(&change, &applied)
                } else if matches!(applied, Applied::Stale) {
                    self.log.echo(change.revision)
                } else {
                    None
                };
                Some(Fed::new(change, shown))
            }
            Entry::Echo { .. } => {
                // Claimed by the watch's echo filter: the cache holds this
                // own write already and no stream follows its user, so it
                // only completes the event log's note of it.
                self.metrics.watch_echoes_undecoded.inc();
                self.log.echo(revision);
                None
            }
            Entry::Other { .. } => None,
        };
        if replaying && pending == 0 && self.replay_complete(revision).await {
            self.finish_replay(revision).await;
        }
        self.status.checkpoint(revision, stored_at);
        // Feed first, then publish the revision: a stream that waited for
        // revision r has every change up to r in its receiver.
        if let Some(fed) = fed {
            self.feed.send(Arc::new(fed));
        }
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
        status.applying.store(0, Ordering::Release);
    }

    /// Whether a replay whose consumer said "nothing pending" at `revision`
    /// saw the whole bucket. A consumer's pending count comes from the one
    /// replica that serves it (an R1 ordered consumer may sit on any replica
    /// of an R3 stream), so a replica behind the leader ends the replay
    /// early, then sends heartbeats and nothing else. Complete when
    /// `revision` reached the bucket's last revision as the leader gave it
    /// when the replay began (a replica applies the stream in order, so it
    /// held everything before), or the leader stores nothing between the
    /// two (those entries expired meanwhile). Otherwise the replay goes on:
    /// reads keep going to the store, the watch may still deliver the rest,
    /// and [`Progress`] replaces it if it does not.
    async fn replay_complete(&self, revision: u64) -> bool {
        let target = self.status.replay_target.load(Ordering::Acquire);
        if revision >= target {
            return true;
        }
        match self.store.first_after(revision).await {
            Ok(next) if next.is_none_or(|next| next > target) => true,
            Ok(next) => {
                self.metrics
                    .watch_stalls
                    .with_label_values(&["replay_incomplete"])
                    .inc();
                tracing::warn!(
                    revision,
                    next,
                    target,
                    "the KV watch's replay said it was complete before the bucket's last change; still replaying"
                );
                false
            }
            Err(err) => {
                tracing::warn!(revision, error = %err, "cannot tell whether the KV replay is complete; still replaying");
                false
            }
        }
    }

    /// Applies `entry`, or only moves past it when it is the one the
    /// supervisor gave up on.
    async fn apply_or_skip(&self, entry: Entry) {
        let revision = entry.revision();
        if revision == self.status.skip.load(Ordering::Acquire) {
            tracing::error!(
                revision,
                "passing over a change that crashed the KV watch {MAX_STRIKES} times"
            );
            // What the change did is unknown here: its user is read from
            // the store again, the streams that follow it end (their
            // clients resume from a fresh snapshot), and no stream resumes
            // exactly across it.
            if let Some(user_id) = entry.user_id() {
                self.cache.distrust(user_id);
                self.log.gap(revision);
                self.feed.lose(user_id);
            }
            self.apply(entry.into_other()).await;
        } else {
            self.apply(entry).await;
        }
    }

    /// A full replay begins; the bucket's last revision was `target` just
    /// before its watch (see [`Sinks::replay_complete`]).
    fn start_replay(&self, target: u64) {
        self.status.warm_up_began.get_or_init(Instant::now);
        self.status.replay_target.store(target, Ordering::Release);
        self.status.replayed.store(0, Ordering::Release);
        self.log.begin_replay();
        self.status
            .replay_evictions
            .store(self.cache.evictions(), Ordering::Release);
        self.status.replaying.store(true, Ordering::Release);
    }

    /// The replay ended with the change at `revision`.
    async fn finish_replay(&self, revision: u64) {
        let before = self.status.replay_evictions.load(Ordering::Acquire);
        let replica = self.cache.mark_replica(before);
        self.log.start_after(revision);
        self.status.replaying.store(false, Ordering::Release);
        self.status.warmed_up.store(true, Ordering::Release);
        // `revision`, not `applied_revision()`: the entry that ends the
        // replay is recorded as applied only after this.
        tracing::info!(
            revision,
            target = self.status.replay_target.load(Ordering::Acquire),
            entries = self.status.replayed.load(Ordering::Acquire),
            cache_holds_every_user = replica,
            "replay of the KV bucket complete"
        );
    }

    /// The periodic look at the bucket beside a running watch: whether to
    /// replace the watch, and whether a replay that nothing more will
    /// arrive for is done.
    async fn check(&self, followed: Option<OffsetDateTime>, progress: &mut Progress) -> Next {
        let Followed::Same(id) = check_bucket(self.store, followed).await else {
            return Next::Restart;
        };
        let applied = self.status.applied_revision();
        let lag = match id {
            Some(id) => {
                progress
                    .look(self.store, applied, id.last_revision, Instant::now())
                    .await
            }
            None => Lag::No,
        };
        if lag == Lag::Stuck {
            self.metrics
                .watch_stalls
                .with_label_values(&["stood_still"])
                .inc();
            tracing::warn!(
                applied,
                last = id.map(|id| id.last_revision),
                "the KV watch delivers nothing while the bucket moved on; watching again from the last applied revision"
            );
            return Next::Restart;
        }
        // Nothing will arrive to end the replay when everything expired
        // between counting and watching, when it has applied the bucket's
        // last revision already (a replay resumed after one that stopped
        // short), or when only expired entries lie after what it applied.
        if self.status.replaying()
            && (lag == Lag::Expired
                || id.is_some_and(|id| id.messages == 0 || id.last_revision <= applied))
        {
            self.finish_replay(applied).await;
        }
        Next::Continue
    }
}

/// How often a running watch checks that the bucket it follows still
/// exists as the same incarnation.
const IDENTITY_CHECK: Duration = Duration::from_secs(2);

/// What the periodic check found.
enum Followed {
    /// The same bucket, with its state when the hub answered.
    Same(Option<BucketIdentity>),
    /// Deleted (the center recreates it) or recreated: start over.
    Gone,
}

async fn check_bucket(
    store: &dyn PresenceStore,
    followed: Option<time::OffsetDateTime>,
) -> Followed {
    match store.identity().await {
        Ok(id) if Some(id.created) != followed => Followed::Gone,
        Ok(id) => Followed::Same(Some(id)),
        Err(StoreError::NotReady(reason)) => {
            tracing::warn!(%reason, "the KV bucket is gone; recreating it where this node may");
            if let Err(err) = store.ensure_bucket().await {
                tracing::warn!(error = %err, "cannot recreate the KV bucket yet");
            }
            Followed::Gone
        }
        // Hub unreachable: keep the watch; it resumes by itself.
        Err(_) => Followed::Same(None),
    }
}

/// Tells a watch that stopped delivering while the bucket moved on: its
/// applied revision stood still for at least half a check's interval
/// (normally a whole one) while the bucket's leader held a change after it
/// that was already there when the watch was first seen behind. An
/// ordered consumer served by a replica that lags, or one async-nats keeps
/// recreating in the background (it retries without end and reports
/// nothing), looks like this: no error, no end, no changes. A change
/// written since has its own interval's time to arrive.
#[derive(Debug, Default)]
struct Progress {
    behind: Option<Behind>,
    /// The bucket's last revision when the leader stored nothing after the
    /// applied revision (its newest entries expired): no need to ask again
    /// until it moves.
    expired_at: Option<u64>,
}

/// When, and how far, the watch was first seen behind.
#[derive(Debug, Clone, Copy)]
struct Behind {
    applied: u64,
    last: u64,
    since: Instant,
}

/// What [`Progress::look`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lag {
    /// Not behind, still moving, or behind for less than a check.
    No,
    /// Not moved for a check while the leader held a change it had then.
    Stuck,
    /// Behind the bucket's last revision only because its newest entries
    /// expired: nothing is stored after the applied revision.
    Expired,
}

impl Progress {
    /// Looks at the watch at `now`, with `applied` and the bucket's `last`
    /// revision; asks the leader only when the watch stood still.
    async fn look(
        &mut self,
        store: &dyn PresenceStore,
        applied: u64,
        last: u64,
        now: Instant,
    ) -> Lag {
        if last <= applied {
            *self = Progress::default();
            return Lag::No;
        }
        if self.expired_at == Some(last) {
            return Lag::Expired;
        }
        let behind = match self.behind {
            Some(behind) if behind.applied == applied => behind,
            _ => {
                self.behind = Some(Behind {
                    applied,
                    last,
                    since: now,
                });
                return Lag::No;
            }
        };
        if now.saturating_duration_since(behind.since) < IDENTITY_CHECK / 2 {
            return Lag::No;
        }
        match store.first_after(applied).await {
            Ok(None) => {
                self.expired_at = Some(last);
                Lag::Expired
            }
            Ok(Some(next)) if next <= behind.last => Lag::Stuck,
            Ok(Some(_)) => {
                // Only changes newer than the first look: their turn now.
                self.behind = Some(Behind {
                    applied,
                    last,
                    since: now,
                });
                Lag::No
            }
            Err(_) => Lag::No,
        }
    }
}

/// Applies a watch's changes until it fails, ends, or has to be replaced:
/// the bucket is gone or recreated, its replay ended short of the bucket,
/// or it went quiet while the bucket moved on (see [`Progress`]).
async fn follow(sinks: &Sinks<'_>, mut changes: ChangeStream, followed: Option<OffsetDateTime>) {
    let mut check = tokio::time::interval(IDENTITY_CHECK);
    // A slow check is followed by a whole interval, not a burst of checks
    // that would find the watch "not moving" in milliseconds.
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut progress = Progress::default();
    loop {
        tokio::select! {
            item = changes.next() => match item {
                Some(Ok(entry)) => sinks.apply_or_skip(entry).await,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "KV watch failed; resuming from the last applied revision");
                    return;
                }
                None => return,
            },
            _ = check.tick() => {
                if sinks.check(followed, &mut progress).await == Next::Restart {
                    return;
                }
            }
        }
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
        store: store.as_ref(),
        cache: &cache,
        status: &status,
        metrics: &metrics,
        feed: &feed,
        log: &log,
    };
    let echoes = echo_filter(&cache, &feed);
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
                    sinks.log.reset();
                    status.restart_from_scratch();
                }
                followed = Some(id.created);
                if status.applied_revision() == 0 {
                    // A full replay starts; with nothing to replay it is done.
                    sinks.start_replay(id.last_revision);
                    if id.messages == 0 {
                        sinks.finish_replay(id.last_revision).await;
                    }
                }
            }
            Err(err) => {
                if matches!(err, StoreError::NotReady(_)) {
                    let _ = store.ensure_bucket().await;
                }
                if failures.is_multiple_of(20) {
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
        match store.watch(start, echoes.clone()).await {
            Ok(changes) => {
                tracing::info!(?start, "KV watch started");
                status.active.store(true, Ordering::Relaxed);
                metrics.watch_active.set(1);
                failures = 0;
                follow(&sinks, changes, followed).await;
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

/// Claims the echoes of this node's own writes that the cache applied
/// already and that no stream follows, so the store leaves them
/// undecoded. A stream that starts following the user after the claim is
/// no different from one that started just after the change was fed.
/// Every other change (a replay's, another node's) costs one atomic load.
fn echo_filter(cache: &PresenceCache, feed: &ChangeFeed) -> EchoFilter {
    let (cache, feed) = (cache.clone(), feed.clone());
    Arc::new(move |revision, user_id| {
        cache.is_own_write(revision) && !feed.follows(user_id) && cache.claim_echo(revision)
    })
}

/// A change that crashes the watch this many times in a row is skipped.
pub const MAX_STRIKES: u32 = 3;

/// Runs [`run`] for as long as the node lives. The task is awaited through
/// its `JoinHandle`, so a panic is caught, counted and logged, and the watch
/// is restarted from the last revision it applied after a backoff (100 ms
/// doubling to 5 s; reset once a run lasted a minute). While it is down,
/// [`WatchStatus::crashed`] makes readiness report the node not ready.
pub async fn supervise(
    store: Arc<dyn PresenceStore>,
    cache: PresenceCache,
    status: Arc<WatchStatus>,
    metrics: Metrics,
    feed: ChangeFeed,
    log: Arc<EventLog>,
) {
    let for_run = status.clone();
    let for_supervisor = metrics.clone();
    let watch = move || {
        run(
            store.clone(),
            cache.clone(),
            for_run.clone(),
            metrics.clone(),
            feed.clone(),
            log.clone(),
        )
    };
    supervised(status, for_supervisor, watch).await;
}

/// The supervision loop of [`supervise`], for any task.
async fn supervised<F, Fut>(status: Arc<WatchStatus>, metrics: Metrics, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut in_a_row: u32 = 0;
    let mut strikes: (u64, u32) = (0, 0);
    loop {
        let started = std::time::Instant::now();
        let task = tokio::spawn(start());
        status.crashed.store(false, Ordering::Release);
        let outcome = task.await;
        status.crashed.store(true, Ordering::Release);
        status.active.store(false, Ordering::Relaxed);
        metrics.watch_active.set(0);
        match outcome {
            Ok(()) => tracing::error!("the KV watch ended; restarting it"),
            Err(err) if err.is_panic() => {
                // A panic while applying a change blames that change; one
                // elsewhere (0) blames none.
                let blamed = status.applying.swap(0, Ordering::AcqRel);
                strikes = match strikes {
                    (revision, n) if revision == blamed => (revision, n.saturating_add(1)),
                    _ => (blamed, 1),
                };
                if blamed > 0 && strikes.1 >= MAX_STRIKES {
                    status.skip.store(blamed, Ordering::Release);
                }
                status.crashes.fetch_add(1, Ordering::Relaxed);
                metrics.watch_crashes.inc();
                tracing::error!(
                    panic = %panic_message(err.into_panic()),
                    revision = blamed,
                    "the KV watch panicked; restarting it"
                );
            }
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        }
        if started.elapsed() > Duration::from_secs(60) {
            in_a_row = 0;
        }
        in_a_row = in_a_row.saturating_add(1);
        tokio::time::sleep(crash_backoff(in_a_row)).await;
    }
}

/// 100 ms, doubling with each crash in a row, at most 5 s.
fn crash_backoff(in_a_row: u32) -> Duration {
    let exp = in_a_row.saturating_sub(1).min(6);
    Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(5))
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(not a string)".to_owned(), |s| (*s).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::FeedError;
    use crate::record::Update;
    use crate::session::Seen;
    use crate::store::memory::MemoryStore;
    use crate::store::{Change, Expect};

    fn seen() -> Update {
        Update::Seen(Some(Seen {
            last_seen: OffsetDateTime::now_utc(),
            node_id: "n".into(),
        }))
    }

    async fn write(store: &MemoryStore, user: &str, expect: u64) -> u64 {
        store
            .write(user, &seen(), None, Expect::Key(expect))
            .await
            .expect("written")
    }

    /// What a watch applies changes to: a replica cache and a started
    /// event log over a memory store.
    struct Fixture {
        store: MemoryStore,
        metrics: Metrics,
        cache: PresenceCache,
        status: WatchStatus,
        feed: ChangeFeed,
        log: EventLog,
    }

    impl Fixture {
        fn new() -> Self {
            let metrics = Metrics::new().expect("metrics");
            let cache = PresenceCache::new(1 << 20, 16, metrics.cache.clone());
            assert!(cache.mark_replica(0));
            let log = EventLog::default();
            log.start_after(0);
            Fixture {
                store: MemoryStore::new(),
                metrics,
                cache,
                status: WatchStatus::default(),
                feed: ChangeFeed::new(16),
                log,
            }
        }

        fn sinks(&self) -> Sinks<'_> {
            Sinks {
                store: &self.store,
                cache: &self.cache,
                status: &self.status,
                metrics: &self.metrics,
                feed: &self.feed,
                log: &self.log,
            }
        }
    }

    /// A revision passed over in a bucket since recreated is another
    /// change in the new one, and is applied.
    #[test]
    fn a_recreated_bucket_forgets_the_revision_passed_over() {
        let status = WatchStatus::default();
        status.skip.store(5, Ordering::Release);
        status.restart_from_scratch();
        assert_eq!(status.skip.load(Ordering::Acquire), 0);
    }

    /// The echo of an own write that the cache holds and no stream
    /// follows is passed over undecoded, and still puts the write's event
    /// in the log; an echo a stream needs, and another node's write, come
    /// decoded and are applied and fed as before.
    #[tokio::test]
    async fn own_echoes_nobody_follows_are_passed_over_undecoded() {
        let f = Fixture::new();
        let Fixture {
            store,
            metrics,
            cache,
            status,
            feed,
            log,
        } = &f;
        let sinks = f.sinks();
        let mut follows_bob = feed.subscribe(&["bob".to_owned()]);
        let mut changes = store
            .watch(WatchStart::After(0), echo_filter(cache, feed))
            .await
            .expect("watch");
        let own = |user: &str, revision| {
            let change = Change {
                user_id: user.into(),
                update: seen(),
                revision,
                stored_at: OffsetDateTime::now_utc(),
                pending: 0,
            };
            cache.apply_own(&change, |applied| {
                assert!(matches!(applied, Applied::Changed { .. }));
                log.note_local(revision, crate::record::PresenceView::unknown(user));
            });
        };
        let mut next = async || changes.next().await.expect("an entry").expect("ok");

        own("ann", write(store, "ann", 0).await);
        let echo = next().await;
        assert!(matches!(echo, Entry::Echo { revision: 1, .. }), "{echo:?}");
        sinks.apply_or_skip(echo).await;
        assert_eq!(metrics.watch_echoes_undecoded.get(), 1);
        assert_eq!(status.applied_revision(), 1);
        let users = ["ann"].into();
        let events = log.replay(0, 1, &users).expect("the log vouches for 1");
        assert_eq!(events.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [1]);

        own("bob", write(store, "bob", 0).await);
        let followed = next().await;
        assert!(matches!(followed, Entry::Change(_)), "{followed:?}");
        sinks.apply_or_skip(followed).await;
        assert_eq!(follows_bob.recv().await.map(|c| c.change.revision), Ok(2));

        // Another node's write: not this node's own, so it is decoded.
        write(store, "ann", 1).await;
        let theirs = next().await;
        assert!(matches!(theirs, Entry::Change(_)), "{theirs:?}");
        sinks.apply_or_skip(theirs).await;
        let ann = cache.known("ann").expect("cached");
        assert_eq!(ann.revision_for(&seen()), 3);
        assert_eq!(metrics.watch_echoes_undecoded.get(), 1);
    }

    /// A change the supervisor gave up on leaves its user to the store
    /// (the cache still answers for everyone else) and a gap in the event
    /// log, so no stream resumes across it as if it never happened.
    #[tokio::test]
    async fn a_change_passed_over_leaves_its_user_to_the_store() {
        let f = Fixture::new();
        let Fixture {
            cache,
            status,
            feed,
            log,
            ..
        } = &f;
        let sinks = f.sinks();
        let mut follows_u = feed.subscribe(&["u".to_owned()]);
        let mut follows_other = feed.subscribe(&["other".to_owned()]);
        let change = |user: &str, revision| {
            Entry::Change(Change {
                user_id: user.into(),
                update: seen(),
                revision,
                stored_at: OffsetDateTime::now_utc(),
                pending: 0,
            })
        };
        sinks.apply_or_skip(change("u", 1)).await;
        sinks.apply_or_skip(change("other", 2)).await;
        status.skip.store(3, Ordering::Release);
        sinks.apply_or_skip(change("u", 3)).await;
        assert_eq!(status.applied_revision(), 3);
        assert!(cache.known("u").is_none(), "u is read from the store again");
        assert!(cache.known("other").is_some());
        assert!(cache.known("nobody").is_some(), "still a replica");
        let users = ["u", "other"].into();
        assert!(log.replay(2, 3, &users).is_none(), "a gap at 3");
        assert!(log.replay(3, 3, &users).is_some());
        // A stream following u cannot be told what changed: it ends, and
        // its client resumes from a snapshot. Others go on.
        assert_eq!(follows_u.recv().await.err(), Some(FeedError::Lagged));
        assert_eq!(follows_other.recv().await.map(|c| c.change.revision), Ok(2));
    }

    #[tokio::test]
    async fn a_watch_standing_still_behind_a_change_the_leader_held_is_stuck() {
        let store = MemoryStore::new();
        let (applied, last) = (write(&store, "a", 0).await, write(&store, "b", 0).await);
        let (mut progress, t0) = (Progress::default(), Instant::now());
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(progress.look(&store, applied, last, t0).await, Lag::No);
        // A burst of checks milliseconds apart proves nothing.
        assert_eq!(progress.look(&store, applied, last, at(20)).await, Lag::No);
        assert_eq!(
            progress.look(&store, applied, last, at(2000)).await,
            Lag::Stuck
        );
        // Moving on, or catching up, starts over.
        assert_eq!(progress.look(&store, last, last, at(4000)).await, Lag::No);
        assert_eq!(
            progress.look(&store, applied + 1, last + 1, at(6000)).await,
            Lag::No
        );
    }

    #[tokio::test]
    async fn a_watch_behind_only_an_expired_tail_is_not_stuck() {
        let store = MemoryStore::new();
        let applied = write(&store, "a", 0).await;
        // The bucket's last revision is past anything still stored.
        let last = applied + 2;
        let (mut progress, t0) = (Progress::default(), Instant::now());
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(progress.look(&store, applied, last, t0).await, Lag::No);
        assert_eq!(
            progress.look(&store, applied, last, at(2000)).await,
            Lag::Expired
        );
        assert_eq!(
            progress.look(&store, applied, last, at(4000)).await,
            Lag::Expired
        );
    }

    #[tokio::test]
    async fn a_change_newer_than_the_first_look_gets_its_own_interval() {
        let store = MemoryStore::new();
        let applied = write(&store, "a", 0).await;
        let replaced = write(&store, "x", 0).await;
        let (mut progress, t0) = (Progress::default(), Instant::now());
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(progress.look(&store, applied, replaced, t0).await, Lag::No);
        // The change the first look saw is replaced by a newer one (the
        // bucket keeps one value per key), which the watch may not have
        // had time for yet.
        let newer = write(&store, "x", replaced).await;
        assert_eq!(
            progress.look(&store, applied, newer, at(2000)).await,
            Lag::No
        );
        assert_eq!(
            progress.look(&store, applied, newer, at(4000)).await,
            Lag::Stuck
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_that_keeps_crashing_the_watch_is_passed_over() {
        let status = Arc::new(WatchStatus::default());
        let metrics = Metrics::new().expect("metrics");
        let runs = Arc::new(AtomicU64::new(0));
        let (task_status, task_runs) = (status.clone(), runs.clone());
        let supervisor = tokio::spawn(supervised(status.clone(), metrics, move || {
            let (status, runs) = (task_status.clone(), task_runs.clone());
            async move {
                runs.fetch_add(1, Ordering::AcqRel);
                if status.skip.load(Ordering::Acquire) == 7 {
                    std::future::pending::<()>().await;
                }
                status.applying.store(7, Ordering::Release);
                panic!("change 7 can't be applied");
            }
        }));
        while status.skip.load(Ordering::Acquire) != 7 || status.crashed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status.snapshot().crashes, u64::from(MAX_STRIKES));
        assert_eq!(runs.load(Ordering::Acquire), u64::from(MAX_STRIKES) + 1);
        supervisor.abort();
    }

    #[test]
    fn crash_backoff_doubles_and_is_capped() {
        let delays: Vec<u64> = (1..=9)
            .map(|n| crash_backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }
}
