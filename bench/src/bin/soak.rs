//! `make soak`: a long run (`SOAK_SECS`, default 600) of a center and a leaf
//! `presence-service` on a real NATS hub and leaf, under normal traffic
//! (sets, batches, heartbeats, reads, change streams) and abuse at once:
//! stream clients that never read, made-up HTTP methods, half-open and idle
//! connections, and values written straight into the bucket that the
//! service can't use.
//!
//! It passes when, for both nodes:
//! - no answer was a 5xx, and no request of the normal traffic failed;
//! - readiness answered 200 at every check (once a second);
//! - no panic shows in the logs and the watch never crashed;
//! - memory stayed flat: the median RSS of the last tenth of the run is at
//!   most 20% + 16 MiB above the median RSS just after the warm-up (the
//!   first fifth of the run, at least a minute, fills the cache and the
//!   event log).
//!
//! Prints a summary and exits 1 when a check failed.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use testkit::{Nats, Proc, bench_bin_dir as bin_dir, free_port, rss_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SECRET: &str = "soak-secret-0123456789abcdef";
/// Users the normal traffic writes; the poison lands on them too.
const USERS: u64 = 2_000;
/// Users each change stream follows (the most written ones).
const STREAM_USERS: u64 = 200;

/// A running service.
struct Node {
    name: &'static str,
    proc: Proc,
    base: String,
    port: u16,
}

/// What the run did and saw; every field is a count.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    server_errors: AtomicU64,
    client_errors: AtomicU64,
    /// Normal-traffic requests that got no answer at all.
    transport_errors: AtomicU64,
    stream_events: AtomicU64,
    streams_opened: AtomicU64,
    slow_streams: AtomicU64,
    half_open: AtomicU64,
    half_open_closed_by_node: AtomicU64,
    made_up_methods: AtomicU64,
    poison: AtomicU64,
    readiness_checks: AtomicU64,
    readiness_failures: AtomicU64,
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A small xorshift generator per task: the soak needs variety, not quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::from(d.subsec_nanos()));
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nanos) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn token(sub: &str, scope: &str) -> String {
    presence_dataplane::auth::mint(SECRET, sub, scope, 86_400).expect("sign a token")
}

async fn start(dir: &Path, binary: &Path, name: &'static str, kind: &str, nats: &Nats) -> Node {
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .env("NODE_TYPE", kind)
        .env("NODE_ID", name)
        .env("SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_PORT", port.to_string())
        .env("NATS_URL", nats.url())
        .env("NATS_JS_DOMAIN", "hub")
        .env("LOG_LEVEL", "info");
    let proc = Proc::spawn(name, command, dir.join(format!("{name}.log")));
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = format!("{base}/health/readiness");
    testkit::wait_until(&format!("{name} ready"), Duration::from_secs(30), || {
        let (client, ready) = (client.clone(), ready.clone());
        async move { matches!(client.get(&ready).send().await, Ok(r) if r.status() == 200) }
    })
    .await;
    Node {
        name,
        proc,
        base,
        port,
    }
}

/// A client as a well-configured service would use: it drops pooled
/// connections before the node's 5 s keep-alive timeout closes them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

fn count(counts: &Counts, result: Result<reqwest::Response, reqwest::Error>) {
    add(&counts.requests);
    match result {
        Ok(response) if response.status().is_server_error() => add(&counts.server_errors),
        Ok(response) if response.status().is_client_error() => add(&counts.client_errors),
        Ok(_) => {}
        Err(_) => add(&counts.transport_errors),
    }
}

