//! What `presence-operator dev` tells about the cluster it runs: the same
//! per-object metrics the controller publishes (`presence_operator_*`),
//! from the local processes' health checks and every hub server's
//! `/leafz`, served on `/metrics` so dashboards and alerts work locally.

use crate::controller::conditions::Reason;
use crate::controller::probe::leaf_links;
use crate::local::{Plan, ProcessSpec};
use crate::metrics::Metrics;
use std::collections::BTreeMap;
use std::time::Duration;

/// How often the local cluster is looked at.
const OBSERVE_EVERY: Duration = Duration::from_secs(2);
/// Namespace label of a local cluster's metrics.
pub const LOCAL_NAMESPACE: &str = "dev";

/// The processes of one region and the leaf server names the hub should list.
#[derive(Debug, Clone)]
struct RegionProbe {
    name: String,
    is_leaf: bool,
    processes: Vec<ProcessSpec>,
    leaf_servers: Vec<String>,
}

/// Looks at a running local cluster and publishes what it sees.
pub struct LocalObserver {
    metrics: Metrics,
    cluster: String,
    regions: Vec<RegionProbe>,
    hub_monitors: Vec<(String, u16)>,
}

impl LocalObserver {
    /// An observer of `plan` (a cluster named `cluster` with center `center`),
    /// whose leaf servers are named `<cluster>-<region>-<j>`.
    pub fn new(metrics: Metrics, cluster: &str, center: &str, plan: &Plan) -> Self {
        metrics.init_error_reasons(Reason::ALL.iter().map(|r| r.as_str()));
        let mut regions: BTreeMap<String, RegionProbe> = BTreeMap::new();
        let mut order = Vec::new();
        for process in &plan.processes {
            let region = regions.entry(process.region.clone()).or_insert_with(|| {
                order.push(process.region.clone());
                RegionProbe {
                    name: process.region.clone(),
                    is_leaf: process.region != center,
                    processes: Vec::new(),
                    leaf_servers: Vec::new(),
                }
            });
            region.processes.push(process.clone());
        }
        for region in regions.values_mut().filter(|r| r.is_leaf) {
            let servers = region
                .processes
                .iter()
                .filter(|p| p.name.starts_with("nats-"))
                .count();
            region.leaf_servers = (0..servers)
                .map(|j| format!("{cluster}-{}-{j}", region.name))
                .collect();
        }
        let hub_monitors = regions
            .get(center)
            .into_iter()
            .flat_map(|r| r.processes.iter())
            .filter(|p| p.name.starts_with("nats-"))
            .map(|p| ("127.0.0.1".to_owned(), p.ready.port))
            .collect();
        LocalObserver {
            metrics,
            cluster: cluster.to_owned(),
            regions: order
                .into_iter()
                .filter_map(|r| regions.remove(&r))
                .collect(),
            hub_monitors,
        }
    }

    /// Looks once: every process's health check, then the hub's leaf links.
    pub async fn observe(&self) {
        self.metrics.reconciles.inc();
        let links = leaf_links(&self.hub_monitors).await;
        let mut ready_regions = 0;
        let mut leaves = Vec::new();
        for region in &self.regions {
            let mut healthy = true;
            for process in &region.processes {
                healthy &= crate::monitor::status(process.ready.port, &process.ready.path).await
                    == Some(200);
            }
            if region.is_leaf {
                let linked = links
                    .as_ref()
                    .map(|l| region.leaf_servers.iter().all(|s| l.names.contains(s)));
                let linked =
                    linked.filter(|all| *all || links.as_ref().is_some_and(|l| l.complete));
                healthy &= linked != Some(false);
                leaves.push((region.name.clone(), linked));
            }
            ready_regions += usize::from(healthy);
        }
        let total = self.regions.len();
        let previous: Vec<String> = leaves.iter().map(|(r, _)| r.clone()).collect();
        self.metrics.publish_cluster(
            [&self.cluster, LOCAL_NAMESPACE],
            ready_regions == total,
            (ready_regions, total),
            &leaves,
            &previous,
        );
    }

    /// Observes every few seconds, forever.
    pub async fn run(self) {
        loop {
            self.observe().await;
            tokio::time::sleep(OBSERVE_EVERY).await;
        }
    }
}
