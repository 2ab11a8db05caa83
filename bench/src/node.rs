//! presence-service processes under test, and what the bench reads about
//! them (readiness, cache size, RSS, CPU time).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::{Nats, Proc, free_port};

pub const SECRET: &str = "bench-secret-0123456789abcdef";
/// The JetStream domain of the hub, as every client of the bench names it.
pub const JS_DOMAIN: &str = "hub";
/// Every measured node's cache budget: far above what 1M users need, so no
/// figure is bent by evictions.
pub const CACHE_MAX_COST: u64 = 2 << 30;

/// A running presence-service process and its base URL.
pub struct Service {
    pub proc: Proc,
    pub base: String,
}

/// The bare front (bench/src/bin/bare-server.rs: axum doing conditional
/// KV puts and nothing else) through `nats_url`, logging to `log`, once it
/// answers: the process and its base URL.
pub async fn start_bare_front(
    http: &reqwest::Client,
    nats_url: &str,
    log: std::path::PathBuf,
) -> (Proc, String) {
    let port = free_port();
    let mut command = Command::new(testkit::bench_bin_dir().join("bare-server"));
    command
        .arg(port.to_string())
        .arg(nats_url)
        .arg(JS_DOMAIN)
        .arg("PRESENCE");
    let front = Proc::spawn("bare-server (bare front)", command, log);
    let base = format!("http://127.0.0.1:{port}");
    let probe = format!("{base}/api/v2/presence/probe");
    testkit::wait_until(
        "the bare front (see its bare-*.log if it never answers)",
        Duration::from_secs(10),
        || http_ok(http, &probe),
    )
    .await;
    (front, base)
}

/// Whether `url` answers 200 now.
pub async fn http_ok(client: &reqwest::Client, url: &str) -> bool {
    matches!(client.get(url).send().await, Ok(r) if r.status() == 200)
}

/// The presence-service command every measurement starts: release binary,
/// test secret, loopback, the hub's domain.
pub fn service_command(node_type: &str, nats: &Nats, port: u16) -> Command {
    let mut command = Command::new(testkit::bench_bin_dir().join("presence-service"));
    command
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .env("NODE_TYPE", node_type)
        .env("SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_PORT", port.to_string())
        .env("NATS_URL", nats.url())
        .env("NATS_JS_DOMAIN", JS_DOMAIN)
        .env("LOG_LEVEL", "warn");
    command
}

/// Starts a node on `bucket` without waiting for it: the warm-up section
/// times from this moment.
pub fn spawn_service(
    dir: &Path,
    name: &str,
    node_type: &str,
    nats: &Nats,
    bucket: &str,
) -> Service {
    spawn_service_with(dir, (name, node_type), nats, bucket, &[])
}

/// [`spawn_service`] with `extra` variables on top of the usual ones.
pub fn spawn_service_with(
    dir: &Path,
    (name, node_type): (&str, &str),
    nats: &Nats,
    bucket: &str,
    extra: &[(&str, &str)],
) -> Service {
    let port = free_port();
    let mut command = service_command(node_type, nats, port);
    command
        .env("NODE_ID", name)
        .env("KV_BUCKET", bucket)
        .env("CACHE_MAX_COST", CACHE_MAX_COST.to_string())
        // Throughput is measured on a few hot users, far above any sane
        // per-user limit: the limiter is off here.
        .env("RATE_LIMIT_WRITES_PER_SECOND", "0");
    command.envs(extra.iter().copied());
    let proc = Proc::spawn(name, command, dir.join(format!("{name}.log")));
    Service {
        proc,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// Starts a node on `bucket` and waits until it is ready.
pub async fn start_service(
    dir: &Path,
    name: &str,
    node_type: &str,
    nats: &Nats,
    bucket: &str,
) -> Service {
    let service = spawn_service(dir, name, node_type, nats, bucket);
    let client = reqwest::Client::new();
    let ready = format!("{}/health/readiness", service.base);
    testkit::wait_until(&format!("{name} ready"), Duration::from_secs(30), || {
        http_ok(&client, &ready)
    })
    .await;
    service
}

/// Polls `check` `every` so often until it holds; the time since `started`
/// when it did, or an error after `limit`.
pub async fn time_until<F, Fut>(
    what: &str,
    started: Instant,
    every: Duration,
    limit: Duration,
    mut check: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    while !check().await {
        if started.elapsed() > limit {
            anyhow::bail!("{what} took longer than {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(started.elapsed())
}

/// A token of the bench's caller with `scope`.
pub fn token(scope: &str) -> anyhow::Result<String> {
    token_for("bench", scope)
}

/// A token of caller `sub` with `scope`: a node limits what one caller may
/// hold open (STREAM_MAX_PER_CALLER), so many clients need many callers.
pub fn token_for(sub: &str, scope: &str) -> anyhow::Result<String> {
    Ok(presence_dataplane::auth::mint(SECRET, sub, scope, 86_400)?)
}

/// What `GET /api/v2/cache/metrics` says now: (entries, hits); `None`
/// while the node does not answer.
pub async fn cache_metrics(
    client: &reqwest::Client,
    base: &str,
    token: &str,
) -> Option<(u64, u64)> {
    let response = client
        .get(format!("{base}/api/v2/cache/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    Some((body["entries"].as_u64()?, body["hits"].as_u64()?))
}

/// CPU time (user + system) a process used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// `getconf CLK_TCK`, 100 on every Linux the bench runs on.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The pid of the nats-server started with the config file `conf` (testkit
/// doesn't expose it): the bench started it, so it is ours to observe.
pub fn nats_pid(conf: &Path) -> Option<u32> {
    let needle = conf.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("nats-server") && cmdline.contains(&needle)).then_some(pid)
    })
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait
    let idle: u64 = fields.iter().skip(3).take(2).sum();
    (total.saturating_sub(idle), total)
}

/// CPU use of one process and of the whole machine over an interval: where
/// the cores went while a load ran.
pub struct CpuMeter {
    pid: Option<u32>,
    process_seconds: f64,
    machine: (u64, u64),
    started: Instant,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            pid,
            process_seconds: pid.map_or(0.0, cpu_seconds),
            machine: machine_jiffies(),
            started: Instant::now(),
        }
    }

    /// (the process's CPU in cores, the machine's busy share) since start.
    pub fn finish(&self) -> (f64, f64) {
        let wall = self.started.elapsed().as_secs_f64();
        let process = self.pid.map_or(f64::NAN, |pid| {
            (cpu_seconds(pid) - self.process_seconds) / wall
        });
        let (busy, total) = machine_jiffies();
        let machine = busy.saturating_sub(self.machine.0) as f64
            / total.saturating_sub(self.machine.1).max(1) as f64;
        (process, machine)
    }
}
