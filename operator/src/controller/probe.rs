//! Step 4: ask the hub. Once its servers are ready, the bucket is created
//! or brought to the spec and the hub says which leaves are linked.

use super::children::RegionCounts;
use super::events::{EventReason, publish};
use super::status::RegionObservation;
use super::{Context, HubAccess};
use crate::crd::{PresenceCluster, Role};
use crate::kv::{self, BucketOutcome, DesiredBucket};
use crate::{monitor, render};

/// Addresses of the hub: NATS URL, monitoring host and port.
pub fn hub_addresses(
    hub: &HubAccess,
    pc: &PresenceCluster,
    scope: &render::Scope,
) -> (String, String, u16) {
    match hub {
        HubAccess::Fixed {
            nats_url,
            monitor_host,
            monitor_port,
        } => (nats_url.clone(), monitor_host.clone(), *monitor_port),
        HubAccess::ClusterDns => {
            let host = format!(
                "{}.{}.svc",
                scope.names.nats(pc.spec.center_name()),
                scope.namespace
            );
            (
                format!("nats://{host}:{}", render::nats::CLIENT_PORT),
                host,
                render::nats::MONITOR_PORT,
            )
        }
    }
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
) -> (Option<Result<(), String>>, Vec<RegionObservation>) {
    let ready = hub_ready(pc, counts);
    let (nats_url, monitor_host, monitor_port) = hub_addresses(&ctx.hub, pc, scope);
    let bucket = if ready {
        Some(provision_bucket(pc, ctx, &nats_url).await)
    } else {
        None
    };
    let leaf_servers = if ready && !pc.spec.leaves.is_empty() {
        monitor::connected_leaf_servers(&monitor_host, monitor_port).await
    } else {
        None
    };
    (bucket, regions(pc, scope, counts, leaf_servers.as_deref()))
}

async fn provision_bucket(
    pc: &PresenceCluster,
    ctx: &Context,
    nats_url: &str,
) -> Result<(), String> {
    let desired = DesiredBucket {
        name: pc.spec.bucket().to_owned(),
        replicas: usize::try_from(pc.spec.kv_replicas()).unwrap_or(1),
    };
    let outcome = match kv::connect(nats_url, pc.spec.js_domain()).await {
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
/// when the hub lists one of its servers (pods `<nats-name>-N`).
pub fn regions(
    pc: &PresenceCluster,
    scope: &render::Scope,
    counts: &RegionCounts,
    leaf_servers: Option<&[String]>,
) -> Vec<RegionObservation> {
    pc.spec
        .regions()
        .iter()
        .map(|region| {
            let c = counts.get(region.name).copied().unwrap_or_default();
            let prefix = format!("{}-", scope.names.nats(region.name));
            RegionObservation {
                name: region.name.to_owned(),
                role: region.role,
                nats_ready: c.nats_ready,
                nats_wanted: c.nats_wanted,
                dataplane_ready: c.dataplane_ready,
                dataplane_wanted: c.dataplane_wanted,
                leafnode_connected: match region.role {
                    Role::Center => None,
                    Role::Leaf => {
                        leaf_servers.map(|names| names.iter().any(|n| n.starts_with(&prefix)))
                    }
                },
            }
        })
        .collect()
}
