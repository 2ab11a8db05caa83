//! Step 3: apply every rendered child with server-side apply, prune the
//! children of removed regions, and note what the workloads report.

use super::events::{EventReason, publish};
use super::{Context, Error};
use crate::crd::{GROUP, PresenceCluster};
use crate::render::{self, Child, MANAGER, monitoring};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};

/// Ready and wanted replicas of one region's workloads, as the API server
/// answered the apply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub nats_ready: i32,
    pub nats_wanted: i32,
    pub dataplane_ready: i32,
    pub dataplane_wanted: i32,
    /// Some NATS pod still runs an older spec (see [`super::rollout`]).
    pub nats_rolling: bool,
    /// Some presence-service pod still runs an older spec.
    pub dataplane_rolling: bool,
    /// The presence-service rollout passed its progress deadline.
    pub dataplane_stalled: bool,
}

/// Counts by region name.
pub type RegionCounts = BTreeMap<String, Counts>;

/// Applies `children` in order, then deletes labelled children that are no
/// longer rendered.
pub async fn apply_and_prune(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
    children: &[Child],
) -> Result<RegionCounts, Error> {
    let counts = apply_all(&ctx.client, &scope.namespace, children).await?;
    let keep: BTreeSet<String> = children.iter().map(Child::id).collect();
    let pruned = prune_all(&ctx.client, scope, &keep).await?;
    if !pruned.is_empty() {
        let note = format!("deleted {}", pruned.join(", "));
        publish(ctx, pc, EventReason::RegionRemoved, "Prune", note).await;
    }
    Ok(counts)
}

fn region_of(meta: &ObjectMeta) -> String {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(&format!("{GROUP}/region")).cloned())
        .unwrap_or_default()
}

async fn apply_all(client: &Client, ns: &str, children: &[Child]) -> Result<RegionCounts, Error> {
    let mut counts = RegionCounts::new();
    for child in children {
        match child {
            Child::Secret(_) => {} // created once by the secret step, never applied
            Child::ConfigMap(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::Service(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::PodDisruptionBudget(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::HorizontalPodAutoscaler(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::NetworkPolicy(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::PodMonitor(o) => {
                apply_pod_monitor(client, ns, o).await?;
            }
            Child::StatefulSet(o) => {
                let applied = apply_child(client, ns, o).await?;
                let entry = counts.entry(region_of(&o.metadata)).or_default();
                entry.nats_wanted = o.spec.replicas.unwrap_or(1);
                entry.nats_rolling = super::rollout::stateful_set_rolling(&applied);
                entry.nats_ready = applied.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            }
            Child::Deployment(o) => {
                if o.spec.replicas.is_none() {
                    hand_over_replicas(client, ns, o).await?;
                }
                let applied = apply_child(client, ns, o).await?;
                let entry = counts.entry(region_of(&o.metadata)).or_default();
                // Under autoscaling the live count is the autoscaler's.
                entry.dataplane_wanted = applied.spec.replicas.or(o.spec.replicas).unwrap_or(1);
                entry.dataplane_rolling = super::rollout::deployment_rolling(&applied);
                entry.dataplane_stalled = super::rollout::deployment_stalled(&applied);
                entry.dataplane_ready = applied.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            }
        }
    }
    Ok(counts)
}

/// Field manager that holds a Deployment's `replicas` for the moment
/// between the operator letting go and the autoscaler taking over.
pub const HANDOVER_MANAGER: &str = "presence-operator-replicas-handover";

/// Whether `manager`'s server-side apply owns `spec.replicas` of `live`.
fn applies_replicas(live: &Deployment, manager: &str) -> bool {
    live.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.operation.as_deref() == Some("Apply")
        })
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| {
            f.0.get("f:spec")
                .and_then(|s| s.get("f:replicas"))
                .is_some()
        })
}

/// Autoscaling was just turned on: the operator's next apply leaves
/// `replicas` out, and a field no manager owns any more is reset to its
/// default (1 pod) before the autoscaler acts. So first a separate field
/// manager applies the current count; it keeps it until the autoscaler
/// writes its own (the procedure in the Kubernetes docs, "Migrating
/// Deployments and StatefulSets to horizontal autoscaling").
async fn hand_over_replicas(client: &Client, ns: &str, rendered: &Deployment) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let name = rendered.metadata.name.clone().unwrap_or_default();
    let Some(live) = api.get_opt(&name).await? else {
        return Ok(());
    };
    if !applies_replicas(&live, MANAGER) {
        return Ok(());
    }
    let replicas = live.spec.replicas.unwrap_or(1);
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas},
    });
    api.patch(
        &name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Server-side apply of one child with our field manager.
async fn apply_child<K>(client: &Client, ns: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

async fn prune_all(
    client: &Client,
    scope: &render::Scope,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, Error> {
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/managed-by={MANAGER}",
        scope.name
    );
    let ns = scope.namespace.as_str();
    let mut pruned = Vec::new();
    pruned.extend(prune::<Deployment>(client, ns, &selector, keep).await?);
    pruned.extend(prune::<StatefulSet>(client, ns, &selector, keep).await?);
    pruned.extend(prune::<Service>(client, ns, &selector, keep).await?);
    pruned.extend(prune::<ConfigMap>(client, ns, &selector, keep).await?);
    pruned.extend(prune::<PodDisruptionBudget>(client, ns, &selector, keep).await?);
    pruned.extend(prune::<HorizontalPodAutoscaler>(client, ns, &selector, keep).await?);
    pruned.extend(prune::<NetworkPolicy>(client, ns, &selector, keep).await?);
    pruned.extend(prune_pod_monitors(client, ns, &selector, keep).await?);
    Ok(pruned)
}

/// Server-side apply of a PodMonitor (a Prometheus Operator kind).
async fn apply_pod_monitor(
    client: &Client,
    ns: &str,
    object: &DynamicObject,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &monitoring::pod_monitor_resource());
    let name = object.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

/// Deletes our PodMonitors that are no longer rendered. A cluster without
/// the Prometheus Operator's CRDs has none (the list answers 404).
async fn prune_pod_monitors(
    client: &Client,
    ns: &str,
    selector: &str,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &monitoring::pod_monitor_resource());
    let existing = match api.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut deleted = Vec::new();
    for object in existing {
        let name = object.name_any();
        let id = format!("PodMonitor/{name}");
        if !keep.contains(&id) {
            api.delete(&name, &DeleteParams::background()).await?;
            deleted.push(id);
        }
    }
    Ok(deleted)
}

/// Deletes children of `kind` that carry our labels but are no longer rendered.
async fn prune<K>(
    client: &Client,
    ns: &str,
    selector: &str,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut deleted = Vec::new();
    for object in api.list(&ListParams::default().labels(selector)).await? {
        let name = object.name_any();
        let id = format!("{}/{name}", K::kind(&K::DynamicType::default()));
        if !keep.contains(&id) {
            api.delete(&name, &DeleteParams::background()).await?;
            deleted.push(id);
        }
    }
    Ok(deleted)
}
