//! Write throughput of 1, 2 and 3 presence-service processes against one
//! hub, run side by side, next to raw KV puts at the same total concurrency:
//! where adding processes stops adding writes because the hub is the limit.
//!
//! Every process is a center, connected straight to the hub's NATS: the hub
//! is the only JetStream server (a leaf forwards each write to it anyway),
//! and leaves would each add a nats-server of their own on the same two
//! cores, blurring what the hub alone can take.

use crate::Bench;
use crate::load::{Puts, WRK_SECONDS, Wrk, WrkResult, raw_kv_puts};
use crate::node::{CpuMeter, Service, nats_pid, start_service};
use crate::sections::write::{WRITE_CONCURRENCY, post_script};

/// A bucket of its own, so only the processes of this section watch it.
const BUCKET: &str = "SCALEBENCH";
const MAX_PROCESSES: usize = 3;

/// One point of the curve: `processes` side by side and the raw ceiling at
/// the same total concurrency.
struct Point {
    processes: usize,
    per_process: Vec<f64>,
    hub_cores: f64,
    machine_busy: f64,
    raw_rps: f64,
    raw_hub_cores: f64,
}

/// For 1, 2 and 3 processes: the raw ceiling at their total concurrency,
/// then the processes side by side.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    // A center creates the bucket as the service configures it; no process
    // may watch it while the raw ceiling is taken.
    drop(start_service(bench.root(), "scale-init", "center", &bench.hub, BUCKET).await);
    let hub_pid = nats_pid(&bench.root().join("hub").join("nats.conf"));
    let mut single: Option<f64> = None;
    for processes in 1..=MAX_PROCESSES {
        let tasks = WRITE_CONCURRENCY * processes as u32;
        let meter = CpuMeter::start(hub_pid);
        let (raw_rps, _) = raw_kv_puts(&bench.hub, BUCKET, tasks, WRK_SECONDS, Puts::Plain).await?;
        let (raw_hub_cores, _) = meter.finish();
        let (per_process, hub_cores, machine_busy) =
            side_by_side(bench, processes, hub_pid).await?;
        let point = Point {
            processes,
            per_process,
            hub_cores,
            machine_busy,
            raw_rps,
            raw_hub_cores,
        };
        let single = *single.get_or_insert(point.total());
        point.add_to(bench, single);
    }
    Ok(())
}

/// Starts `processes` centers on the bucket and drives each with its own wrk
/// (its own users), all at once: req/s of each, the hub's CPU in cores and
/// the machine's busy share meanwhile.
async fn side_by_side(
    bench: &mut Bench,
    processes: usize,
    hub_pid: Option<u32>,
) -> anyhow::Result<(Vec<f64>, f64, f64)> {
    let mut nodes: Vec<Service> = Vec::new();
    let mut scripts = Vec::new();
    for i in 0..processes {
        let name = format!("scale-{processes}-{i}");
        nodes.push(start_service(bench.root(), &name, "center", &bench.hub, BUCKET).await);
        scripts.push(post_script(bench, &name, &format!("s{i}-"))?);
    }
    let urls: Vec<String> = nodes.iter().map(|n| format!("{}/", n.base)).collect();
    let runs: Vec<Wrk> = urls
        .iter()
        .zip(&scripts)
        .map(|(url, script)| Wrk {
            connections: WRITE_CONCURRENCY,
            url,
            auth: None,
            script: Some(script),
        })
        .collect();
    let meter = CpuMeter::start(hub_pid);
    let children = runs
        .iter()
        .map(|run| run.spawn(&mut bench.report))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let results = runs
        .iter()
        .zip(children)
        .map(|(run, child)| run.wait(child))
        .collect::<anyhow::Result<Vec<WrkResult>>>()?;
    let (hub_cores, machine_busy) = meter.finish();
    drop(nodes);
    Ok((
        results.iter().map(|r| r.rps).collect(),
        hub_cores,
        machine_busy,
    ))
}

impl Point {
    fn total(&self) -> f64 {
        self.per_process.iter().sum()
    }

    fn add_to(&self, bench: &mut Bench, single: f64) {
        let (n, total) = (self.processes, self.total());
        let tasks = WRITE_CONCURRENCY * n as u32;
        let each: Vec<String> = self.per_process.iter().map(|r| format!("{r:.0}")).collect();
        bench.report.add(
            "scale",
            format!("raw KV puts via hub, {tasks} tasks: ops/s"),
            format!("{:.0}", self.raw_rps),
            format!(
                "no node watching the bucket; hub CPU {:.2} cores",
                self.raw_hub_cores
            ),
        );
        bench.report.add(
            "scale",
            format!(
                "POST via {n} center process{}, c={WRITE_CONCURRENCY} each: req/s summed",
                if n == 1 { "" } else { "es" }
            ),
            format!("{total:.0}"),
            format!(
                "{:.2}x of 1 process; {:.2}x of raw puts at {tasks} tasks; each {}; hub CPU {:.2} cores, machine {:.0}% busy",
                total / single,
                total / self.raw_rps,
                each.join(" / "),
                self.hub_cores,
                self.machine_busy * 100.0
            ),
        );
    }
}
