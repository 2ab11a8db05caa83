//! Warm-up: a node restarted against a bucket of `BENCH_USERS` presences,
//! from process start to ready and to serving all of them from its cache,
//! next to the time a plain KV watch takes to read the whole bucket. The
//! CPU each of the two used is reported too: on two shared cores the wall
//! times move with the host by ±20%, the CPU a replay costs much less.
//! A node is ready only once it has replayed the bucket; the section then
//! restarts one that takes traffic at once (`READINESS_WARMUP_TIMEOUT_SECS=0`)
//! and reads random users while it replays (what clients would meet without
//! the wait) and once it serves from cache.

use crate::Bench;
use crate::load::{WRK_SECONDS, Wrk, watch_whole_bucket, wrk_write_script};
use crate::node::{
    cache_metrics, cpu_seconds, http_ok, spawn_service, spawn_service_with, start_service,
    time_until,
};
use crate::sections::memory::{self, BUCKET, PREFIX};
use std::hash::BuildHasher as _;
use std::time::{Duration, Instant};

/// Issue #17: ready and serving every user from cache within 10 s.
const WARM_LIMIT: Duration = Duration::from_secs(10);
/// Give up well past the target: a miss is reported, a hang is not.
const GIVE_UP: Duration = Duration::from_secs(300);

/// Fills the bucket unless the memory section did, reads it raw, then
/// restarts a node on it.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    if bench.seen.memory_bucket_users < bench.users {
        println!("  (filling {BUCKET} with {} users first)", bench.users);
        let filler = start_service(bench.root(), "fill", "center", &bench.hub, BUCKET).await;
        memory::fill(bench, &filler, bench.seen.memory_bucket_users, bench.users).await?;
        bench.seen.memory_bucket_users = bench.users;
    }
    // The ceiling first, while no node of this bucket runs.
    let bench_cpu = cpu_seconds(std::process::id());
    let (keys, raw) =
        tokio::time::timeout(GIVE_UP, watch_whole_bucket(&bench.hub, BUCKET)).await??;
    let raw_cpu = cpu_seconds(std::process::id()) - bench_cpu;
    let Restarted { ready, cached, cpu } = restart(bench).await?;
    let users = bench.users;
    let report = &mut bench.report;
    report.add(
        "warm-up",
        format!("raw KV watch reading the whole bucket ({keys} keys) from the bench"),
        format!("{:.2} s", raw.as_secs_f64()),
        format!(
            "latest value per key, as the service's own watch starts; {raw_cpu:.2} s of the bench's CPU"
        ),
    );
    report.add(
        "warm-up",
        format!("node restarted on {users} presences: process start to ready"),
        format!("{:.0} ms", ready.as_secs_f64() * 1000.0),
        "GET /health/readiness = 200 (it waits for the node's first replay of the bucket)",
    );
    report.add(
        "warm-up",
        "same: process start to serving all from cache",
        format!("{:.2} s", cached.as_secs_f64()),
        format!(
            "cache entries >= {users} and a random user answered as a cache hit; {:.2}x of the raw watch",
            cached.as_secs_f64() / raw.as_secs_f64()
        ),
    );
    report.add(
        "warm-up",
        "same: the node's CPU (user + system) until serving all from cache",
        format!("{cpu:.2} s"),
        format!(
            "{:.1} us per presence; {:.2}x of the raw watch's CPU",
            cpu * 1e6 / users as f64,
            cpu / raw_cpu.max(f64::EPSILON)
        ),
    );
    report.target(
        format!(
            "warm-up: restart on {users} presences to serving all from cache <= {} s",
            WARM_LIMIT.as_secs()
        ),
        format!(
            "{:.2} s ({:.2}x of the raw watch)",
            cached.as_secs_f64(),
            cached.as_secs_f64() / raw.as_secs_f64()
        ),
        format!("raw KV watch of the bucket {:.2} s", raw.as_secs_f64()),
        cached <= WARM_LIMIT,
    );
    reads_during_replay(bench).await
}

/// wrk connections of the reads during a replay.
const REPLAY_READERS: u32 = 16;

