//! Writes vs. raw KV puts at the same concurrency (plain puts, the
//! target's ceiling, and conditional ones, which carry the expected
//! revision every write of the service must), vs. the bare front (axum
//! doing one conditional put per request, bench/src/bin/bare-server.rs),
//! and session heartbeats vs. plain writes.

use crate::Bench;
use crate::load::{Puts, WRK_SECONDS, Wrk, WrkResult, median_by, raw_kv_puts, wrk_write_script};
use crate::node::start_bare_front;
use crate::report::{Report, ratio};
use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};

/// wrk connections, and raw writer tasks, of every write figure.
pub const WRITE_CONCURRENCY: u32 = 32;
/// Issue #17: writes at least this fraction of raw KV puts.
const WRITE_TARGET: f64 = 0.7;
/// Heartbeat runs, each between two POST runs; the target takes the median.
const HEARTBEAT_ROUNDS: usize = 3;
const _: () = assert!(HEARTBEAT_ROUNDS % 2 == 1);
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

/// One path's write figures, ops or requests per second.
struct PathFigures {
    ours: WrkResult,
    bare: WrkResult,
    raw: (f64, f64),
    conditional: (f64, f64),
}

/// POST via the center and via leaf eu, each next to the bare front and
/// raw puts through the same NATS server; then heartbeats via the center,
/// each run between two more POST runs.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let script = post_script(bench, "post", "w")?;
    let paths = [
        ("center", bench.center.base.clone(), &bench.hub),
        ("leaf eu", bench.eu.base.clone(), &bench.eu_nats),
    ];
    for (label, base, nats) in paths {
        let name = label.replace(' ', "-");
        let ours = Wrk {
            connections: WRITE_CONCURRENCY,
            url: &format!("{base}/"),
            auth: None,
            script: Some(&script),
        }
        .run(&mut bench.report)?;
        // Right after ours, so the two meet the same minute of the machine;
        // keys of its own on each path, so that its first puts don't find
        // the other path's.
        let bare_script = post_script(
            bench,
            &format!("post-bare-{name}"),
            &format!("bare-{name}-"),
        )?;
        let bare = bare_front(
            &bench.http,
            &bench.root().join(format!("bare-write-{name}.log")),
            &bare_script,
            &nats.url(),
            &mut bench.report,
        )
        .await?;
        let raw = raw_kv_puts(
            nats,
            "PRESENCE",
            WRITE_CONCURRENCY,
            WRK_SECONDS,
            Puts::Plain,
        )
        .await?;
        let conditional = raw_kv_puts(
            nats,
            "PRESENCE",
            WRITE_CONCURRENCY,
            WRK_SECONDS,
            Puts::Conditional,
        )
        .await?;
        let figures = PathFigures {
            ours,
            bare,
            raw,
            conditional,
        };
        report_path(&mut bench.report, label, &figures);
        if label == "center" {
            bench.seen.write_center = Some(figures.ours.rps);
        }
    }
    heartbeat(bench).await
}

/// The figures and the target of one path.
fn report_path(report: &mut Report, label: &str, figures: &PathFigures) {
    let PathFigures {
        ours,
        bare,
        raw: (raw_rps, raw_p99),
        conditional: (cond_rps, cond_p99),
    } = figures;
    report.add(
        "write",
        format!("POST via {label}, c={WRITE_CONCURRENCY}: req/s (p99)"),
        format!("{:.0}", ours.rps),
        format!("p99 {:.2} ms; {}", ours.p99_ms, ratio(ours.rps, *raw_rps)),
    );
    report.add(
        "write",
        format!(
            "bare front via {label}: a bare axum POST doing one conditional KV put (no auth, validation, cache or watch), run right after ours, c={WRITE_CONCURRENCY}: req/s (p99)"
        ),
        format!("{:.0}", bare.rps),
        format!(
            "p99 {:.2} ms; {:.2}x of the plain puts; our POST {:.2}x of it",
            bare.p99_ms,
            bare.rps / raw_rps,
            ours.rps / bare.rps
        ),
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
            "raw KV puts via {label} {raw_rps:.0} ops/s; conditional puts {cond_rps:.0} ops/s, of which ours is {:.2}x; the bare front {:.0} req/s ({:.2}x of the plain puts), of which ours is {:.2}x",
            ours.rps / cond_rps,
            bare.rps,
            bare.rps / raw_rps,
            ours.rps / bare.rps
        ),
        measured >= WRITE_TARGET,
    );
}

