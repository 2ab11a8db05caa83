//! Benchmark-only: moka's own memory per entry, so the memory figure can say
//! which share of a cached user's bytes is the cache's bookkeeping. Builds a
//! `moka::sync::Cache` the way dataplane/src/cache.rs builds the service's
//! (weigher, max capacity, initial capacity, eviction listener, the same
//! keyed hasher), with the same allocator, fills it with the smallest keys
//! and values (`u32 -> ()`) and prints the RSS growth per entry.
//!
//! Usage: `moka-overhead ENTRIES MAX_CAPACITY INITIAL_CAPACITY`

use anyhow::{Context as _, bail};
use moka::notification::RemovalCause;
use moka::sync::Cache;
use presence_dataplane::cache::KeyHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// About what the service's weigher gives a cached user (160 B fixed
/// estimate plus key and record). The weights only matter relative to the
/// capacity: moka sizes its frequency sketch once the cache is half full,
/// so the same fill level keeps the same bookkeeping.
const WEIGHT: u32 = 300;

fn arg<T: std::str::FromStr>(args: &[String], index: usize, name: &str) -> anyhow::Result<T> {
    args.get(index)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("usage: moka-overhead ENTRIES MAX_CAPACITY INITIAL_CAPACITY ({name} missing or not a number)"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let entries: u32 = arg(&args, 0, "ENTRIES")?;
    let max_capacity: u64 = arg(&args, 1, "MAX_CAPACITY")?;
    let initial_capacity: usize = arg(&args, 2, "INITIAL_CAPACITY")?;
    let before = testkit::rss_bytes(std::process::id());
    let evicted = Arc::new(AtomicU64::new(0));
    let counted = evicted.clone();
    let cache: Cache<u32, (), KeyHasher> = Cache::builder()
        .max_capacity(max_capacity)
        .initial_capacity(initial_capacity)
        .weigher(|_, _| WEIGHT)
        .eviction_listener(move |_, _, cause| {
            if cause == RemovalCause::Size {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build_with_hasher(KeyHasher::new());
    for key in 0..entries {
        cache.insert(key, ());
    }
    cache.run_pending_tasks();
    let after = testkit::rss_bytes(std::process::id());
    let held = cache.entry_count();
    if held != u64::from(entries) {
        bail!(
            "the cache holds {held} of {entries} entries ({} evicted): raise MAX_CAPACITY",
            evicted.load(Ordering::Relaxed)
        );
    }
    println!(
        "entries={entries} rss_before={before} rss_after={after} bytes_per_entry={:.1}",
        after.saturating_sub(before) as f64 / f64::from(entries)
    );
    Ok(())
}
