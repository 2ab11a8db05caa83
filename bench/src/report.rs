//! What a run measured, printed as it goes and written to bench/RESULTS.md.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// One reported figure.
struct Row {
    section: &'static str,
    metric: String,
    value: String,
    note: String,
}

/// One of the targets: what was measured, against which ceiling of
/// the same run, and whether it was met.
struct Target {
    target: String,
    measured: String,
    ceiling: String,
    met: bool,
}

/// Every figure, target and load-generator command of a run.
#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    targets: Vec<Target>,
    /// The load generators' command lines, for the "Commands" section.
    pub commands: Vec<String>,
    /// The sections this run measured, by name.
    pub sections: Vec<&'static str>,
    /// Presences the memory and warm-up sections cache.
    pub users: usize,
}

impl Report {
    /// An empty report of a run caching `users` presences.
    pub fn new(users: usize) -> Report {
        Report {
            users,
            ..Report::default()
        }
    }

    /// Records a target row; `ceiling` names the same-run figure it is a ratio
    /// to (or says that the target is absolute).
    pub fn target(
        &mut self,
        target: impl Into<String>,
        measured: impl Into<String>,
        ceiling: impl Into<String>,
        met: bool,
    ) {
        let target = Target {
            target: target.into(),
            measured: measured.into(),
            ceiling: ceiling.into(),
            met,
        };
        println!(
            "  TARGET {:<54} {:>22}  {} [{}]",
            target.target,
            target.measured,
            target.ceiling,
            if met { "met" } else { "MISSED" }
        );
        self.targets.push(target);
    }

    /// Records and prints one figure.
    pub fn add(
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

    /// Writes bench/RESULTS.md: machine, targets, every figure, the commands
    /// and the hand-kept bench/ANALYSIS.md.
    pub fn write_results(&self) -> anyhow::Result<()> {
        let mut md = String::new();
        self.write_header(&mut md);
        let _ = writeln!(
            md,
            "## Targets\n\n| target | measured | ceiling (same run) | |\n|---|---|---|---|"
        );
        for t in &self.targets {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                t.target,
                t.measured,
                t.ceiling,
                if t.met { "met" } else { "**missed**" }
            );
        }
        let _ = writeln!(md, "\n## Every figure\n");
        let _ = writeln!(md, "| area | figure | value | notes |\n|---|---|---|---|");
        for row in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                row.section, row.metric, row.value, row.note
            );
        }
        let _ = writeln!(
            md,
            "\n## Commands\n\nServers: a nats-server hub (JetStream domain `hub`, file store) with leaves `eu` and `us`, and a release-built presence-service per region, started by `bench/src/main.rs` on loopback ports; the memory, warm-up and scale sections start further presence-service processes of their own against the hub.\n"
        );
        // A command run several times (alternated pairs, repeated runs)
        // is listed once, where it first ran.
        let mut listed = std::collections::HashSet::new();
        for command in self.commands.iter().filter(|c| listed.insert(*c)) {
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

    fn write_header(&self, md: &mut String) {
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
            "Load generators (wrk, raw NATS clients, redis-benchmark) share the same cores as the servers, so read every figure as a ratio to the ceiling measured beside it in this same run."
        );
        let _ = writeln!(
            md,
            "Sections: {}; {} users in the memory and warm-up sections.\n",
            self.sections.join(", "),
            self.users
        );
    }
}

/// `ours` as a multiple of `ceiling`, for the notes column.
pub fn ratio(ours: f64, ceiling: f64) -> String {
    format!("{:.2}x of ceiling", ours / ceiling)
}
