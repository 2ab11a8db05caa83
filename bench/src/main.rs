//! `make bench`: every figure is measured against a ceiling taken in the same
//! run on the same machine, because absolute numbers drift on a shared
//! 2-core box. Starts a real NATS hub with two leaves and three release-built
//! presence-service processes, drives them with wrk and raw clients, and
//! writes bench/RESULTS.md.
//!
//! `BENCH_ONLY=warmup,scale` runs only the named sections (see [`Section`]);
//! `BENCH_USERS` sets the presences of the memory and warm-up sections
//! (default 1 000 000, the size).

mod load;
mod node;
mod report;
mod sections;

use anyhow::{Context as _, bail};
use node::{Service, start_service, token};
use report::Report;
use std::path::Path;
use testkit::Nats;

/// The areas of the benchmark, in the order a full run measures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Read,
    Write,
    Scale,
    Bulk,
    Propagation,
    Memory,
    Warmup,
    ColdStart,
    Redis,
}

impl Section {
    const ALL: [Section; 9] = [
        Section::Read,
        Section::Write,
        Section::Scale,
        Section::Bulk,
        Section::Propagation,
        Section::Memory,
        Section::Warmup,
        Section::ColdStart,
        Section::Redis,
    ];

    /// The name `BENCH_ONLY` uses.
    fn name(self) -> &'static str {
        match self {
            Section::Read => "read",
            Section::Write => "write",
            Section::Scale => "scale",
            Section::Bulk => "bulk",
            Section::Propagation => "propagation",
            Section::Memory => "memory",
            Section::Warmup => "warmup",
            Section::ColdStart => "cold-start",
            Section::Redis => "redis",
        }
    }

    /// The sections `BENCH_ONLY` names (all when unset or empty), in run
    /// order; an unknown name is an error rather than a silently empty run.
    fn selected(only: Option<&str>) -> anyhow::Result<Vec<Section>> {
        let Some(only) = only.filter(|o| !o.trim().is_empty()) else {
            return Ok(Section::ALL.to_vec());
        };
        let mut wanted = Vec::new();
        for name in only.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some(section) = Section::ALL.into_iter().find(|s| s.name() == name) else {
                let known: Vec<&str> = Section::ALL.iter().map(|s| s.name()).collect();
                bail!(
                    "BENCH_ONLY: no section {name:?}; sections: {}",
                    known.join(",")
                );
            };
            wanted.push(section);
        }
        Ok(Section::ALL
            .into_iter()
            .filter(|s| wanted.contains(s))
            .collect())
    }
}

/// Figures one section measures and a later one quotes.
#[derive(Default)]
pub struct Seen {
    pub read_c64: Option<f64>,
    pub write_center: Option<f64>,
    pub multi_presences: Option<f64>,
    /// Users `{MEMORY_PREFIX}0..` the memory section wrote into
    /// [`sections::memory::BUCKET`] (0: not filled in this run).
    pub memory_bucket_users: usize,
}

/// Everything the sections share: the servers, clients, tokens and the
/// report. Fields drop in order: services before the NATS servers they
/// use, the temp dir last.
pub struct Bench {
    pub http: reqwest::Client,
    pub read_token: String,
    pub write_token: String,
    /// Presences the memory and warm-up sections cache (`BENCH_USERS`).
    pub users: usize,
    pub report: Report,
    pub seen: Seen,
    pub center: Service,
    pub eu: Service,
    pub us: Service,
    pub eu_nats: Nats,
    pub us_nats: Nats,
    pub hub: Nats,
    dir: tempfile::TempDir,
}

impl Bench {
    /// Starts a hub, leaves eu and us, and a presence-service for each.
    async fn start(users: usize) -> anyhow::Result<Bench> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        println!(
            "starting a hub, leaves eu and us, and three presence-service processes (release build)..."
        );
        let hub = Nats::hub(root).await;
        let eu_nats = Nats::leaf(root, "eu", &hub, None).await;
        let us_nats = Nats::leaf(root, "us", &hub, None).await;
        let center = start_service(root, "center", "center", &hub, "PRESENCE").await;
        let eu = start_service(root, "eu", "leaf", &eu_nats, "PRESENCE").await;
        let us = start_service(root, "us", "leaf", &us_nats, "PRESENCE").await;
        Ok(Bench {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()?,
            read_token: token("")?,
            write_token: token("presence:write")?,
            users,
            report: Report::new(users),
            seen: Seen::default(),
            center,
            eu,
            us,
            eu_nats,
            us_nats,
            hub,
            dir,
        })
    }

    /// The run's scratch directory (logs, wrk scripts, NATS data).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    async fn measure(&mut self, section: Section) -> anyhow::Result<()> {
        println!("\n== {}", section.name());
        match section {
            Section::Read => sections::read::run(self).await,
            Section::Write => sections::write::run(self).await,
            Section::Scale => sections::scale::run(self).await,
            Section::Bulk => sections::bulk::run(self).await,
            Section::Propagation => sections::propagation::run(self).await,
            Section::Memory => sections::memory::run(self).await,
            Section::Warmup => sections::warmup::run(self).await,
            Section::ColdStart => sections::cold_start::run(self).await,
            Section::Redis => sections::redis::run(self),
        }
        .with_context(|| format!("section {}", section.name()))
    }
}

/// `BENCH_USERS`, default 1 000 000.
fn users() -> anyhow::Result<usize> {
    match std::env::var("BENCH_USERS") {
        Ok(text) => {
            let users: usize = text
                .trim()
                .parse()
                .with_context(|| format!("BENCH_USERS={text:?} is not a number"))?;
            if users < 1000 {
                bail!("BENCH_USERS must be at least 1000 for a meaningful per-user figure");
            }
            Ok(users)
        }
        Err(_) => Ok(1_000_000),
    }
}

async fn run() -> anyhow::Result<()> {
    let sections = Section::selected(std::env::var("BENCH_ONLY").ok().as_deref())?;
    let mut bench = Bench::start(users()?).await?;
    bench.report.sections = sections.iter().map(|s| s.name()).collect();
    for section in sections {
        bench.measure(section).await?;
    }
    bench.report.write_results()
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run())
}

#[cfg(test)]
mod tests {
    use super::Section;

    #[test]
    fn bench_only_selects_named_sections_in_run_order() {
        let picked = Section::selected(Some("warmup, read")).expect("known names");
        assert_eq!(picked, [Section::Read, Section::Warmup]);
        assert_eq!(Section::selected(None).expect("all").len(), 9);
        assert_eq!(Section::selected(Some(" ")).expect("all").len(), 9);
        assert!(Section::selected(Some("read,nope")).is_err());
    }
}
