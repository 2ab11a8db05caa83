//! Reconciles PresenceClusters as a pipeline of named steps, one module
//! each:
//!
//! 1. [`check`]: the spec is valid;
//! 2. [`secrets`]: the JWT Secret exists (generated once, or referenced);
//! 3. [`children`]: every rendered object is applied (server-side apply) and
//!    objects of removed regions are pruned;
//! 4. [`probe`]: the hub is asked (the bucket provisioned, leaf links read);
//! 5. [`status`]: a pure function turns what was observed into conditions,
//!    per-region status and the next requeue.
//!
//! A step that can't go on ends the pipeline with what it observed, and
//! the status rules say what that means. Deletion is [`cleanup`]'s job.

pub mod check;
pub mod children;
pub mod cleanup;
pub mod conditions;
pub mod events;
pub mod nats_secrets;
pub mod probe;
pub mod rollout;
pub mod secrets;
pub mod status;
pub mod storage;
#[cfg(test)]
mod tests;

pub use cleanup::DELETION_GRACE;
use conditions::{Reason, set_condition};
use events::{EventReason, publish};
use secrets::SecretState;
use status::{Observed, Requeue};

use crate::crd::{PresenceCluster, PresenceClusterStatus};
use crate::metrics::Metrics;
use crate::render::{self, MANAGER};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Finalizer guarding the KV bucket, the only state outside Kubernetes.
pub const FINALIZER: &str = "presencecluster.io/kv-bucket";
/// `"true"` stops reconciling the object (deletion still proceeds).
pub const PAUSED_ANNOTATION: &str = "presencecluster.io/paused";

/// Why a reconcile failed; requeued with backoff and reported as an Event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(kube::Error),
    #[error("the PresenceCluster has no namespace")]
    NoNamespace,
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("cannot generate a secret or key: {0}")]
    Random(String),
    #[error(
        "cannot delete KV bucket {bucket}: {reason}; retrying until {deadline}, then the bucket is left in place"
    )]
    BucketDeletion {
        bucket: String,
        reason: String,
        deadline: String,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

// The cause is part of the message, so it is not also a `source()`:
// printing an error chain shows it once.
impl From<kube::Error> for Error {
    fn from(err: kube::Error) -> Self {
        Error::Kube(err)
    }
}

impl Error {
    /// The reason for Degraded, Events and metrics.
    pub fn reason(&self) -> Reason {
        match self {
            Error::Kube(_) => Reason::KubernetesApiError,
            Error::NoNamespace => Reason::InvalidObject,
            Error::Render(_) => Reason::InvalidSpec,
            Error::Random(_) => Reason::SecretGenerationFailed,
            Error::BucketDeletion { .. } => Reason::BucketDeletionFailed,
            Error::Finalizer(_) => Reason::FinalizerFailed,
        }
    }
}

/// How the operator reaches the hub's NATS (client and monitoring ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubAccess {
    /// Through the hub's client Service in the cluster (production).
    ClusterDns,
    /// Fixed addresses, for running the operator outside the cluster and
    /// tests: the NATS URL and every hub server's monitoring endpoint.
    Fixed {
        nats_url: String,
        monitors: Vec<(String, u16)>,
    },
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    /// Where the operator runs, so NetworkPolicies admit it to NATS.
    pub operator_namespace: String,
    /// The Kubernetes cluster this operator serves (`--cluster-name`): only
    /// regions assigned to it are reconciled. `None`: every region.
    pub cluster_name: Option<String>,
    pub recorder: kube::runtime::events::Recorder,
    pub metrics: Metrics,
    pub hub: HubAccess,
    failures: Mutex<HashMap<String, u32>>,
    /// Leaf regions whose link metric each PresenceCluster last published.
    published_leaves: Mutex<HashMap<String, Vec<String>>>,
    /// The generation each PresenceCluster was last advised on (see
    /// [`render::advice`]): once per generation applied, and once after
    /// the operator starts.
    advised: Mutex<HashMap<String, Option<i64>>>,
}

