//! Cold start: process start to `/health/readiness` = 200 on an empty
//! cache, for a center and a leaf.

use crate::Bench;
use crate::load::median;
use crate::node::{http_ok, service_command, time_until};
use std::time::{Duration, Instant};
use testkit::{Proc, free_port};

/// An older target, kept: ready in under a second.
const READY_LIMIT_MS: f64 = 1000.0;

/// Five starts of each, median reported; the slower one against the target.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let mut slowest: f64 = 0.0;
    let kinds = [("center", &bench.hub), ("leaf", &bench.eu_nats)];
    for (node_type, nats) in kinds {
        let mut times = Vec::new();
        for run in 0..5 {
            let port = free_port();
            let command = service_command(node_type, nats, port);
            let started = Instant::now();
            let name = format!("cold-{node_type}-{run}");
            let _proc = Proc::spawn(&name, command, bench.root().join(format!("{name}.log")));
            let url = format!("http://127.0.0.1:{port}/health/readiness");
            let ready = time_until(
                &format!("cold start of {node_type}"),
                started,
                Duration::from_millis(2),
                Duration::from_secs(30),
                || http_ok(&bench.http, &url),
            )
            .await?;
            times.push(ready.as_secs_f64() * 1000.0);
        }
        let ms = median(&mut times);
        slowest = slowest.max(ms);
        bench.report.add(
            "cold start",
            format!("{node_type}: process start to ready, median of 5"),
            format!("{ms:.0} ms"),
            "",
        );
    }
    bench.report.target(
        "ready in < 1 s",
        format!("{slowest:.0} ms (slower of center, leaf)"),
        "absolute",
        slowest < READY_LIMIT_MS,
    );
    Ok(())
}
