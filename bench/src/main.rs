//! `make bench`: every figure is measured against a ceiling taken in the same
//! run on the same machine, because absolute numbers drift on a shared
//! 2-core box. Starts a real NATS hub with two leaves and three release-built
//! presence-service processes, drives them with wrk and raw clients, and
//! writes bench/RESULTS.md.

use anyhow::{Context as _, bail};
use futures::StreamExt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::{Nats, Proc, free_port};

const SECRET: &str = "bench-secret-0123456789abcdef";
const WRK_SECONDS: u64 = 8;
const READ_CONCURRENCY: [u32; 2] = [16, 64];
const WRITE_CONCURRENCY: u32 = 32;

/// One reported figure.
struct Row {
    section: &'static str,
    metric: String,
    value: String,
    note: String,
}

struct Report {
    rows: Vec<Row>,
    commands: Vec<String>,
    /// (target, measured, met) for the issue's targets.
    targets: Vec<(String, String, bool)>,
}

impl Report {
    fn target(&mut self, target: &str, measured: String, met: bool) {
        self.targets.push((target.to_owned(), measured, met));
    }

    fn add(
        &mut self,
        section: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
        note: impl Into<String>,
    ) {
        let row = Row {
            section,
            metric: metric.into(),
            value: value.into(),
            note: note.into(),
        };
        println!(
            "  {:<12} {:<58} {:>16}  {}",
            row.section, row.metric, row.value, row.note
        );
        self.rows.push(row);
    }
}

fn bin_dir() -> PathBuf {
    std::env::var_os("BENCH_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
        })
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

struct Service {
    proc: Proc,
    base: String,
}

async fn http_ok(client: &reqwest::Client, url: &str) -> bool {
    matches!(client.get(url).send().await, Ok(r) if r.status() == 200)
}

/// The presence-service command every measurement starts: release binary,
/// test secret, loopback, the hub's domain.
fn service_command(node_type: &str, nats: &Nats, port: u16) -> Command {
    let mut command = Command::new(bin_dir().join("presence-service"));
    command
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .env("NODE_TYPE", node_type)
        .env("SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_PORT", port.to_string())
        .env("NATS_URL", nats.url())
        .env("NATS_JS_DOMAIN", "hub")
        .env("LOG_LEVEL", "warn");
    command
}

async fn start_service(
    dir: &Path,
    name: &str,
    node_type: &str,
    nats: &Nats,
    bucket: &str,
) -> anyhow::Result<Service> {
    let port = free_port();
    let mut command = service_command(node_type, nats, port);
    command
        .env("NODE_ID", name)
        .env("KV_BUCKET", bucket)
        .env("CACHE_MAX_COST", (2u64 << 30).to_string())
        // Throughput is measured on a few hot users, far above any sane
        // per-user limit: the limiter is off here.
        .env("RATE_LIMIT_WRITES_PER_SECOND", "0");
    let proc = Proc::spawn(name, command, dir.join(format!("{name}.log")));
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = format!("{base}/health/readiness");
    testkit::wait_until(&format!("{name} ready"), Duration::from_secs(30), || {
        http_ok(&client, &ready)
    })
    .await;
    Ok(Service { proc, base })
}

fn token(scope: &str) -> anyhow::Result<String> {
    Ok(presence_dataplane::auth::mint(
        SECRET, "bench", scope, 86_400,
    )?)
}

/// Requests/s and latency percentiles (ms) from wrk's `--latency` output.
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
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

fn wrk(
    report: &mut Report,
    connections: u32,
    url: &str,
    auth: Option<&str>,
    script: Option<&Path>,
) -> anyhow::Result<WrkResult> {
    let mut command = Command::new("wrk");
    command.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{WRK_SECONDS}s"),
        "--latency",
    ]);
    if let Some(auth) = auth {
        command.args(["-H", &format!("Authorization: Bearer {auth}")]);
    }
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    command.arg(url);
    report.commands.push(format!(
        "wrk -t2 -c{connections} -d{WRK_SECONDS}s --latency{}{} {url}",
        if auth.is_some() {
            " -H 'Authorization: Bearer …'"
        } else {
            ""
        },
        script
            .map(|s| format!(" -s {}", s.display()))
            .unwrap_or_default()
    ));
    let output = command
        .output()
        .context("run wrk (make bench installs it)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw non-2xx answers from {url}:\n{text}");
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, 0.5)
}

