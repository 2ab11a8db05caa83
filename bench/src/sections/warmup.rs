//! Warm-up: a node restarted against a bucket of `BENCH_USERS` presences,
//! from process start to ready and to serving all of them from its cache,
//! next to the time a plain KV watch takes to read the whole bucket. The
//! CPU each of the two used is reported too: on two shared cores the wall
//! times move with the host by ±20%, the CPU a replay costs much less.

use crate::Bench;
use crate::load::watch_whole_bucket;
use crate::node::{cache_metrics, cpu_seconds, http_ok, spawn_service, start_service, time_until};
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
        "GET /health/readiness = 200",
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
    // Coarser polling: each look at the cache settles moka's pending work,
    // which would slow the replay it measures.
    let cached = time_until(
        "serving every user from cache",
        started,
        Duration::from_millis(25),
        GIVE_UP,
        || serving_all_from_cache(bench, &node.base),
    )
    .await?;
    let cpu = cpu_seconds(node.proc.pid());
    Ok(Restarted { ready, cached, cpu })
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