/// The bare front through `nats_url` (the hub or leaf eu's server), in a
/// process of its own logging to `log`, taking the same wrk load as our
/// `POST` (`script`), to users (keys) of its own.
async fn bare_front(
    http: &reqwest::Client,
    log: &std::path::Path,
    script: &std::path::Path,
    nats_url: &str,
    report: &mut Report,
) -> anyhow::Result<WrkResult> {
    let (front, base) = start_bare_front(http, nats_url, log.to_owned()).await;
    let result = Wrk {
        connections: WRITE_CONCURRENCY,
        url: &format!("{base}/"),
        auth: None,
        script: Some(script),
    }
    .run(report);
    drop(front);
    result
}

/// Session heartbeats (PUT .../sessions/{id}) via the center, against
/// POSTs via the center run right before and right after them: the POST
/// figure of the section's start came some 30 s and a few hundred thousand
/// writes earlier, and the machine drifts that much. Three heartbeat runs
/// between four POST runs, as one pair swung from 0.83x to 1.01x between
/// full runs; the 1000 sessions exist before the first, so that every run
/// renews sessions, as a running service's heartbeats mostly do.
async fn heartbeat(bench: &mut Bench) -> anyhow::Result<()> {
    open_sessions(bench).await?;
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
    // POST, heartbeat, POST, heartbeat, ... POST: each heartbeat run is
    // compared with the mean of the POST runs on either side of it, and
    // the target takes the median of those ratios.
    let mut posts_seen = vec![run(bench, &posts)?];
    let mut rounds = Vec::with_capacity(HEARTBEAT_ROUNDS);
    for _ in 0..HEARTBEAT_ROUNDS {
        let beats = run(bench, &script)?;
        let after = run(bench, &posts)?;
        let before = posts_seen[posts_seen.len() - 1].rps;
        rounds.push((beats, (before + after.rps) / 2.0));
        posts_seen.push(after);
    }
    let each = rounds
        .iter()
        .map(|(beats, post)| format!("{:.2}", beats.rps / post))
        .collect::<Vec<_>>()
        .join(" / ");
    let posts_each = posts_seen
        .iter()
        .map(|p| format!("{:.0}", p.rps))
        .collect::<Vec<_>>()
        .join(", ");
    let (beats, post) = median_by(&rounds, |(beats, post)| beats.rps / post)?;
    let post = *post;
    let measured = beats.rps / post;
    let report = &mut bench.report;
    report.add(
        "write",
        format!(
            "POST via center, c={WRITE_CONCURRENCY}, around the median heartbeat run (mean of the two): req/s"
        ),
        format!("{post:.0}"),
        format!("every POST run, in order: {posts_each}"),
    );
    report.add(
        "write",
        format!(
            "session heartbeat (PUT) via center, c={WRITE_CONCURRENCY}: req/s (p99), the median of {HEARTBEAT_ROUNDS} runs between POST runs"
        ),
        format!("{:.0}", beats.rps),
        format!(
            "p99 {:.2} ms; {measured:.2}x of the POSTs beside it (one KV write each; the durable seen key once per lease); every run's ratio {each}",
            beats.p99_ms
        ),
    );
    report.target(
        format!("heartbeat (PUT session) >= {HEARTBEAT_TARGET}x POST via center"),
        format!(
            "{measured:.2}x ({:.0} req/s), the median of {HEARTBEAT_ROUNDS} runs ({each})",
            beats.rps
        ),
        format!(
            "POST via center around the median heartbeat run (mean of the two): {post:.0} req/s"
        ),
        measured >= HEARTBEAT_TARGET,
    );
    Ok(())
}

/// Opens the sessions the heartbeat runs renew (`h0` … `h999`, device
/// `bench`), so that the first run does not also create them and the
/// users' durable `seen` keys.
async fn open_sessions(bench: &Bench) -> anyhow::Result<()> {
    let http = &bench.http;
    let base = &bench.center.base;
    let token = &bench.write_token;
    futures::stream::iter(0..1000)
        .map(|i| async move {
            http.put(format!("{base}/api/v2/presence/h{i}/sessions/bench"))
                .bearer_auth(token)
                .json(
                    &serde_json::json!({"status": "online", "device": "bench", "ttlSeconds": 300}),
                )
                .send()
                .await?
                .error_for_status()
                .map(drop)
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
        .context("open the heartbeat runs' sessions")
}