/// Raw KV puts with `tasks` concurrent writers for `seconds`: (ops/s, p99 ms).
async fn raw_kv_puts(nats: &Nats, tasks: u32, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::with_domain(client, "hub");
    let kv = js.get_key_value("PRESENCE").await?;
    let value = bytes_of_presence();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers = (0..tasks).map(|t| {
        let (kv, value) = (kv.clone(), value.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u32;
            while Instant::now() < deadline {
                let key = format!("raw{}", (t * 1000 + i) % 1000);
                let sent = Instant::now();
                if kv.put(key, value.clone()).await.is_ok() {
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                i += 1;
            }
            latencies
        })
    });
    let mut all = Vec::new();
    for worker in futures::future::join_all(workers).await {
        all.extend(worker?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((all.len() as f64 / elapsed, percentile(&all, 0.99)))
}

fn bytes_of_presence() -> bytes::Bytes {
    bytes::Bytes::from_static(br#"{"userID":"raw","status":"online","message":"benchmarking","lastSeen":"2026-01-01T00:00:00.000Z","updatedAt":"2026-01-01T00:00:00.000Z","nodeID":"raw"}"#)
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn batch(
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

async fn cache_entries(client: &reqwest::Client, base: &str) -> u64 {
    let Ok(response) = client.get(format!("{base}/health")).send().await else {
        return 0;
    };
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["cache"]["entries"].as_u64().unwrap_or(0)
}

fn redis(report: &mut Report, connections: u32) -> anyhow::Result<(f64, f64, f64)> {
    let port = free_port();
    let dir = tempfile::tempdir()?;
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ]);
    command.arg(dir.path());
    let _server = Proc::spawn("redis-server", command, dir.path().join("redis.log"));
    for _ in 0..200 {
        if Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let bench = |report: &mut Report, tests: &str, n: u32| -> anyhow::Result<f64> {
        let args = [
            "-p",
            &port.to_string(),
            "-c",
            &connections.to_string(),
            "-n",
            &n.to_string(),
            "-t",
            tests,
            "--csv",
            "-q",
        ];
        report
            .commands
            .push(format!("redis-benchmark {}", args.join(" ")));
        let output = Command::new("redis-benchmark")
            .args(args)
            .output()
            .context("run redis-benchmark")?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .filter(|l| !l.starts_with("\"test\""))
            .find_map(|l| {
                l.split(',')
                    .nth(1)
                    .map(|v| v.trim_matches('"').parse::<f64>())
            })
            .transpose()?
            .with_context(|| format!("no result in redis-benchmark output: {text}"))
    };
    let get = bench(report, "get", 400_000)?;
    let set = bench(report, "set", 400_000)?;
    for setting in [["appendonly", "yes"], ["appendfsync", "always"]] {
        Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "config",
                "set",
                setting[0],
                setting[1],
            ])
            .output()?;
    }
    let set_fsync = bench(report, "set", 40_000)?;
    Ok((get, set, set_fsync))
}

/// A wrk script sending `method` with a JSON `body` to `path_expr` (a Lua
/// expression over `counter`, so requests spread over 1000 users).
fn wrk_write_script(
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

/// Reads one SSE stream, sending `(message, arrival)` for every presence
/// event whose message names a write of the fan-out test.
async fn follow_stream(
    response: reqwest::Response,
    arrivals: tokio::sync::mpsc::UnboundedSender<(String, Instant)>,
) {
    let mut response = response;
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(message) = value["message"].as_str().filter(|m| m.starts_with("fan-")) {
                let _ = arrivals.send((message.to_owned(), Instant::now()));
            }
        }
    }
}

/// Opens `streams` change streams at `reader`, each following `per_stream`
/// of 50 users, then changes users at `writer` one at a time and measures
/// from each write's acknowledgement to its arrival on every stream that
/// follows the user. Returns (deliveries, p50 ms, p99 ms).
async fn stream_fan_out(
    http: &reqwest::Client,
    writer: &str,
    reader: &str,
    token: &str,
    streams: usize,
    per_stream: usize,
) -> anyhow::Result<(usize, f64, f64)> {
    let users = 50;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut followers = vec![0usize; users];
    let mut tasks = Vec::new();
    for s in 0..streams {
        let ids: Vec<String> = (0..per_stream)
            .map(|k| {
                let user = (s * 7 + k) % users;
                followers[user] += 1;
                format!("fan{user}")
            })
            .collect();
        let response = http
            .get(format!(
                "{reader}/api/v2/presence/stream?users={}",
                ids.join(",")
            ))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?;
        tasks.push(tokio::spawn(follow_stream(response, tx.clone())));
    }
    // Let every stream finish its snapshot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut acked = std::collections::HashMap::new();
    let mut expected = 0;
    for i in 0..200 {
        let user = i % users;
        let message = format!("fan-{i}");
        http.post(format!("{writer}/api/v2/presence/fan{user}"))
            .bearer_auth(token)
            .json(&serde_json::json!({"status": "online", "message": message}))
            .send()
            .await?
            .error_for_status()?;
        acked.insert(message, Instant::now());
        expected += followers[user];
    }
    let mut lags = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lags.len() < expected && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some((message, at))) => {
                if let Some(sent) = acked.get(&message) {
                    lags.push(at.saturating_duration_since(*sent).as_secs_f64() * 1000.0);
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    for task in tasks {
        task.abort();
    }
    if lags.len() < expected {
        bail!("only {} of {expected} stream events arrived", lags.len());
    }
    lags.sort_by(f64::total_cmp);
    Ok((lags.len(), percentile(&lags, 0.5), percentile(&lags, 0.99)))
}

fn ratio(ours: f64, ceiling: f64) -> String {
    format!("{:.2}x of ceiling", ours / ceiling)
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let read_token = token("")?;
    let write_token = token("presence:write")?;
    let mut report = Report {
        rows: Vec::new(),
        commands: Vec::new(),
        targets: Vec::new(),
    };
    println!(
        "starting a hub, leaves eu and us, and three presence-service processes (release build)..."
    );
    let hub = Nats::hub(root).await;
    let eu_nats = Nats::leaf(root, "eu", &hub, None).await;
    let us_nats = Nats::leaf(root, "us", &hub, None).await;
    let center = start_service(root, "center", "center", &hub, "PRESENCE").await?;
    let eu = start_service(root, "eu", "leaf", &eu_nats, "PRESENCE").await?;
    let us = start_service(root, "us", "leaf", &us_nats, "PRESENCE").await?;

    // 1. Cached read vs. a bare axum handler returning the same bytes.
    let user_url = |base: &str| format!("{base}/api/v2/presence/bench-user");
    http.post(user_url(&center.base))
        .bearer_auth(&write_token)
        .json(&serde_json::json!({"status": "online", "message": "benchmarking"}))
        .send()
        .await?
        .error_for_status()?;
    http.get(user_url(&center.base))
        .bearer_auth(&read_token)
        .send()
        .await?
        .error_for_status()?;
    let bare_port = free_port();
    let mut bare_cmd = Command::new(bin_dir().join("bare-server"));
    bare_cmd.arg(bare_port.to_string());
    let bare = Proc::spawn("bare-server", bare_cmd, root.join("bare.log"));
    let bare_url = format!("http://127.0.0.1:{bare_port}/api/v2/presence/bench-user");
    testkit::wait_until("bare server", Duration::from_secs(10), || {
        http_ok(&http, &bare_url)
    })
    .await;
    let mut read_c64 = 0.0;
    let mut worst_read_ratio = f64::INFINITY;
    for c in READ_CONCURRENCY {
        let ours = wrk(
            &mut report,
            c,
            &user_url(&center.base),
            Some(&read_token),
            None,
        )?;
        let ceiling = wrk(&mut report, c, &bare_url, None, None)?;
        report.add(
            "read",
            format!("cached GET, c={c}: req/s (p50 / p99 ms)"),
            format!("{:.0}", ours.rps),
            format!(
                "{:.3} / {:.3} ms; {}",
                ours.p50_ms,
                ours.p99_ms,
                ratio(ours.rps, ceiling.rps)
            ),
        );
        report.add(
            "read",
            format!("bare axum ceiling, c={c}: req/s (p50 / p99 ms)"),
            format!("{:.0}", ceiling.rps),
            format!("{:.3} / {:.3} ms", ceiling.p50_ms, ceiling.p99_ms),
        );
        if c == 64 {
            read_c64 = ours.rps;
        }
        worst_read_ratio = worst_read_ratio.min(ours.rps / ceiling.rps);
    }
    drop(bare);
    report.target(
        "cached read >= 0.8x bare axum",
        format!("{worst_read_ratio:.2}x (lowest level)"),
        worst_read_ratio >= 0.8,
    );

    // 2. Writes vs. raw KV puts at the same concurrency.
    let script = wrk_write_script(
        root,
        "post",
        "POST",
        "\"/api/v2/presence/w\" .. (counter % 1000)",
        r#"{"status":"online","message":"bench"}"#,
        &write_token,
    )?;
    let mut worst_write_ratio = f64::INFINITY;
    for (label, service, nats) in [("center", &center, &hub), ("leaf eu", &eu, &eu_nats)] {
        let ours = wrk(
            &mut report,
            WRITE_CONCURRENCY,
            &format!("{}/", service.base),
            None,
            Some(&script),
        )?;
        let (raw_rps, raw_p99) = raw_kv_puts(nats, WRITE_CONCURRENCY, WRK_SECONDS).await?;
        report.add(
            "write",
            format!("POST via {label}, c={WRITE_CONCURRENCY}: req/s (p99)"),
            format!("{:.0}", ours.rps),
            format!("p99 {:.2} ms; {}", ours.p99_ms, ratio(ours.rps, raw_rps)),
        );
        report.add(
            "write",
            format!("raw KV put via {label}, {WRITE_CONCURRENCY} tasks: ops/s (p99)"),
            format!("{raw_rps:.0}"),
            format!("p99 {raw_p99:.2} ms"),
        );
        worst_write_ratio = worst_write_ratio.min(ours.rps / raw_rps);
    }
    report.target(
        "write >= 0.7x raw KV puts",
        format!("{worst_write_ratio:.2}x (lower of center, leaf)"),
        worst_write_ratio >= 0.7,
    );
    let mut write_center: f64 = 0.0;
    if let Some(row) = report
        .rows
        .iter()
        .find(|r| r.metric.starts_with("POST via center"))
    {
        write_center = row.value.parse().unwrap_or(0.0);
    }
    // A heartbeat writes two keys (the session with its TTL, and last-seen).
    let heartbeat_script = wrk_write_script(
        root,
        "heartbeat",
        "PUT",
        "\"/api/v2/presence/h\" .. (counter % 1000) .. \"/sessions/bench\"",
        r#"{"status":"online","device":"bench","ttlSeconds":300}"#,
        &write_token,
    )?;
    let beats = wrk(
        &mut report,
        WRITE_CONCURRENCY,
        &format!("{}/", center.base),
        None,
        Some(&heartbeat_script),
    )?;
    report.add(
        "write",
        format!("session heartbeat (PUT) via center, c={WRITE_CONCURRENCY}: req/s (p99)"),
        format!("{:.0}", beats.rps),
        format!(
            "p99 {:.2} ms; {:.2}x of POST via center (two KV writes each)",
            beats.p99_ms,
            beats.rps / write_center.max(1.0)
        ),
    );

    // 3. Bulk: one 1000-item batch; multi-get of 100 cached users.
    for (label, service) in [("center", &center), ("leaf eu", &eu)] {
        let mut times = Vec::new();
        for round in 0..7 {
            let elapsed = batch(
                &http,
                &service.base,
                &write_token,
                &format!("b{round}-"),
                0,
                1000,
            )
            .await?;
            times.push(elapsed.as_secs_f64() * 1000.0);
        }
        let ms = median(&mut times);
        report.add(
            "bulk",
            format!("1000-item batch via {label}: median of 7"),
            format!("{ms:.1} ms"),
            "",
        );
        if label == "center" {
            report.target(
                "1000-item batch < 100 ms at the center",
                format!("{ms:.1} ms"),
                ms < 100.0,
            );
        }
    }
    let ids: Vec<String> = (0..100).map(|i| format!("b0-{i}")).collect();
    let multi_url = format!("{}/api/v2/presence?users={}", center.base, ids.join(","));
    http.get(&multi_url)
        .bearer_auth(&read_token)
        .send()
        .await?
        .error_for_status()?;
    let multi = wrk(&mut report, 64, &multi_url, Some(&read_token), None)?;
    let multi_presences = multi.rps * 100.0;
    report.add(
        "bulk",
        "multi-get, 100 cached users a request, c=64: presences/s",
        format!("{multi_presences:.0}"),
        format!("{:.0} req/s, p99 {:.2} ms", multi.rps, multi.p99_ms),
    );
    report.target(
        "multi-get >= 1 000 000 presences/s",
        format!("{multi_presences:.0}/s"),
        multi_presences >= 1_000_000.0,
    );

    // 4. Propagation eu -> us, observed through us's HTTP API.
    let mut lags = Vec::new();
    for i in 0..1000 {
        let user = format!("prop-{}", i % 50);
        let response = http
            .post(format!("{}/api/v2/presence/{user}", eu.base))
            .bearer_auth(&write_token)
            .json(&serde_json::json!({"status": "online", "message": format!("m{i}")}))
            .send()
            .await?;
        let acked = Instant::now();
        let written: serde_json::Value = response.json().await?;
        let revision = written["revision"].as_u64().unwrap_or(u64::MAX);
        loop {
            let seen: serde_json::Value = http
                .get(format!("{}/api/v2/presence/{user}", us.base))
                .bearer_auth(&read_token)
                .send()
                .await?
                .json()
                .await
                .unwrap_or_default();
            if seen["revision"].as_u64().unwrap_or(0) >= revision {
                break;
            }
            if acked.elapsed() > Duration::from_secs(5) {
                bail!("write {i} never reached us");
            }
        }
        lags.push(acked.elapsed().as_secs_f64() * 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    report.add(
        "propagation",
        "write at eu visible at us (HTTP poll), 1000 writes: p50",
        format!("{:.3} ms", percentile(&lags, 0.5)),
        "upper bound: includes one GET round trip",
    );
    let p99 = percentile(&lags, 0.99);
    report.add("propagation", "same: p99", format!("{p99:.3} ms"), "");
    report.target(
        "propagation p99 < 10 ms",
        format!("{p99:.3} ms"),
        p99 < 10.0,
    );
    // 4b. The same path pushed: change streams at us, writes at eu.
    let (streams, per_stream) = (200, 10);
    let (deliveries, fan_p50, fan_p99) =
        stream_fan_out(&http, &eu.base, &us.base, &write_token, streams, per_stream).await?;
    report.add(
        "propagation",
        format!("SSE: write at eu to event at us, {streams} streams x {per_stream} users: p50"),
        format!("{fan_p50:.3} ms"),
        format!(
            "{deliveries} events; the HTTP poll's p50 above: {:.3} ms",
            percentile(&lags, 0.5)
        ),
    );
    report.add(
        "propagation",
        "same: p99",
        format!("{fan_p99:.3} ms"),
        format!(
            "{:.2}x of the HTTP poll's p99",
            fan_p99 / p99.max(f64::MIN_POSITIVE)
        ),
    );

    // 5. Memory per cached presence, in a fresh process and bucket.
    let mem = start_service(root, "mem", "center", &hub, "MEMBENCH").await?;
    let empty = rss_bytes(mem.proc.pid());
    let mut rss_at = Vec::new();
    let mut written = 0;
    for target in [100_000usize, 1_000_000] {
        let writers = futures::stream::iter((written..target).step_by(1000))
            .map(|from| batch(&http, &mem.base, &write_token, "m", from, 1000))
            .buffer_unordered(4);
        let results: Vec<anyhow::Result<Duration>> = writers.collect().await;
        for r in results {
            r?;
        }
        written = target;
        testkit::wait_until(
            "the cache to hold every write",
            Duration::from_secs(120),
            || async { cache_entries(&http, &mem.base).await >= target as u64 },
        )
        .await;
        let rss = rss_bytes(mem.proc.pid());
        rss_at.push((target, rss));
        report.add(
            "memory",
            format!("RSS with {target} cached presences"),
            format!("{:.1} MiB", rss as f64 / 1048576.0),
            format!("empty: {:.1} MiB", empty as f64 / 1048576.0),
        );
    }
    let per_user = rss_at
        .last()
        .map_or(0.0, |(n, rss)| (*rss as f64 - empty as f64) / *n as f64);
    report.add(
        "memory",
        "bytes per cached user (1M vs empty)",
        format!("{per_user:.0} B"),
        "",
    );
    report.target(
        "<= 300 bytes per cached user",
        format!("{per_user:.0} B"),
        per_user <= 300.0,
    );
    drop(mem);

    // 6. Cold start: process start to /health/readiness = 200.
    let mut slowest_start: f64 = 0.0;
    for (label, node_type, nats) in [("center", "center", &hub), ("leaf", "leaf", &eu_nats)] {
        let mut times = Vec::new();
        for run in 0..5 {
            let port = free_port();
            let command = service_command(node_type, nats, port);
            let started = Instant::now();
            let _proc = Proc::spawn(
                &format!("cold-{label}-{run}"),
                command,
                root.join(format!("cold-{label}-{run}.log")),
            );
            let url = format!("http://127.0.0.1:{port}/health/readiness");
            while !http_ok(&http, &url).await {
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("cold start of {label} never became ready");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let ms = median(&mut times);
        slowest_start = slowest_start.max(ms);
        report.add(
            "cold start",
            format!("{label}: process start to ready, median of 5"),
            format!("{ms:.0} ms"),
            "",
        );
    }
    report.target(
        "ready in < 1 s",
        format!("{slowest_start:.0} ms (slower of center, leaf)"),
        slowest_start < 1000.0,
    );

    // 7. What teams hand-roll instead: Redis on the same machine, same run.
    let (get, set, set_fsync) = redis(&mut report, 64)?;
    report.add(
        "redis",
        "redis-benchmark GET, c=64: ops/s",
        format!("{get:.0}"),
        format!(
            "our cached GET c=64: {read_c64:.0} req/s; our multi-get: {multi_presences:.0} users/s"
        ),
    );
    report.add(
        "redis",
        "redis-benchmark SET, c=64 (no persistence): ops/s",
        format!("{set:.0}"),
        format!("our POST via center: {write_center:.0} req/s (durable, acknowledged)"),
    );
    report.add(
        "redis",
        "redis-benchmark SET, appendfsync always: ops/s",
        format!("{set_fsync:.0}"),
        "",
    );

    write_results(&report)?;
    drop((center, eu, us, us_nats, eu_nats, hub));
    Ok(())
}

fn write_results(report: &Report) -> anyhow::Result<()> {
    let mut md = String::new();
    let now = time::OffsetDateTime::now_utc();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let nats = Command::new(testkit::nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Produced by `make bench` on {now}. Machine: {cores} cores, {cpu}; {nats}."
    );
    let _ = writeln!(
        md,
        "Load generators (wrk, raw NATS clients, redis-benchmark) share the same cores as the servers, so read every figure as a ratio to the ceiling measured beside it in this same run.\n"
    );
    let _ = writeln!(md, "## Targets\n\n| target | measured | |\n|---|---|---|");
    for (target, measured, met) in &report.targets {
        let _ = writeln!(
            md,
            "| {target} | {measured} | {} |",
            if *met { "met" } else { "**missed**" }
        );
    }
    let _ = writeln!(md, "\n## Every figure\n");
    let _ = writeln!(md, "| area | figure | value | notes |\n|---|---|---|---|");
    for row in &report.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            row.section, row.metric, row.value, row.note
        );
    }
    let _ = writeln!(
        md,
        "\n## Commands\n\nServers: a nats-server hub (JetStream domain `hub`, file store) with leaves `eu` and `us`, and a release-built presence-service per region, started by `bench/src/main.rs` on loopback ports.\n"
    );
    for command in &report.commands {
        let _ = writeln!(md, "- `{command}`");
    }
    // What bounds the missed targets: kept by people in bench/ANALYSIS.md,
    // reviewed against each new run, and carried into every RESULTS.md.
    let analysis = Path::new(env!("CARGO_MANIFEST_DIR")).join("ANALYSIS.md");
    if let Ok(text) = std::fs::read_to_string(&analysis) {
        let _ = writeln!(md, "\n{text}");
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md");
    std::fs::write(&path, md)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run())
}
