//! Step 4: ask the hub. Once its servers are ready, the bucket is created
//! or brought to the spec and the hub says which leaves are linked.

use super::children::RegionCounts;
use super::events::{EventReason, publish};
use super::status::RegionObservation;
use super::{Context, HubAccess};
use crate::crd::{PresenceCluster, Role};
use crate::kv::{self, BucketOutcome, DesiredBucket};
use crate::{monitor, render};

/// How the operator reaches the hub: its NATS URL, and the monitoring
/// endpoint of every hub server (host, port).
pub fn hub_addresses(
    hub: &HubAccess,
    pc: &PresenceCluster,
    scope: &render::Scope,
) -> (String, Vec<(String, u16)>) {
    match hub {
        HubAccess::Fixed { nats_url, monitors } => (nats_url.clone(), monitors.clone()),
        HubAccess::ClusterDns => {
            let center = pc.spec.center_name();
            let ns = &scope.namespace;
            let service = format!("{}.{ns}.svc", scope.names.nats(center));
            // Each server through its stable pod name in the headless
            // Service: the client Service would answer from a random one.
            let monitors = (0..pc.spec.center_replicas())
                .map(|k| {
                    let pod = format!("{}-{k}", scope.names.nats(center));
                    let host = format!("{pod}.{}.{ns}.svc", scope.names.nats_headless(center));
                    (host, render::nats::MONITOR_PORT)
                })
                .collect();
            (
                format!("nats://{service}:{}", render::nats::CLIENT_PORT),
                monitors,
            )
        }
    }
}

/// The leaf servers linked to the hub, from every hub server's `/leafz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeafLinks {
    /// Server names some hub server lists as a leafnode.
    pub names: std::collections::BTreeSet<String>,
    /// Whether every hub server answered (so a missing name is missing).
    pub complete: bool,
}

/// Asks every hub server which leaf servers are connected to it; `None`
/// when none answered.
pub async fn leaf_links(monitors: &[(String, u16)]) -> Option<LeafLinks> {
    let answers = futures::future::join_all(
        monitors
            .iter()
            .map(|(host, port)| monitor::connected_leaf_servers(host, *port)),
    )
    .await;
    let answered: Vec<Vec<String>> = answers.into_iter().flatten().collect();
    if answered.is_empty() {
        return None;
    }
    Some(LeafLinks {
        complete: answered.len() == monitors.len(),
        names: answered.into_iter().flatten().collect(),
    })
}

/// Whether every hub server reported ready.
pub fn hub_ready(pc: &PresenceCluster, counts: &RegionCounts) -> bool {
    counts
        .get(pc.spec.center_name())
        .is_some_and(|h| h.nats_ready >= h.nats_wanted && h.nats_wanted > 0)
}

/// What the hub said: the bucket's state (`None` when the hub isn't ready)
/// and each region's observation.
pub async fn observe_hub(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
    counts: &RegionCounts,
    auth: &kv::ClientAuth,
) -> (Option<Result<(), String>>, Vec<RegionObservation>) {
    let here = ctx.cluster_name.as_deref();
    // The bucket and the hub's view of leaf links only where the hub runs.
    let ready = crate::credentials::hub_here(&pc.spec, here) && hub_ready(pc, counts);
    let (nats_url, monitors) = hub_addresses(&ctx.hub, pc, scope);
    let bucket = if ready {
        Some(provision_bucket(pc, ctx, &nats_url, auth).await)
    } else {
        None
    };
    let links = if ready && !pc.spec.leaves.is_empty() {
        leaf_links(&monitors).await
    } else if !crate::credentials::hub_here(&pc.spec, here) {
        links_seen_by_leaves(pc, ctx, scope).await
    } else {
        None
    };
    let mut regions = regions(pc, scope, counts, links.as_ref());
    let local: Vec<String> = pc
        .spec
        .regions()
        .iter()
        .filter(|r| render::is_here(r, here))
        .map(|r| r.name.to_owned())
        .collect();
    regions.retain(|r| local.contains(&r.name));
    (bucket, regions)
}

