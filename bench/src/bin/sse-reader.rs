//! Benchmark-only: the SSE fan-out's readers in a process of their own, as
//! real viewers are, rather than tasks on the benchmark's runtime (which
//! also sends the writes). Reads one stream per line of standard input
//! (`TOKEN USERS`, users comma-separated) and opens them all at `BASE`.
//! Prints `ready` once each has ended its opening snapshot. Once no event
//! has come for 2 s, prints one line `MESSAGE UNIX_NANOS` per event whose
//! message starts with `fan-`, and exits. Finds the message as text, as a
//! thin client would, without parsing the JSON.
//!
//! Usage: `sse-reader BASE < streams`

use anyhow::{Context as _, bail};
use std::io::{BufRead, Write};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How long to wait for the streams to open and the first event.
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// Once events flow, this long without one means the writes are over.
const QUIET: Duration = Duration::from_secs(2);

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What a stream task reports.
enum Seen {
    /// The stream answered and its opening snapshot arrived.
    Open,
    /// A benchmark event: its message and the wall-clock arrival.
    Event(String, u128),
}

fn main() -> anyhow::Result<()> {
    let base = std::env::args()
        .nth(1)
        .context("usage: sse-reader BASE < streams")?;
    let mut streams = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if let Some((token, users)) = line.split_once(' ') {
            streams.push((token.to_owned(), users.to_owned()));
        }
    }
    if streams.is_empty() {
        bail!("no streams on standard input (lines of `TOKEN USERS`)");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(read_all(base, streams))
}

async fn read_all(base: String, streams: Vec<(String, String)>) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (token, users) in &streams {
        let response = http
            .get(format!("{base}/api/v2/presence/stream?users={users}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?;
        tokio::spawn(follow(response, tx.clone()));
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    let mut open = 0;
    // Arrivals are kept and printed once the writes are over, so no pipe
    // write competes with the streams while they are measured.
    let mut arrivals = Vec::new();
    loop {
        let wait = if arrivals.is_empty() {
            OPEN_WAIT
        } else {
            QUIET
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(Seen::Open)) => {
                open += 1;
                if open == streams.len() {
                    writeln!(out, "ready")?;
                    out.flush()?;
                }
            }
            Ok(Some(Seen::Event(message, at))) => arrivals.push((message, at)),
            Ok(None) | Err(_) => break,
        }
    }
    for (message, at) in arrivals {
        writeln!(out, "{message} {at}")?;
    }
    out.flush()?;
    Ok(())
}

/// Reads one stream until it ends.
async fn follow(mut response: reqwest::Response, seen: mpsc::UnboundedSender<Seen>) {
    let mut buffer = Vec::new();
    let mut opened = false;
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            if !opened && find(&block, b"event: snapshot-end").is_some() {
                opened = true;
                let _ = seen.send(Seen::Open);
            }
            // Snapshot events hold earlier writes; only live ones count.
            if let Some(message) = fan_message(&block).filter(|_| opened) {
                let _ = seen.send(Seen::Event(message, unix_nanos()));
            }
        }
    }
}

/// The `fan-…` message of an event block, found as text.
fn fan_message(block: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = br#""message":"fan-"#;
    let at = find(block, NEEDLE)?;
    let rest = &block[at + NEEDLE.len() - 4..];
    let end = rest.iter().position(|&b| b == b'"')?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