/// Sets, batches, heartbeats, session ends and reads, spread over users.
async fn normal_traffic(bases: Vec<String>, counts: Arc<Counts>, deadline: Instant, seed: u64) {
    let client = client();
    let writer = format!("Bearer {}", token("svc", "presence:write"));
    let reader = format!("Bearer {}", token("reader", ""));
    let mut rng = Rng::new(seed);
    let mut i = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let base = &bases[usize::try_from(rng.below(bases.len() as u64)).unwrap_or(0)];
        // The stream users get most writes, so streams have events to send.
        let user = if rng.below(2) == 0 {
            rng.below(STREAM_USERS)
        } else {
            rng.below(USERS)
        };
        let request = match rng.below(10) {
            0..=3 => client
                .post(format!("{base}/api/v2/presence/u{user}"))
                .header("Authorization", &writer)
                .json(&serde_json::json!({"status": "busy", "message": format!("m{seed}-{i}")})),
            4..=5 => client
                .put(format!(
                    "{base}/api/v2/presence/u{user}/sessions/d{}",
                    rng.below(3)
                ))
                .header("Authorization", &writer)
                .json(&serde_json::json!({"status": "online", "ttlSeconds": 30})),
            6 => client
                .delete(format!(
                    "{base}/api/v2/presence/u{user}/sessions/d{}",
                    rng.below(3)
                ))
                .header("Authorization", &writer),
            7 => {
                let items: Vec<serde_json::Value> = (0..20)
                    .map(|_| serde_json::json!({"userID": format!("u{}", rng.below(USERS)), "status": "away", "message": format!("b{i}")}))
                    .collect();
                client
                    .post(format!("{base}/api/v2/presence/batch"))
                    .header("Authorization", &writer)
                    .json(&serde_json::json!({ "presences": items }))
            }
            8 => {
                let users: Vec<String> =
                    (0..50).map(|_| format!("u{}", rng.below(USERS))).collect();
                client
                    .get(format!("{base}/api/v2/presence?users={}", users.join(",")))
                    .header("Authorization", &reader)
            }
            _ => client
                .get(format!("{base}/api/v2/presence/u{user}"))
                .header("Authorization", &reader),
        };
        count(&counts, request.send().await);
    }
}