/// In a cluster without the hub, the leaves' own view: a leaf server
/// whose `/leafz` lists a connection is linked to the hub. Only through
/// cluster DNS (fixed addresses name the hub's servers alone).
async fn links_seen_by_leaves(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Option<LeafLinks> {
    if !matches!(ctx.hub, HubAccess::ClusterDns) {
        return None;
    }
    let here = ctx.cluster_name.as_deref();
    // (pod, its address in the region's headless Service)
    let servers: Vec<(String, String)> = pc
        .spec
        .regions()
        .iter()
        .filter(|r| r.role == Role::Leaf && render::is_here(r, here))
        .flat_map(|r| {
            let sts = scope.names.nats(r.name);
            let headless = scope.names.nats_headless(r.name);
            let ns = scope.namespace.clone();
            (0..r.nats_replicas).map(move |k| {
                let pod = format!("{sts}-{k}");
                let host = format!("{pod}.{headless}.{ns}.svc");
                (pod, host)
            })
        })
        .collect();
    if servers.is_empty() {
        return None;
    }
    let asks = servers.iter().map(|(pod, host)| async move {
        let links = monitor::connected_leaf_servers(host, render::nats::MONITOR_PORT).await?;
        Some((pod.clone(), !links.is_empty()))
    });
    let answers: Vec<(String, bool)> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    Some(LeafLinks {
        complete: answers.len() == servers.len(),
        names: answers
            .into_iter()
            .filter_map(|(pod, linked)| linked.then_some(pod))
            .collect(),
    })
}

/// An Event for each leaf region whose link changed since the last status:
/// up, lost (a Warning), or not up yet when first seen (what it waits
/// for). An unknown link is no change.
pub async fn announce_link_changes(
    pc: &PresenceCluster,
    ctx: &Context,
    regions: &[RegionObservation],
) {
    let before = |name: &str| {
        pc.status
            .as_ref()
            .and_then(|s| s.regions.iter().find(|r| r.name == name))
            .and_then(|r| r.leafnode_connected)
    };
    for region in regions {
        let (Some(now), was) = (region.leafnode_connected, before(&region.name)) else {
            continue;
        };
        if was == Some(now) {
            continue;
        }
        let linked = region.leaf_servers_linked.unwrap_or(0);
        let waiting = format!(
            "{linked}/{} leaf NATS servers linked to the hub; waiting for the rest (their log \
             names the cause: credentials, CA, or the hub's address)",
            region.nats_wanted
        );
        let (reason, note) = match (now, was) {
            (true, _) => (
                EventReason::LeafnodeConnected,
                format!(
                    "region {}: every leaf NATS server is linked to the hub",
                    region.name
                ),
            ),
            (false, Some(true)) => (
                EventReason::LeafnodeDisconnected,
                format!("region {}: lost its link; {waiting}", region.name),
            ),
            (false, _) => (
                EventReason::LeafnodeWaiting,
                format!("region {}: {waiting}", region.name),
            ),
        };
        publish(ctx, pc, reason, "ObserveLeafnodes", note).await;
    }
}

async fn provision_bucket(
    pc: &PresenceCluster,
    ctx: &Context,
    nats_url: &str,
    auth: &kv::ClientAuth,
) -> Result<(), String> {
    let desired = DesiredBucket {
        name: pc.spec.bucket().to_owned(),
        replicas: usize::try_from(pc.spec.kv_replicas()).unwrap_or(1),
    };
    let outcome = match kv::connect(nats_url, pc.spec.js_domain(), auth).await {
        Ok(js) => kv::ensure_bucket(&js, &desired).await,
        Err(e) => Err(e),
    };
    match &outcome {
        Ok(BucketOutcome::Created) => {
            let note = format!(
                "created KV bucket {} with {} replicas",
                desired.name, desired.replicas
            );
            publish(ctx, pc, EventReason::BucketCreated, "ProvisionBucket", note).await
        }
        Ok(BucketOutcome::Updated(change)) => {
            let note = format!("KV bucket {}: {change}", desired.name);
            publish(ctx, pc, EventReason::BucketUpdated, "ProvisionBucket", note).await
        }
        _ => {}
    }
    outcome.map(|_| ()).map_err(|e| e.to_string())
}

/// Every region of the spec with what was observed of it. A leaf is linked
/// when some hub server lists each of its servers (named like their pods,
/// `<nats-name>-N`).
pub fn regions(
    pc: &PresenceCluster,
    scope: &render::Scope,
    counts: &RegionCounts,
    links: Option<&LeafLinks>,
) -> Vec<RegionObservation> {
    pc.spec
        .regions()
        .iter()
        .map(|region| {
            let c = counts.get(region.name).copied().unwrap_or_default();
            let linked = match (region.role, links) {
                (Role::Leaf, Some(l)) => Some(linked_servers(
                    l,
                    &scope.names.nats(region.name),
                    region.nats_replicas,
                )),
                _ => None,
            };
            RegionObservation {
                name: region.name.to_owned(),
                role: region.role,
                nats_ready: c.nats_ready,
                nats_wanted: c.nats_wanted,
                dataplane_ready: c.dataplane_ready,
                dataplane_wanted: c.dataplane_wanted,
                nats_rolling: c.nats_rolling,
                dataplane_rolling: c.dataplane_rolling,
                dataplane_stalled: c.dataplane_stalled,
                leafnode_connected: linked.zip(links).and_then(|(n, l)| {
                    let all = n >= region.nats_replicas;
                    // A missing link may be on a hub server that didn't answer.
                    (all || l.complete).then_some(all)
                }),
                leaf_servers_linked: linked,
            }
        })
        .collect()
}

/// How many of servers `<statefulset>-0..replicas` are linked.
fn linked_servers(links: &LeafLinks, statefulset: &str, replicas: i32) -> i32 {
    let linked = (0..replicas)
        .filter(|k| links.names.contains(&format!("{statefulset}-{k}")))
        .count();
    i32::try_from(linked).unwrap_or(i32::MAX)
}