impl Context {
    /// A context for `client`; events are reported as `reporter`.
    pub fn new(client: Client, reporter: &str, metrics: Metrics, hub: HubAccess) -> Self {
        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: MANAGER.into(),
                instance: Some(reporter.to_owned()),
            },
        );
        Context {
            client,
            operator_namespace: render::network::DEFAULT_OPERATOR_NAMESPACE.to_owned(),
            cluster_name: None,
            recorder,
            metrics,
            hub,
            failures: Mutex::new(HashMap::new()),
            published_leaves: Mutex::new(HashMap::new()),
            advised: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `pc`'s generation has not been advised on yet; it counts as
    /// advised from now on.
    fn first_advice(&self, pc: &PresenceCluster) -> bool {
        let mut advised = self.advised.lock().unwrap_or_else(|p| p.into_inner());
        advised.insert(key(pc), pc.meta().generation) != Some(pc.meta().generation)
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the per-object metrics of `pc` from what the status rules
    /// computed (readiness only, when `computed` has no region data).
    fn publish_metrics(&self, pc: &PresenceCluster, computed: &status::Computed) {
        let (name, namespace) = (pc.name_any(), pc.namespace().unwrap_or_default());
        let ready = computed
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::ConditionType::Ready && c.status == Some(true));
        let Some((regions, counts)) = computed.regions.as_ref().zip(computed.regions_ready) else {
            self.metrics
                .cluster_ready
                .with_label_values(&[&name, &namespace])
                .set(i64::from(ready));
            return;
        };
        let leaves: Vec<(String, Option<bool>)> = regions
            .iter()
            .filter(|r| r.role == crate::crd::Role::Leaf.as_str())
            .map(|r| (r.name.clone(), r.leafnode_connected))
            .collect();
        let mut published = self
            .published_leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let previous = published.insert(key(pc), leaves.iter().map(|(r, _)| r.clone()).collect());
        self.metrics.publish_cluster(
            [&name, &namespace],
            ready,
            counts,
            &leaves,
            previous.as_deref().unwrap_or_default(),
        );
    }

    /// Publishes when the NATS servers' certificate expires.
    fn publish_certificate_expiry(
        &self,
        pc: &PresenceCluster,
        expiry: Option<time::OffsetDateTime>,
    ) {
        if let Some(expiry) = expiry {
            self.metrics
                .certificate_expiry
                .with_label_values(&[&pc.name_any(), &pc.namespace().unwrap_or_default()])
                .set(expiry.unix_timestamp());
        }
    }

    /// Drops the per-object metrics of a deleted PresenceCluster.
    fn forget_metrics(&self, pc: &PresenceCluster) {
        let (name, namespace) = (pc.name_any(), pc.namespace().unwrap_or_default());
        let mut published = self
            .published_leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let leaves = published.remove(&key(pc)).unwrap_or_default();
        self.metrics.forget_cluster([&name, &namespace], &leaves);
        self.advised
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(pc));
    }
}

fn key(pc: &PresenceCluster) -> String {
    format!("{}/{}", pc.namespace().unwrap_or_default(), pc.name_any())
}