/// Reads of random users of the bucket on a node restarted again: from
/// ready on, while it replays (each read then goes to the hub, the cache
/// not yet holding every user), and again once it serves all from cache.
/// Every read must be answered 200: the users all exist.
async fn reads_during_replay(bench: &mut Bench) -> anyhow::Result<()> {
    let last = bench.users.saturating_sub(1);
    let script = wrk_write_script(
        bench.root(),
        "warm-read",
        "GET",
        &format!("\"/api/v2/presence/{PREFIX}\" .. math.random(0, {last})"),
        "",
        &bench.read_token,
    )?;
    let started = Instant::now();
    // Ready at once, as every node was before readiness waited for the
    // replay: the reads below are what that meant.
    let node = spawn_service_with(
        bench.root(),
        ("warm-read", "center"),
        &bench.hub,
        BUCKET,
        &[("READINESS_WARMUP_TIMEOUT_SECS", "0")],
    );
    let readiness = format!("{}/health/readiness", node.base);
    let http = bench.http.clone();
    time_until(
        "readiness",
        started,
        Duration::from_millis(2),
        GIVE_UP,
        || http_ok(&http, &readiness),
    )
    .await?;
    let url = format!("{}/", node.base);
    let wrk = Wrk {
        connections: REPLAY_READERS,
        url: &url,
        auth: None,
        script: Some(&script),
    };
    let during = wrk.run(&mut bench.report)?;
    let replayed_in = until_serving_all(bench, &node.base, started).await?;
    let after = wrk.run(&mut bench.report)?;
    let report = &mut bench.report;
    report.add(
        "warm-up",
        format!(
            "reads of random users in the {WRK_SECONDS} s from ready on, while the node replays, c={REPLAY_READERS}: req/s (p99)"
        ),
        format!("{:.0}", during.rps),
        format!(
            "p99 {:.2} ms; all 200; a node ready at once (READINESS_WARMUP_TIMEOUT_SECS=0), under this load serving all from cache {:.2} s after its start",
            during.p99_ms,
            replayed_in.as_secs_f64()
        ),
    );
    report.add(
        "warm-up",
        format!("same node once serving all from cache, c={REPLAY_READERS}: req/s (p99)"),
        format!("{:.0}", after.rps),
        format!(
            "p99 {:.2} ms; the reads during the replay ran at {:.2}x of this",
            after.p99_ms,
            during.rps / after.rps.max(f64::EPSILON)
        ),
    );
    Ok(())
}

/// What a restart on the filled bucket took.
struct Restarted {
    /// Process start to ready.
    ready: Duration,
    /// Process start to serving every user from cache.
    cached: Duration,
    /// The node's CPU seconds by then.
    cpu: f64,
}

/// Starts a fresh node on the filled bucket and times it.
async fn restart(bench: &Bench) -> anyhow::Result<Restarted> {
    let started = Instant::now();
    let node = spawn_service(bench.root(), "warm", "center", &bench.hub, BUCKET);
    let http = &bench.http;
    let readiness = format!("{}/health/readiness", node.base);
    let ready = time_until(
        "readiness",
        started,
        Duration::from_millis(2),
        GIVE_UP,
        || http_ok(http, &readiness),
    )
    .await?;
    let cached = until_serving_all(bench, &node.base, started).await?;
    let cpu = cpu_seconds(node.proc.pid());
    Ok(Restarted { ready, cached, cpu })
}

/// From `started` until the node at `base` serves every user from cache.
async fn until_serving_all(
    bench: &Bench,
    base: &str,
    started: Instant,
) -> anyhow::Result<Duration> {
    // Coarse polling: each look at the cache settles moka's pending work,
    // which would slow the replay it measures.
    time_until(
        "serving every user from cache",
        started,
        Duration::from_millis(25),
        GIVE_UP,
        || serving_all_from_cache(bench, base),
    )
    .await
}

/// The cache holds every user, and a read of a random one is a cache hit
/// (while the node replays the bucket, reads bypass the cache).
async fn serving_all_from_cache(bench: &Bench, base: &str) -> bool {
    let (http, token) = (&bench.http, &bench.read_token);
    let Some((entries, hits)) = cache_metrics(http, base, token).await else {
        return false;
    };
    if entries < bench.users as u64 {
        return false;
    }
    let pick = std::hash::RandomState::new().hash_one(Instant::now()) % bench.users as u64;
    let url = format!("{base}/api/v2/presence/{PREFIX}{pick}");
    let answered = matches!(
        http.get(url).bearer_auth(token).send().await,
        Ok(r) if r.status() == 200
    );
    answered
        && cache_metrics(http, base, token)
            .await
            .is_some_and(|(_, after)| after > hits)
}