fn stream_users() -> String {
    (0..STREAM_USERS)
        .map(|u| format!("u{u}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A well-behaved stream client: reads everything and resumes with
/// `Last-Event-ID` whenever its stream ends.
async fn reading_stream(base: String, counts: Arc<Counts>, deadline: Instant, id: u64) {
    let client = reqwest::Client::new();
    let url = format!("{base}/api/v2/presence/stream?users={}", stream_users());
    let auth = format!("Bearer {}", token(&format!("watcher-{id}"), ""));
    let mut last_id: Option<String> = None;
    while Instant::now() < deadline {
        let mut request = client.get(&url).header("Authorization", &auth);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = tokio::time::timeout_at(deadline, request.send()).await;
        let Ok(response) = response else { return };
        add(&counts.streams_opened);
        let mut response = match response {
            Ok(r) if r.status().is_success() => r,
            other => {
                count(&counts, other);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut buffer = String::new();
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, response.chunk()).await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if block.contains("event: presence") {
                    add(&counts.stream_events);
                }
                if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: ")) {
                    last_id = Some(id.to_owned());
                }
            }
        }
    }
}

/// A stream client with a tiny receive window that never reads: the node
/// must end its stream and connection, not buffer for it forever.
async fn stalled_stream(port: u16, counts: Arc<Counts>, deadline: Instant, id: u64) {
    let mut rng = Rng::new(id);
    let request = format!(
        "GET /api/v2/presence/stream?users={} HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {}\r\n\r\n",
        stream_users(),
        token(&format!("slow-{id}"), "")
    );
    while Instant::now() < deadline {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        let _ = socket.set_recv_buffer_size(4096);
        let Ok(mut stream) = socket.connect(([127, 0, 0, 1], port).into()).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if stream.write_all(request.as_bytes()).await.is_ok() {
            add(&counts.slow_streams);
        }
        // Held 20 to 60 s unread, then abandoned without a close.
        let hold = Duration::from_secs(20 + rng.below(41));
        tokio::time::sleep_until((Instant::now() + hold).min(deadline)).await;
        drop(stream);
    }
}

/// Connections that send half a request head, or nothing at all, and wait
/// for the node to close them.
async fn half_open(port: u16, counts: Arc<Counts>, deadline: Instant, id: u64) {
    while Instant::now() < deadline {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        add(&counts.half_open);
        if id.is_multiple_of(2) {
            let _ = stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
                .await;
        }
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout_at(deadline, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if closed.is_ok() {
            add(&counts.half_open_closed_by_node);
        }
    }
}

/// Requests with made-up methods to known and unknown paths.
async fn made_up_methods(bases: Vec<String>, counts: Arc<Counts>, deadline: Instant) {
    let client = client();
    let mut rng = Rng::new(7);
    let paths = ["/health", "/api/v2/presence/u1", "/metrics", "/nowhere"];
    while Instant::now() < deadline {
        let method = format!("X{}", rng.below(1_000_000_000));
        let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
            continue;
        };
        let base = &bases[usize::try_from(rng.below(bases.len() as u64)).unwrap_or(0)];
        let path = paths[usize::try_from(rng.below(paths.len() as u64)).unwrap_or(0)];
        add(&counts.made_up_methods);
        count(
            &counts,
            client.request(method, format!("{base}{path}")).send().await,
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Values straight into the bucket that the service can't use, on the
/// users the normal traffic writes, and on keys outside the layout.
async fn poison(hub: String, counts: Arc<Counts>, deadline: Instant) {
    let Ok(nats) = async_nats::connect(hub).await else {
        return;
    };
    let Ok(kv) = async_nats::jetstream::new(nats)
        .get_key_value("PRESENCE")
        .await
    else {
        return;
    };
    let mut rng = Rng::new(11);
    while Instant::now() < deadline {
        let user = rng.below(USERS);
        let session = |last_seen: &str, ttl: serde_json::Value| {
            serde_json::json!({"status": "online", "lastSeen": last_seen, "ttlSeconds": ttl})
                .to_string()
        };
        let (key, value) = match rng.below(5) {
            0 => (
                format!("u{user}.s.poison"),
                session("2026-01-01T00:00:00Z", i64::MAX.into()),
            ),
            1 => (
                format!("u{user}.s.late"),
                session("9999-12-31T23:59:59Z", 300.into()),
            ),
            2 => (format!("u{user}"), "not json".to_owned()),
            3 => (format!("u{user}.seen"), "{\"lastSeen\": 17}".to_owned()),
            _ => (format!("junk.{}.a.b", rng.below(1000)), "{}".to_owned()),
        };
        if kv.put(key, value.into()).await.is_ok() {
            add(&counts.poison);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One RSS sample of each node, and whether each was ready.
async fn monitor(nodes: &[&Node], counts: &Counts, deadline: Instant) -> Vec<(f64, Vec<u64>)> {
    let client = client();
    let started = Instant::now();
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        let mut rss = Vec::new();
        for node in nodes {
            add(&counts.readiness_checks);
            let ready = client
                .get(format!("{}/health/readiness", node.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if !ready {
                add(&counts.readiness_failures);
                eprintln!("soak: {} not ready at {:?}", node.name, started.elapsed());
            }
            rss.push(rss_bytes(node.proc.pid()));
        }
        samples.push((started.elapsed().as_secs_f64(), rss));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    samples
}

/// The sum of `name`'s samples whose labels contain `labels`.
async fn metric(base: &str, name: &str, labels: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("{base}/metrics")).await else {
        return f64::NAN;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && l.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

const MIB: f64 = 1024.0 * 1024.0;

/// (baseline, final, max) RSS of node `i`, and whether it stayed flat.
fn memory_verdict(samples: &[(f64, Vec<u64>)], i: usize, secs: f64) -> (u64, u64, u64, bool) {
    let warm = (secs / 5.0).max(60.0_f64.min(secs / 2.0));
    let window = |from: f64, to: f64| -> Vec<u64> {
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, rss)| rss[i])
            .collect()
    };
    let baseline = median(window(warm, warm + secs / 10.0));
    let last = median(window(secs * 0.9, f64::MAX));
    let max = samples.iter().map(|(_, rss)| rss[i]).max().unwrap_or(0);
    let limit = baseline as f64 * 1.2 + 16.0 * MIB;
    (baseline, last, max, (last as f64) <= limit)
}

async fn run() -> anyhow::Result<bool> {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let dir = tempfile::tempdir()?;
    // A private copy: another build can't replace the binary under the run.
    let binary = dir.path().join("presence-service");
    std::fs::copy(bin_dir().join("presence-service"), &binary)?;
    let hub = Nats::hub(dir.path()).await;
    let leaf = Nats::leaf(dir.path(), "eu", &hub, None).await;
    let center = start(dir.path(), &binary, "center-1", "center", &hub).await;
    let eu = start(dir.path(), &binary, "eu-1", "leaf", &leaf).await;
    println!("soak: {secs} s against {} and {}", center.base, eu.base);
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let bases = vec![center.base.clone(), eu.base.clone()];
    let mut tasks = Vec::new();
    for seed in 0..6 {
        tasks.push(tokio::spawn(normal_traffic(
            bases.clone(),
            counts.clone(),
            deadline,
            seed,
        )));
    }
    for id in 0..20u64 {
        let node = if id.is_multiple_of(2) { &center } else { &eu };
        tasks.push(tokio::spawn(reading_stream(
            node.base.clone(),
            counts.clone(),
            deadline,
            id,
        )));
        tasks.push(tokio::spawn(stalled_stream(
            node.port,
            counts.clone(),
            deadline,
            id,
        )));
    }
    for id in 0..50u64 {
        let node = if id.is_multiple_of(2) { &center } else { &eu };
        tasks.push(tokio::spawn(half_open(
            node.port,
            counts.clone(),
            deadline,
            id / 2,
        )));
    }
    tasks.push(tokio::spawn(made_up_methods(
        bases.clone(),
        counts.clone(),
        deadline,
    )));
    tasks.push(tokio::spawn(poison(hub.url(), counts.clone(), deadline)));
    let samples = monitor(&[&center, &eu], &counts, deadline).await;
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    }
    report(&[&center, &eu], &counts, &samples, secs as f64).await
}

async fn report(
    nodes: &[&Node],
    counts: &Counts,
    samples: &[(f64, Vec<u64>)],
    secs: f64,
) -> anyhow::Result<bool> {
    let mut ok = true;
    let mut check = |passed: bool, what: String| {
        println!("  [{}] {what}", if passed { "ok" } else { "FAIL" });
        ok &= passed;
    };
    println!("\nsoak summary ({secs:.0} s)");
    println!(
        "  traffic: {} requests ({:.0}/s), {} 4xx, {} stream events on {} stream openings",
        get(&counts.requests),
        get(&counts.requests) as f64 / secs,
        get(&counts.client_errors),
        get(&counts.stream_events),
        get(&counts.streams_opened),
    );
    println!(
        "  abuse: {} stalled streams, {} half-open/idle connections ({} closed by the node), {} made-up methods, {} poisoned values",
        get(&counts.slow_streams),
        get(&counts.half_open),
        get(&counts.half_open_closed_by_node),
        get(&counts.made_up_methods),
        get(&counts.poison),
    );
    check(
        get(&counts.server_errors) == 0,
        format!(
            "5xx answers seen by clients: {}",
            get(&counts.server_errors)
        ),
    );
    check(
        get(&counts.transport_errors) == 0,
        format!(
            "requests without an answer: {}",
            get(&counts.transport_errors)
        ),
    );
    check(
        get(&counts.readiness_failures) == 0,
        format!(
            "readiness: {} of {} checks failed",
            get(&counts.readiness_failures),
            get(&counts.readiness_checks)
        ),
    );
    for (i, node) in nodes.iter().enumerate() {
        let base = node.base.as_str();
        let served_5xx = metric(base, "presence_http_requests_total", "status=\"5").await;
        let crashes = metric(base, "presence_watch_crashes_total", "").await;
        let panicked = node.proc.log().matches("panicked").count();
        check(
            served_5xx == 0.0 && crashes == 0.0 && panicked == 0,
            format!(
                "{}: {served_5xx} 5xx served, {crashes} watch crashes, {panicked} panics in the log",
                node.name
            ),
        );
        println!(
            "    {}: skipped values {}, timed-out connections header/keepalive/send {}/{}/{}, refused {}, streams closed (send timeout) {}, event log {:.1} MiB",
            node.name,
            metric(base, "presence_kv_values_skipped_total", "").await,
            metric(
                base,
                "presence_http_connections_timed_out_total",
                "reason=\"header\""
            )
            .await,
            metric(
                base,
                "presence_http_connections_timed_out_total",
                "reason=\"keepalive\""
            )
            .await,
            metric(
                base,
                "presence_http_connections_timed_out_total",
                "reason=\"send\""
            )
            .await,
            metric(base, "presence_http_connections_refused_total", "").await,
            metric(
                base,
                "presence_streams_closed_total",
                "reason=\"send_timeout\""
            )
            .await,
            metric(base, "presence_event_log_bytes", "").await / MIB,
        );
        let (baseline, last, max, flat) = memory_verdict(samples, i, secs);
        check(
            flat,
            format!(
                "{}: RSS after warm-up {:.1} MiB, at the end {:.1} MiB (limit {:.1} MiB = +20% +16 MiB), max {:.1} MiB",
                node.name,
                baseline as f64 / MIB,
                last as f64 / MIB,
                (baseline as f64 * 1.2 + 16.0 * MIB) / MIB,
                max as f64 / MIB,
            ),
        );
        let timeline: Vec<String> = samples
            .iter()
            .step_by((samples.len() / 10).max(1))
            .map(|(t, rss)| format!("{t:.0}s:{:.0}", rss[i] as f64 / MIB))
            .collect();
        println!(
            "    {} RSS MiB over time: {}",
            node.name,
            timeline.join(" ")
        );
    }
    println!("soak: {}", if ok { "PASSED" } else { "FAILED" });
    Ok(ok)
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("soak: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("soak: {err:#}");
            ExitCode::FAILURE
        }
    }
}
