//! What teams hand-roll instead: Redis on the same machine, same run, next
//! to our figures of the sections that ran before.

use crate::Bench;
use crate::report::Report;
use anyhow::Context as _;
use std::process::Command;
use std::time::Duration;
use testkit::{Proc, free_port};

const CONNECTIONS: u32 = 64;

/// GET, SET without persistence, SET with `appendfsync always`.
pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let port = free_port();
    let dir = tempfile::tempdir()?;
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir.path());
    let _server = Proc::spawn("redis-server", command, dir.path().join("redis.log"));
    for _ in 0..200 {
        if redis_cli(port, &["ping"]).is_ok_and(|o| o.stdout.starts_with(b"PONG")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let report = &mut bench.report;
    let get = redis_benchmark(report, port, "get", 400_000)?;
    let set = redis_benchmark(report, port, "set", 400_000)?;
    redis_cli(port, &["config", "set", "appendonly", "yes"])?;
    redis_cli(port, &["config", "set", "appendfsync", "always"])?;
    let set_fsync = redis_benchmark(report, port, "set", 40_000)?;
    let ours = |figure: Option<f64>, unit: &str| {
        figure.map_or("not measured in this run".to_owned(), |v| {
            format!("{v:.0} {unit}")
        })
    };
    let seen = &bench.seen;
    report.add(
        "redis",
        format!("redis-benchmark GET, c={CONNECTIONS}: ops/s"),
        format!("{get:.0}"),
        format!(
            "our cached GET c=64: {}; our multi-get: {}",
            ours(seen.read_c64, "req/s"),
            ours(seen.multi_presences, "users/s")
        ),
    );
    report.add(
        "redis",
        format!("redis-benchmark SET, c={CONNECTIONS} (no persistence): ops/s"),
        format!("{set:.0}"),
        format!(
            "our POST via center: {} (durable, acknowledged)",
            ours(seen.write_center, "req/s")
        ),
    );
    report.add(
        "redis",
        "redis-benchmark SET, appendfsync always: ops/s",
        format!("{set_fsync:.0}"),
        "",
    );
    Ok(())
}

fn redis_cli(port: u16, args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
}

/// `n` requests of one redis-benchmark test: its requests/s.
fn redis_benchmark(report: &mut Report, port: u16, test: &str, n: u32) -> anyhow::Result<f64> {
    let args = [
        "-p",
        &port.to_string(),
        "-c",
        &CONNECTIONS.to_string(),
        "-n",
        &n.to_string(),
        "-t",
        test,
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
}
