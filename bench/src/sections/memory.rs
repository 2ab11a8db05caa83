//! Memory per cached presence: a fresh node's RSS growth as its bucket fills
//! to `BENCH_USERS`, next to what moka alone takes per entry.

use crate::Bench;
use crate::load::batch;
use crate::node::{CACHE_MAX_COST, Service, cache_metrics, start_service};
use anyhow::{Context as _, bail};
use futures::StreamExt;
use std::process::Command;
use std::time::Duration;
use testkit::{bench_bin_dir as bin_dir, rss_bytes};

/// The bucket the memory section fills and the warm-up section replays.
pub const BUCKET: &str = "MEMBENCH";
/// Its users are `m0`, `m1`, ...
pub const PREFIX: &str = "m";
/// Issue #17: at most this many bytes of RSS per cached user.
const BYTES_TARGET: f64 = 300.0;
/// How the service pre-sizes its cache by default: CACHE_NUM_COUNTERS
/// (100 000) / 10.
const SERVICE_INITIAL_CAPACITY: usize = 10_000;

/// Writes users `{PREFIX}{from}..{PREFIX}{to}` through `node` in batches of
/// 1000, four at a time, and waits until its cache holds `to` entries.
pub async fn fill(bench: &Bench, node: &Service, from: usize, to: usize) -> anyhow::Result<()> {
    let (http, token) = (&bench.http, &bench.write_token);
    let writers = futures::stream::iter((from..to).step_by(1000))
        .map(|start| batch(http, &node.base, token, PREFIX, start, 1000.min(to - start)))
        .buffer_unordered(4);
    let results: Vec<anyhow::Result<Duration>> = writers.collect().await;
    for result in results {
        result?;
    }
    let read = &bench.read_token;
    testkit::wait_until(
        "the cache to hold every write",
        Duration::from_secs(120),
        || async {
            cache_metrics(http, &node.base, read)
                .await
                .is_some_and(|(entries, _)| entries >= to as u64)
        },
    )
    .await;
    Ok(())
}

/// RSS of a fresh node, empty and at a tenth and all of the users; then
/// moka's own bytes per entry in a process of its own.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let mem = start_service(bench.root(), "mem", "center", &bench.hub, BUCKET).await;
    let empty = rss_bytes(mem.proc.pid());
    let (mut full, mut tenth) = (empty, empty);
    for target in [bench.users / 10, bench.users] {
        fill(bench, &mem, bench.seen.memory_bucket_users, target).await?;
        bench.seen.memory_bucket_users = target;
        tenth = full;
        full = rss_bytes(mem.proc.pid());
        bench.report.add(
            "memory",
            format!("RSS with {target} cached presences"),
            format!("{:.1} MiB", full as f64 / 1048576.0),
            format!("empty: {:.1} MiB", empty as f64 / 1048576.0),
        );
    }
    // Killed before moka's own process starts, so the two don't share memory.
    drop(mem);
    let per_user = (full as f64 - empty as f64) / bench.users as f64;
    // The growth from a tenth of the users to all of them leaves out what
    // a node holds once, however many users it caches (the stream event
    // log's up to 32768 events, the allocator's and moka's fixed parts).
    let marginal = (full as f64 - tenth as f64) / (bench.users - bench.users / 10) as f64;
    let moka = moka_bytes_per_entry(bench)?;
    let share = moka / per_user * 100.0;
    let report = &mut bench.report;
    report.add(
        "memory",
        format!("bytes per cached user ({} vs empty)", bench.users),
        format!("{per_user:.0} B"),
        format!(
            "moka's own share: {moka:.0} B ({share:.0}%); the rest is key, record and presence"
        ),
    );
    report.add(
        "memory",
        format!(
            "bytes per further cached user ({} vs {})",
            bench.users,
            bench.users / 10
        ),
        format!("{marginal:.0} B"),
        "without what a node holds once (the stream event log, fixed tables)",
    );
    report.add(
        "memory",
        format!(
            "moka alone: bytes per entry, {} u32 -> () entries, built like the service's cache",
            bench.users
        ),
        format!("{moka:.0} B"),
        "RSS difference in a process of its own (bench/src/bin/moka-overhead.rs)",
    );
    report.target(
        format!(
            "<= {BYTES_TARGET} bytes per cached user at {} users",
            bench.users
        ),
        format!("{per_user:.0} B"),
        format!("absolute; moka alone {moka:.0} B/entry ({share:.0}% of ours)"),
        per_user <= BYTES_TARGET,
    );
    Ok(())
}

/// Runs bench/src/bin/moka-overhead.rs for as many entries as the node
/// cached and reads its `bytes_per_entry=` line.
fn moka_bytes_per_entry(bench: &mut Bench) -> anyhow::Result<f64> {
    let args = [
        bench.users.to_string(),
        CACHE_MAX_COST.to_string(),
        SERVICE_INITIAL_CAPACITY.to_string(),
    ];
    bench
        .report
        .commands
        .push(format!("moka-overhead {}", args.join(" ")));
    let output = Command::new(bin_dir().join("moka-overhead"))
        .args(&args)
        .output()
        .context("run moka-overhead (built with presence-bench)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "moka-overhead failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    text.split_whitespace()
        .find_map(|field| field.strip_prefix("bytes_per_entry="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no bytes_per_entry in moka-overhead's output: {text}"))
}
