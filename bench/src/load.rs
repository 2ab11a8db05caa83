//! Load generators and raw clients: wrk against the HTTP API, async-nats
//! against the bucket (the ceilings), and the statistics over what they saw.

use crate::node::JS_DOMAIN;
use crate::report::Report;
use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, kv::Store};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use testkit::Nats;

/// How long each wrk run lasts.
pub const WRK_SECONDS: u64 = 8;

/// Requests/s and latency percentiles (ms) from wrk's `--latency` output.
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|v| v * factor)
}

/// A wrk invocation: `connections` for [`WRK_SECONDS`] against `url`, with
/// a bearer token or a Lua script.
pub struct Wrk<'a> {
    pub connections: u32,
    pub url: &'a str,
    pub auth: Option<&'a str>,
    pub script: Option<&'a Path>,
}

impl Wrk<'_> {
    /// Runs wrk to the end.
    pub fn run(&self, report: &mut Report) -> anyhow::Result<WrkResult> {
        let output = self
            .command(report)
            .output()
            .context("run wrk (make bench installs it)")?;
        self.parse(&output)
    }

    /// Starts wrk and returns at once, so several can run side by side;
    /// finish with [`Wrk::wait`].
    pub fn spawn(&self, report: &mut Report) -> anyhow::Result<Child> {
        self.command(report)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run wrk (make bench installs it)")
    }

    /// Waits for a wrk started by [`Wrk::spawn`] and reads its figures.
    pub fn wait(&self, child: Child) -> anyhow::Result<WrkResult> {
        self.parse(&child.wait_with_output()?)
    }

    fn command(&self, report: &mut Report) -> Command {
        let mut command = Command::new("wrk");
        let connections = self.connections;
        command.args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{WRK_SECONDS}s"),
            "--latency",
        ]);
        if let Some(auth) = self.auth {
            command.args(["-H", &format!("Authorization: Bearer {auth}")]);
        }
        if let Some(script) = self.script {
            command.arg("-s").arg(script);
        }
        command.arg(self.url);
        report.commands.push(format!(
            "wrk -t2 -c{connections} -d{WRK_SECONDS}s --latency{}{} {}",
            if self.auth.is_some() {
                " -H 'Authorization: Bearer …'"
            } else {
                ""
            },
            self.script
                .map(|s| format!(" -s {}", s.display()))
                .unwrap_or_default(),
            self.url
        ));
        command
    }

    fn parse(&self, output: &Output) -> anyhow::Result<WrkResult> {
        let text = String::from_utf8_lossy(&output.stdout);
        if text.contains("Non-2xx") {
            bail!("wrk saw non-2xx answers from {}:\n{text}", self.url);
        }
        let rps = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
        let percentile = |p: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(p).and_then(parse_duration_ms))
                .unwrap_or(f64::NAN)
        };
        Ok(WrkResult {
            rps,
            p50_ms: percentile("50%"),
            p99_ms: percentile("99%"),
        })
    }
}

/// A wrk script sending `method` with a JSON `body` to `path_expr` (a Lua
/// expression over `counter`, so requests spread over 1000 users).
pub fn wrk_write_script(
    dir: &Path,
    name: &str,
    method: &str,
    path_expr: &str,
    body: &str,
    auth: &str,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.lua"));
    std::fs::write(
        &path,
        format!(
            "counter = 0\nrequest = function()\n  counter = counter + 1\n  local path = {path_expr}\n  return wrk.format(\"{method}\", path, {{[\"Authorization\"] = \"Bearer {auth}\", [\"Content-Type\"] = \"application/json\"}}, '{body}')\nend\n"
        ),
    )?;
    Ok(path)
}

/// The `p` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The item whose `key` is the median of the items' keys (the upper of
/// the two middle ones for an even count), leaving `items` in run order:
/// repeated runs are listed in order and the middle one is reported.
pub fn median_by<T>(items: &[T], key: impl Fn(&T) -> f64) -> anyhow::Result<&T> {
    let mut order: Vec<&T> = items.iter().collect();
    order.sort_by(|a, b| key(a).total_cmp(&key(b)));
    order
        .get(order.len() / 2)
        .copied()
        .context("no runs to take the median of")
}

/// Sorts `values` and returns their median.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, 0.5)
}

/// A presence as the service stores it, for the raw clients' puts.
pub fn bytes_of_presence() -> bytes::Bytes {
    bytes::Bytes::from_static(br#"{"userID":"raw","status":"online","message":"benchmarking","lastSeen":"2026-01-01T00:00:00.000Z","updatedAt":"2026-01-01T00:00:00.000Z","nodeID":"raw"}"#)
}

/// A raw client of the hub's JetStream through `nats` (the hub itself or a
/// leaf), with `bucket` opened the way the service opens it.
pub async fn open_bucket(nats: &Nats, bucket: &str) -> anyhow::Result<(jetstream::Context, Store)> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::with_domain(client, JS_DOMAIN);
    let kv = js.get_key_value(bucket).await?;
    Ok((js, kv))
}