/// Whether the paused annotation is set.
pub fn is_paused(pc: &PresenceCluster) -> bool {
    pc.annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// Entry point for the controller runtime.
pub async fn reconcile(pc: Arc<PresenceCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = pc.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<PresenceCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = pc.meta().deletion_timestamp.is_some();
    let result = if is_paused(&pc) && !deleting {
        paused(&pc, &ctx, &api).await
    } else {
        finalizer::finalizer(&api, FINALIZER, pc.clone(), |event| async {
            match event {
                FinalizerEvent::Apply(pc) => apply(&pc, &ctx, &api, &ns).await,
                FinalizerEvent::Cleanup(pc) => cleanup::cleanup(&pc, &ctx, &api, &ns).await,
            }
        })
        .await
        .map_err(|e| match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.failures().remove(&key(&pc));
            if deleting {
                ctx.forget_metrics(&pc);
            }
        }
        // Say so in status too (best effort: the API may be what failed).
        Err(err) if !deleting => {
            let mut status = pc.status.clone().unwrap_or_default();
            // A paused object's status keeps the generation last applied.
            let generation = if is_paused(&pc) {
                status.observed_generation
            } else {
                pc.meta().generation
            };
            let update = status::failed(err.reason(), &err.to_string());
            set_condition(
                &mut status.conditions,
                pc.meta().generation,
                &update,
                Timestamp::now(),
            );
            if let Err(status_err) = write_status_as_of(&pc, &api, status, generation).await {
                tracing::warn!(error = %status_err, "cannot record the failure in status");
            }
        }
        Err(_) => {}
    }
    result
}

/// Requeue with exponential backoff (5 s doubling to 5 min), and tell people.
pub fn error_policy(pc: Arc<PresenceCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    let reason = err.reason();
    ctx.metrics
        .errors
        .with_label_values(&[reason.as_str()])
        .inc();
    let attempts = {
        let mut failures = ctx.failures();
        let n = failures.entry(key(&pc)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay =
        Duration::from_secs(5 * 2u64.pow(attempts.min(6) - 1)).min(Duration::from_secs(300));
    tracing::warn!(presencecluster = %key(&pc), error = %err, ?delay, "reconcile failed");
    let note = err.to_string();
    tokio::spawn(async move {
        publish(&ctx, &pc, EventReason::Failed(reason), "Reconcile", note).await;
    });
    Action::requeue(delay)
}

/// A paused object: nothing is applied, so `observedGeneration` stays at
/// the last generation that was, and Ready says it can't vouch for more.
async fn paused(
    pc: &PresenceCluster,
    ctx: &Context,
    api: &Api<PresenceCluster>,
) -> Result<Action, Error> {
    let mut status = pc.status.clone().unwrap_or_default();
    let applied = status.observed_generation;
    // Paused on purpose: no readiness to report (so no not-ready alert).
    let _ = ctx
        .metrics
        .cluster_ready
        .remove_label_values(&[&pc.name_any(), &pc.namespace().unwrap_or_default()]);
    let now = Timestamp::now();
    for update in status::paused(PAUSED_ANNOTATION, applied) {
        set_condition(&mut status.conditions, pc.meta().generation, &update, now);
    }
    write_status_as_of(pc, api, status, applied).await?;
    Ok(Action::await_change())
}

/// The pipeline: observe step by step, then write what the status rules say.
async fn apply(
    pc: &PresenceCluster,
    ctx: &Context,
    api: &Api<PresenceCluster>,
    ns: &str,
) -> Result<Action, Error> {
    let scope = render::Scope::new(pc, ns)?;
    let observed = observe(pc, ctx, &scope).await?;
    // Once per generation applied: the advice depends on the spec alone.
    if matches!(observed, Observed::Applied { .. }) && ctx.first_advice(pc) {
        for note in render::advice::advice(&pc.spec, ctx.cluster_name.as_deref()) {
            publish(ctx, pc, EventReason::SpecAdvice, "Advise", note).await;
        }
    }
    let computed = status::compute(&observed);
    ctx.publish_metrics(pc, &computed);
    let mut status = pc.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    for update in &computed.conditions {
        set_condition(&mut status.conditions, pc.meta().generation, update, now);
    }
    if let Some(regions) = computed.regions {
        status.regions = regions;
    }
    if let Some((ready, all)) = computed.regions_ready {
        status.regions_ready = Some(format!("{ready}/{all}"));
    }
    if let Some(expiry) = computed.certificate_expiry {
        status.nats_certificate_expiry = Some(expiry);
    }
    write_status(pc, api, status).await?;
    Ok(match computed.requeue {
        Requeue::OnChange => Action::await_change(),
        Requeue::After(delay) => Action::requeue(delay),
    })
}

/// Steps 1 to 4; each may end the pipeline with what it found.
async fn observe(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<Observed, Error> {
    if let Err(problem) = check::spec(pc, scope, ctx.cluster_name.as_deref()) {
        return Ok(Observed::InvalidSpec(problem));
    }
    if let Some(problem) = name_conflict(pc, ctx, scope).await? {
        return Ok(Observed::NameConflict(problem));
    }
    let digest = match secrets::ensure_jwt_secret(pc, ctx, scope).await? {
        SecretState::Ready(digest) => digest,
        SecretState::Problem { reason, message } => {
            return Ok(Observed::SecretProblem { reason, message });
        }
    };
    let (ids, auth, certificate_expiry) = match nats_secrets::ensure(pc, ctx, scope).await? {
        nats_secrets::NatsCredentials::Ready {
            ids,
            auth,
            certificate_expiry,
        } => (ids, auth, certificate_expiry),
        nats_secrets::NatsCredentials::Problem { reason, message } => {
            return Ok(Observed::SecretProblem { reason, message });
        }
    };
    ctx.publish_certificate_expiry(pc, certificate_expiry);
    let certificate_expiry = certificate_expiry.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    let hub_here = crate::credentials::hub_here(&pc.spec, ctx.cluster_name.as_deref());
    let volumes = if hub_here {
        storage::inspect(pc, ctx, scope).await?
    } else {
        storage::HubVolumes::default()
    };
    let desired_size = pc.spec.storage_size();
    if let Err(problem) = storage::check_growth(&desired_size, volumes.largest()) {
        return Ok(Observed::InvalidSpec(problem));
    }
    let inputs = render::Inputs {
        jwt_secret_digest: Some(digest),
        hub_volume_size: volumes.template.clone(),
        hub_volume_capacity: volumes.smallest_capacity().cloned(),
        operator_namespace: Some(ctx.operator_namespace.clone()),
        nats: Some(ids),
        cluster: ctx.cluster_name.clone(),
        ..Default::default()
    };
    let children = render::render(pc, scope, &inputs)?;
    let counts = children::apply_and_prune(pc, ctx, scope, &children).await?;
    storage::keep_from_gitops(ctx, scope, &volumes).await;
    let (resized, storage) =
        storage::expand(ctx, scope, &volumes.to_grow(&desired_size), &desired_size).await;
    if !resized.is_empty() {
        let note = format!("asked for {} on {}", desired_size.0, resized.join(", "));
        publish(ctx, pc, EventReason::VolumesExpanded, "ExpandVolumes", note).await;
    }
    let (bucket, regions) = probe::observe_hub(pc, ctx, scope, &counts, &auth).await;
    probe::announce_link_changes(pc, ctx, &regions).await;
    Ok(Observed::Applied {
        regions,
        bucket,
        storage,
        certificate_expiry,
    })
}

/// Why `pc` must give way to another PresenceCluster of its namespace
/// whose objects would have the same names (see [`check::gives_way`]), if
/// it must: one LIST of its neighbours, and for a clash (rare) one GET of
/// the clashing region's NATS ConfigMap, to see who holds the objects.
async fn name_conflict(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<Option<String>, Error> {
    let neighbours: Api<PresenceCluster> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let neighbours = neighbours.list(&ListParams::default()).await?.items;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    for clash in check::name_clashes(pc, &neighbours, ctx.cluster_name.as_deref()) {
        // The ConfigMap shows who applied the region; a leaf's nkey Secret,
        // made before anything is applied, who began to.
        let config = config_maps
            .get_opt(&scope.names.nats_config(&clash.region))
            .await?;
        let holder = match config.as_ref().and_then(controller_uid) {
            Some(uid) => Some(uid.to_owned()),
            None => secrets
                .get_opt(&scope.names.nats_leaf_secret(&clash.region))
                .await?
                .as_ref()
                .and_then(controller_uid)
                .map(str::to_owned),
        };
        if let Some(problem) = check::gives_way(pc, &clash, holder.as_deref()) {
            return Ok(Some(problem));
        }
    }
    Ok(None)
}

/// The uid of the PresenceCluster that controls `object`, if one does.
fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    let group = PresenceCluster::group(&());
    object
        .meta()
        .owner_references
        .as_deref()?
        .iter()
        .find(|owner| {
            owner.controller == Some(true)
                && owner.kind == PresenceCluster::kind(&())
                && owner.api_version.split('/').next() == Some(group.as_ref())
        })
        .map(|owner| owner.uid.as_str())
}

/// Writes status for the object's current generation.
async fn write_status(
    pc: &PresenceCluster,
    api: &Api<PresenceCluster>,
    status: PresenceClusterStatus,
) -> Result<(), Error> {
    write_status_as_of(pc, api, status, pc.meta().generation).await
}

/// Writes status with a merge patch, only when it changed, saying which
/// generation it describes.
async fn write_status_as_of(
    pc: &PresenceCluster,
    api: &Api<PresenceCluster>,
    mut status: PresenceClusterStatus,
    generation: Option<i64>,
) -> Result<(), Error> {
    status.observed_generation = generation;
    if pc.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({"status": status});
    api.patch_status(
        &pc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}
