//! Writes vs. raw KV puts at the same concurrency (plain puts, the
//! target's ceiling, and conditional ones, which carry the expected
//! revision every write of the service must), and session heartbeats vs.
//! plain writes.

use crate::Bench;
use crate::load::{Puts, WRK_SECONDS, Wrk, raw_kv_puts, wrk_write_script};
use crate::report::ratio;

/// wrk connections, and raw writer tasks, of every write figure.
pub const WRITE_CONCURRENCY: u32 = 32;
/// Issue #17: writes at least this fraction of raw KV puts.
const WRITE_TARGET: f64 = 0.7;
/// Issue #17: heartbeats at least this fraction of POSTs via the center.
const HEARTBEAT_TARGET: f64 = 0.9;

/// A wrk script POSTing presences of users `{prefix}0..{prefix}999`.
pub fn post_script(bench: &Bench, name: &str, prefix: &str) -> anyhow::Result<std::path::PathBuf> {
    wrk_write_script(
        bench.root(),
        name,
        "POST",
        &format!("\"/api/v2/presence/{prefix}\" .. (counter % 1000)"),
        r#"{"status":"online","message":"bench"}"#,
        &bench.write_token,
    )
}

/// POST via the center and via leaf eu, each next to raw puts through the
/// same NATS server; then heartbeats via the center, between two more POST
/// runs.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let script = post_script(bench, "post", "w")?;
    let paths = [
        ("center", bench.center.base.clone(), &bench.hub),
        ("leaf eu", bench.eu.base.clone(), &bench.eu_nats),
    ];
    for (label, base, nats) in paths {
        let ours = Wrk {
            connections: WRITE_CONCURRENCY,
            url: &format!("{base}/"),
            auth: None,
            script: Some(&script),
        }
        .run(&mut bench.report)?;
        let (raw_rps, raw_p99) = raw_kv_puts(
            nats,
            "PRESENCE",
            WRITE_CONCURRENCY,
            WRK_SECONDS,
            Puts::Plain,
        )
        .await?;
        let (cond_rps, cond_p99) = raw_kv_puts(
            nats,
            "PRESENCE",
            WRITE_CONCURRENCY,
            WRK_SECONDS,
            Puts::Conditional,
        )
        .await?;
        let report = &mut bench.report;
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
        report.add(
            "write",
            format!(
                "raw conditional KV put (expected revision, as the service's) via {label}, {WRITE_CONCURRENCY} tasks: ops/s (p99)"
            ),
            format!("{cond_rps:.0}"),
            format!(
                "p99 {cond_p99:.2} ms; {:.2}x of the plain puts; our POST {:.2}x of it",
                cond_rps / raw_rps,
                ours.rps / cond_rps
            ),
        );
        let measured = ours.rps / raw_rps;
        report.target(
            format!("write via {label} >= {WRITE_TARGET}x raw KV puts"),
            format!("{measured:.2}x ({:.0} req/s)", ours.rps),
            format!(
                "raw KV puts via {label} {raw_rps:.0} ops/s; conditional puts {cond_rps:.0} ops/s, of which ours is {:.2}x",
                ours.rps / cond_rps
            ),
            measured >= WRITE_TARGET,
        );
        if label == "center" {
            bench.seen.write_center = Some(ours.rps);
        }
    }
    heartbeat(bench)
}

/// Session heartbeats (PUT .../sessions/{id}) via the center, against
/// POSTs via the center run right before and right after them: the POST
/// figure of the section's start came some 30 s and a few hundred thousand
/// writes earlier, and the machine drifts that much.
fn heartbeat(bench: &mut Bench) -> anyhow::Result<()> {
    let script = wrk_write_script(
        bench.root(),
        "heartbeat",
        "PUT",
        "\"/api/v2/presence/h\" .. (counter % 1000) .. \"/sessions/bench\"",
        r#"{"status":"online","device":"bench","ttlSeconds":300}"#,
        &bench.write_token,
    )?;
    let posts = post_script(bench, "post-beside-heartbeat", "w")?;
    let url = format!("{}/", bench.center.base);
    let run = |bench: &mut Bench, script: &std::path::Path| {
        Wrk {
            connections: WRITE_CONCURRENCY,
            url: &url,
            auth: None,
            script: Some(script),
        }
        .run(&mut bench.report)
    };
    let before = run(bench, &posts)?;
    let beats = run(bench, &script)?;
    let after = run(bench, &posts)?;
    let post = (before.rps + after.rps) / 2.0;
    let measured = beats.rps / post;
    let report = &mut bench.report;
    report.add(
        "write",
        format!(
            "POST via center, c={WRITE_CONCURRENCY}, right before and after the heartbeats: req/s"
        ),
        format!("{post:.0}"),
        format!("{:.0} before, {:.0} after", before.rps, after.rps),
    );
    report.add(
        "write",
        format!("session heartbeat (PUT) via center, c={WRITE_CONCURRENCY}: req/s (p99)"),
        format!("{:.0}", beats.rps),
        format!(
            "p99 {:.2} ms; {measured:.2}x of the POSTs beside it (one KV write each; the durable seen key once per lease)",
            beats.p99_ms
        ),
    );
    report.target(
        format!("heartbeat (PUT session) >= {HEARTBEAT_TARGET}x POST via center"),
        format!("{measured:.2}x ({:.0} req/s)", beats.rps),
        format!("POST via center right before and after {post:.0} req/s"),
        measured >= HEARTBEAT_TARGET,
    );
    Ok(())
}