/// Raw KV puts with `tasks` concurrent writers for `seconds`, each awaiting
/// its ack before the next put: (ops/s, p99 ms). Each writer owns its keys
/// (about 1000 in all), so conditional puts never conflict. The clock
/// starts once every key's current revision is known.
pub async fn raw_kv_puts(
    nats: &Nats,
    bucket: &str,
    tasks: u32,
    seconds: u64,
    puts: Puts,
) -> anyhow::Result<(f64, f64)> {
    let (_, kv) = open_bucket(nats, bucket).await?;
    let keys_per_task = (1000 / tasks).max(1);
    let mut owned = Vec::new();
    for task in 0..tasks {
        let mut keys = Vec::new();
        for j in 0..keys_per_task {
            let key = format!("raw{task}-{j}");
            let revision = match puts {
                Puts::Plain => 0,
                Puts::Conditional => current_revision(&kv, &key).await?,
            };
            keys.push((key, revision));
        }
        owned.push(keys);
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers = owned.into_iter().map(|keys| {
        let kv = kv.clone();
        tokio::spawn(async move { put_loop(&kv, keys, deadline, puts).await })
    });
    let mut all = Vec::new();
    for worker in futures::future::join_all(workers).await {
        all.extend(worker??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((all.len() as f64 / elapsed, percentile(&all, 0.99)))
}

/// The revision a conditional put to `key` must expect (0: none yet).
async fn current_revision(kv: &Store, key: &str) -> anyhow::Result<u64> {
    Ok(kv.entry(key).await?.map_or(0, |entry| entry.revision))
}

/// One writer of [`raw_kv_puts`]: puts to its keys in turn until
/// `deadline`, returning each put's latency (ms). A conditional put
/// (`Store::update`) carries the key's expected revision, as every write
/// of the service does; the hub then checks it against the key's last
/// message, which a plain put skips. A failed put is left out (a
/// conditional one then reads its key's revision again: a put that timed
/// out may still have been stored).
async fn put_loop(
    kv: &Store,
    mut keys: Vec<(String, u64)>,
    deadline: Instant,
    puts: Puts,
) -> anyhow::Result<Vec<f64>> {
    let value = bytes_of_presence();
    let mut latencies = Vec::new();
    let count = keys.len();
    for next in 0.. {
        if Instant::now() >= deadline {
            break;
        }
        let (key, revision) = &mut keys[next % count];
        let sent = Instant::now();
        let stored = match puts {
            Puts::Plain => kv.put(key.as_str(), value.clone()).await.is_ok(),
            Puts::Conditional => match kv.update(key.as_str(), value.clone(), *revision).await {
                Ok(stored) => {
                    *revision = stored;
                    true
                }
                Err(_) => {
                    *revision = current_revision(kv, key).await?;
                    false
                }
            },
        };
        if stored {
            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(latencies)
}

/// Whether raw puts carry an expectation, as the service's writes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Puts {
    /// Plain puts: the least the hub can do per key.
    Plain,
    /// Each put expects the key's current revision (pipelined: that the
    /// new key has no value yet, as a batch item creating a user does).
    Conditional,
}

/// `count` KV puts published back to back, then every ack awaited: the
/// least a 1000-item batch could take, since it has to write the same
/// keys through the same hub. Returns the time from the first publish to
/// the last ack.
pub async fn pipelined_puts(
    js: &jetstream::Context,
    kv: &Store,
    key_prefix: &str,
    count: usize,
    puts: Puts,
) -> anyhow::Result<Duration> {
    // The subject `Store::put` publishes to (the domain's API prefix first
    // when the bucket is reached through a domain).
    let api = if kv.use_jetstream_prefix {
        format!("$JS.{JS_DOMAIN}.API.")
    } else {
        String::new()
    };
    let subject = format!("{api}{}", kv.put_prefix.as_deref().unwrap_or(&kv.prefix));
    let value = bytes_of_presence();
    let started = Instant::now();
    let mut acks = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("{subject}{key_prefix}{i}");
        let mut message = jetstream::message::PublishMessage::build().payload(value.clone());
        if puts == Puts::Conditional {
            message = message.expected_last_subject_sequence(0);
        }
        acks.push(js.send_publish(key, message).await?.into_future());
    }
    futures::future::try_join_all(acks).await?;
    Ok(started.elapsed())
}

/// Reads every key of `bucket` once with a plain KV watch (latest value
/// per key, as the service's own watch starts): (keys read, time taken).
pub async fn watch_whole_bucket(nats: &Nats, bucket: &str) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let (_, kv) = open_bucket(nats, bucket).await?;
    let mut watch = kv.watch_with_history(">").await?;
    let mut read = 0u64;
    while let Some(entry) = watch.next().await {
        read += 1;
        // `delta` counts the entries still pending after this one.
        if entry?.delta == 0 {
            return Ok((read, started.elapsed()));
        }
    }
    bail!("the watch of {bucket} ended after {read} keys")
}

/// One batch set of `count` users `{prefix}{from}..` via `base`: the time
/// to the answer; fails unless every item succeeded.
pub async fn batch(
    client: &reqwest::Client,
    base: &str,
    auth: &str,
    prefix: &str,
    from: usize,
    count: usize,
) -> anyhow::Result<Duration> {
    let items: Vec<serde_json::Value> = (from..from + count)
        .map(|i| serde_json::json!({"userID": format!("{prefix}{i}"), "status": "online", "message": "bench"}))
        .collect();
    let started = Instant::now();
    let response = client
        .post(format!("{base}/api/v2/presence/batch"))
        .bearer_auth(auth)
        .json(&serde_json::json!({"presences": items}))
        .send()
        .await?;
    let elapsed = started.elapsed();
    let body: serde_json::Value = response.json().await?;
    if body["succeeded"].as_u64() != Some(count as u64) {
        bail!("batch failed: {body}");
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_run_is_found_without_reordering_the_runs() {
        let runs = [(0, 3.0), (1, 1.0), (2, 2.0)];
        assert_eq!(median_by(&runs, |r| r.1).unwrap().0, 2);
        assert_eq!(runs[0].0, 0);
        assert_eq!(median_by(&runs[..2], |r| r.1).unwrap().0, 0);
        assert!(median_by(&runs[..0], |r| r.1).is_err());
    }
}
