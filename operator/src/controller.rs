//! Reconciles PresenceClusters: applies the rendered children with
//! server-side apply, prunes children of removed regions, provisions the KV
//! bucket, and reports status, conditions and events.

use crate::crd::{
    DeletionPolicy, GROUP, PresenceCluster, PresenceClusterStatus, RegionStatus, Role,
};
use crate::kv::{self, BucketOutcome, DesiredBucket};
use crate::metrics::Metrics;
use crate::monitor;
use crate::render::{self, Child, MANAGER, secrets};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Finalizer guarding the KV bucket, the only state outside Kubernetes.
pub const FINALIZER: &str = "presencecluster.io/kv-bucket";
/// `"true"` stops reconciling the object (deletion still proceeds).
pub const PAUSED_ANNOTATION: &str = "presencecluster.io/paused";
/// After this long in deletion, an unreachable hub no longer blocks removal.
pub const DELETION_GRACE: Duration = Duration::from_secs(120);
/// Requeue interval while something is still converging.
const REQUEUE_PROGRESSING: Duration = Duration::from_secs(10);
/// Requeue interval once everything is ready (drift check).
const REQUEUE_READY: Duration = Duration::from_secs(300);

/// Why a reconcile failed; requeued with backoff and reported as an Event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the PresenceCluster has no namespace")]
    NoNamespace,
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("cannot generate the JWT secret: {0}")]
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

impl Error {
    /// CamelCase reason for Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::NoNamespace => "InvalidObject",
            Error::Render(_) => "InvalidSpec",
            Error::Random(_) => "SecretGenerationFailed",
            Error::BucketDeletion { .. } => "BucketDeletionFailed",
            Error::Finalizer(_) => "FinalizerFailed",
        }
    }
}

/// How the operator reaches the hub's NATS (client and monitoring ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubAccess {
    /// Through the hub's client Service in the cluster (production).
    ClusterDns,
    /// A fixed address, for running the operator outside the cluster and tests.
    Fixed {
        nats_url: String,
        monitor_host: String,
        monitor_port: u16,
    },
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub hub: HubAccess,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for `client`; events are reported as `reporter`.
    pub fn new(client: Client, reporter: &str, metrics: Metrics, hub: HubAccess) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: MANAGER.into(),
                instance: Some(reporter.to_owned()),
            },
        );
        Context {
            client,
            recorder,
            metrics,
            hub,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn hub_addresses(
        &self,
        pc: &PresenceCluster,
        names: &render::Names,
        ns: &str,
    ) -> (String, String, u16) {
        match &self.hub {
            HubAccess::Fixed {
                nats_url,
                monitor_host,
                monitor_port,
            } => (nats_url.clone(), monitor_host.clone(), *monitor_port),
            HubAccess::ClusterDns => {
                let host = format!("{}.{ns}.svc", names.nats(pc.spec.center_name()));
                (
                    format!("nats://{host}:{}", render::nats::CLIENT_PORT),
                    host,
                    render::nats::MONITOR_PORT,
                )
            }
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
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

async fn publish(
    ctx: &Context,
    pc: &PresenceCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &pc.object_ref(&())).await {
        tracing::warn!(error = %err, "cannot publish event");
    }
}

/// Entry point for the controller runtime.
pub async fn reconcile(pc: Arc<PresenceCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = pc.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<PresenceCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = pc.meta().deletion_timestamp.is_some();
    let result = if is_paused(&pc) && !deleting {
        paused(&pc, &api).await
    } else {
        finalizer::finalizer(&api, FINALIZER, pc.clone(), |event| async {
            match event {
                FinalizerEvent::Apply(pc) => apply(&pc, &ctx, &api, &ns).await,
                FinalizerEvent::Cleanup(pc) => cleanup(&pc, &ctx, &api, &ns).await,
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
        }
        // Say so in status too (best effort: the API may be what failed).
        Err(err) if !deleting => {
            let mut status = pc.status.clone().unwrap_or_default();
            set_condition(
                &mut status.conditions,
                &pc,
                "Degraded",
                true,
                err.reason(),
                &err.to_string(),
            );
            if let Err(status_err) = write_status(&pc, &api, status).await {
                tracing::warn!(error = %status_err, "cannot record the failure in status");
            }
        }
        Err(_) => {}
    }
    result
}

/// Requeue with exponential backoff (5 s doubling to 5 min), and tell people.
pub fn error_policy(pc: Arc<PresenceCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.with_label_values(&[err.reason()]).inc();
    let attempts = {
        let mut failures = ctx.failures();
        let n = failures.entry(key(&pc)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay =
        Duration::from_secs(5 * 2u64.pow(attempts.min(6) - 1)).min(Duration::from_secs(300));
    tracing::warn!(presencecluster = %key(&pc), error = %err, ?delay, "reconcile failed");
    let (reason, note) = (err.reason(), err.to_string());
    tokio::spawn(async move {
        publish(&ctx, &pc, EventType::Warning, reason, "Reconcile", note).await;
    });
    Action::requeue(delay)
}

async fn paused(pc: &PresenceCluster, api: &Api<PresenceCluster>) -> Result<Action, Error> {
    let mut status = pc.status.clone().unwrap_or_default();
    set_condition(
        &mut status.conditions,
        pc,
        "Progressing",
        false,
        "Paused",
        &format!(
            "reconciling is paused by the annotation {PAUSED_ANNOTATION}=\"true\"; remove it to resume"
        ),
    );
    write_status(pc, api, status).await?;
    Ok(Action::await_change())
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

/// What the secret check found.
enum SecretState {
    /// Usable; carries a digest of the secret's value (never the value).
    Ready(String),
    Problem {
        reason: &'static str,
        message: String,
    },
}

fn digest_of(secret: &Secret, key: &str) -> Option<String> {
    let bytes = match secret.data.as_ref().and_then(|d| d.get(key)) {
        Some(value) => value.0.clone(),
        None => secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(key))?
            .clone()
            .into_bytes(),
    };
    Some(render::config_hash(&bytes))
}

async fn ensure_secret(
    pc: &PresenceCluster,
    ctx: &Context,
    rctx: &render::Context,
    ns: &str,
) -> Result<SecretState, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(reference) = pc
        .spec
        .auth
        .as_ref()
        .and_then(|a| a.jwt_secret_ref.as_ref())
    {
        return Ok(match api.get_opt(&reference.name).await? {
            None => SecretState::Problem {
                reason: "SecretNotFound",
                message: format!(
                    "Secret {ns}/{} named by spec.auth.jwtSecretRef does not exist; create it with the HS256 secret under key {:?}",
                    reference.name, reference.key
                ),
            },
            Some(secret) => match digest_of(&secret, &reference.key) {
                Some(digest) => SecretState::Ready(digest),
                None => SecretState::Problem {
                    reason: "SecretKeyMissing",
                    message: format!(
                        "Secret {ns}/{} has no key {:?}",
                        reference.name, reference.key
                    ),
                },
            },
        });
    }
    let name = rctx.names.jwt_secret();
    // Created once, never updated: rotating it would invalidate every token.
    let secret = match api.get_opt(&name).await? {
        Some(existing) => existing,
        None => {
            let value = secrets::random_secret().map_err(|e| Error::Random(e.to_string()))?;
            let inputs = render::Inputs {
                generated_jwt_secret: Some(value),
                ..Default::default()
            };
            let Some(secret) = secrets::generated_jwt_secret(rctx, &pc.spec, &inputs) else {
                return Ok(SecretState::Ready(String::new()));
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    publish(
                        ctx,
                        pc,
                        EventType::Normal,
                        "SecretGenerated",
                        "CreateSecret",
                        format!("generated JWT Secret {ns}/{name}"),
                    )
                    .await;
                    secret
                }
                // Created concurrently: use what won.
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(SecretState::Ready(
        digest_of(&secret, secrets::JWT_KEY).unwrap_or_default(),
    ))
}

/// Observed readiness of one region's workloads.
#[derive(Debug, Default)]
struct Observed {
    nats_ready: i32,
    nats_wanted: i32,
    dataplane_ready: i32,
    dataplane_wanted: i32,
}

async fn apply(
    pc: &PresenceCluster,
    ctx: &Context,
    api: &Api<PresenceCluster>,
    ns: &str,
) -> Result<Action, Error> {
    let rctx = render::Context::new(pc, ns)?;
    let mut status = pc.status.clone().unwrap_or_default();
    if let Err(err) = render::check_spec(&pc.spec) {
        set_condition(
            &mut status.conditions,
            pc,
            "Degraded",
            true,
            "InvalidSpec",
            &err.to_string(),
        );
        set_condition(
            &mut status.conditions,
            pc,
            "Ready",
            false,
            "InvalidSpec",
            "fix the spec; nothing is applied while it is invalid",
        );
        set_condition(
            &mut status.conditions,
            pc,
            "Progressing",
            false,
            "InvalidSpec",
            "waiting for a valid spec",
        );
        write_status(pc, api, status).await?;
        return Ok(Action::await_change());
    }
    let digest = match ensure_secret(pc, ctx, &rctx, ns).await? {
        SecretState::Ready(digest) => digest,
        SecretState::Problem { reason, message } => {
            set_condition(
                &mut status.conditions,
                pc,
                "Degraded",
                true,
                reason,
                &message,
            );
            set_condition(&mut status.conditions, pc, "Ready", false, reason, &message);
            set_condition(
                &mut status.conditions,
                pc,
                "Progressing",
                false,
                reason,
                "waiting for the JWT Secret",
            );
            write_status(pc, api, status).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };

    let inputs = render::Inputs {
        jwt_secret_digest: Some(digest),
        ..Default::default()
    };
    let children = render::render(pc, &rctx, &inputs)?;
    let mut keep = BTreeSet::new();
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    let region_of = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(&format!("{GROUP}/region")).cloned())
            .unwrap_or_default()
    };
    for child in &children {
        keep.insert(child.id());
        let client = &ctx.client;
        match child {
            Child::Secret(_) => {} // created once by ensure_secret, never applied
            Child::ConfigMap(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::Service(o) => {
                apply_child(client, ns, o).await?;
            }
            Child::StatefulSet(o) => {
                let applied = apply_child(client, ns, o).await?;
                let entry = observed.entry(region_of(&o.metadata)).or_default();
                entry.nats_wanted = o.spec.replicas.unwrap_or(1);
                entry.nats_ready = applied.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            }
            Child::Deployment(o) => {
                let applied = apply_child(client, ns, o).await?;
                let entry = observed.entry(region_of(&o.metadata)).or_default();
                entry.dataplane_wanted = o.spec.replicas.unwrap_or(1);
                entry.dataplane_ready = applied.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            }
        }
    }

    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/managed-by={MANAGER}",
        rctx.name
    );
    let mut pruned = Vec::new();
    pruned.extend(prune::<Deployment>(&ctx.client, ns, &selector, &keep).await?);
    pruned.extend(prune::<StatefulSet>(&ctx.client, ns, &selector, &keep).await?);
    pruned.extend(prune::<Service>(&ctx.client, ns, &selector, &keep).await?);
    pruned.extend(prune::<ConfigMap>(&ctx.client, ns, &selector, &keep).await?);
    if !pruned.is_empty() {
        publish(
            ctx,
            pc,
            EventType::Normal,
            "RegionRemoved",
            "Prune",
            format!("deleted {}", pruned.join(", ")),
        )
        .await;
    }

    let center = pc.spec.center_name().to_owned();
    let hub = observed.get(&center);
    let hub_ready = hub.is_some_and(|h| h.nats_ready >= h.nats_wanted && h.nats_wanted > 0);
    let (nats_url, monitor_host, monitor_port) = ctx.hub_addresses(pc, &rctx.names, ns);

    let bucket = if hub_ready {
        let desired = DesiredBucket {
            name: pc.spec.bucket().to_owned(),
            replicas: usize::try_from(pc.spec.kv_replicas()).unwrap_or(1),
        };
        let outcome = match kv::connect(&nats_url, pc.spec.js_domain()).await {
            Ok(js) => kv::ensure_bucket(&js, &desired).await,
            Err(e) => Err(e),
        };
        match &outcome {
            Ok(BucketOutcome::Created) => {
                publish(
                    ctx,
                    pc,
                    EventType::Normal,
                    "BucketCreated",
                    "ProvisionBucket",
                    format!(
                        "created KV bucket {} with {} replicas",
                        desired.name, desired.replicas
                    ),
                )
                .await
            }
            Ok(BucketOutcome::Updated(change)) => {
                publish(
                    ctx,
                    pc,
                    EventType::Normal,
                    "BucketUpdated",
                    "ProvisionBucket",
                    format!("KV bucket {}: {change}", desired.name),
                )
                .await
            }
            _ => {}
        }
        Some(outcome.map(|_| ()).map_err(|e| e.to_string()))
    } else {
        None
    };

    let leaf_servers = if hub_ready && !pc.spec.leaves.is_empty() {
        monitor::connected_leaf_servers(&monitor_host, monitor_port).await
    } else {
        None
    };

    status.regions = pc
        .spec
        .regions()
        .iter()
        .map(|region| {
            let o = observed.get(region.name);
            let prefix = format!("{}-", rctx.names.nats(region.name));
            RegionStatus {
                name: region.name.to_owned(),
                role: region.role.as_str().to_owned(),
                nats_ready_replicas: o.map_or(0, |o| o.nats_ready),
                dataplane_ready_replicas: o.map_or(0, |o| o.dataplane_ready),
                leafnode_connected: match region.role {
                    Role::Center => None,
                    Role::Leaf => leaf_servers
                        .as_ref()
                        .map(|names| names.iter().any(|n| n.starts_with(&prefix))),
                },
            }
        })
        .collect();

    let unready: Vec<String> = pc
        .spec
        .regions()
        .iter()
        .filter_map(|region| {
            let o = observed.get(region.name)?;
            (o.nats_ready < o.nats_wanted || o.dataplane_ready < o.dataplane_wanted).then(|| {
                format!(
                    "{} (NATS {}/{}, presence-service {}/{})",
                    region.name, o.nats_ready, o.nats_wanted, o.dataplane_ready, o.dataplane_wanted
                )
            })
        })
        .collect();
    let disconnected: Vec<&str> = status
        .regions
        .iter()
        .filter(|r| r.leafnode_connected == Some(false))
        .map(|r| r.name.as_str())
        .collect();

    let (ready, reason, message) = if !hub_ready {
        (
            false,
            "HubNotReady",
            format!("waiting for the hub NATS servers of region {center} to become ready"),
        )
    } else if let Some(Err(err)) = &bucket {
        (
            false,
            "BucketUnavailable",
            format!("the KV bucket can't be provisioned: {err}"),
        )
    } else if !unready.is_empty() {
        (
            false,
            "RegionsNotReady",
            format!("not ready yet: {}", unready.join(", ")),
        )
    } else if !disconnected.is_empty() {
        (
            false,
            "LeafnodeDisconnected",
            format!(
                "leaf NATS servers not connected to the hub: {}",
                disconnected.join(", ")
            ),
        )
    } else {
        (
            true,
            "AllRegionsReady",
            format!("{} regions ready", status.regions.len()),
        )
    };
    set_condition(&mut status.conditions, pc, "Ready", ready, reason, &message);
    if ready {
        set_condition(
            &mut status.conditions,
            pc,
            "Progressing",
            false,
            "ReconcileComplete",
            "every object is applied and ready",
        );
    } else {
        set_condition(
            &mut status.conditions,
            pc,
            "Progressing",
            true,
            reason,
            &message,
        );
    }
    match &bucket {
        Some(Err(err)) => set_condition(
            &mut status.conditions,
            pc,
            "Degraded",
            true,
            "BucketUnavailable",
            err,
        ),
        _ => set_condition(
            &mut status.conditions,
            pc,
            "Degraded",
            false,
            "AsExpected",
            "no problems found",
        ),
    }
    write_status(pc, api, status).await?;
    Ok(Action::requeue(if ready {
        REQUEUE_READY
    } else {
        REQUEUE_PROGRESSING
    }))
}

async fn cleanup(
    pc: &PresenceCluster,
    ctx: &Context,
    api: &Api<PresenceCluster>,
    ns: &str,
) -> Result<Action, Error> {
    let bucket = pc.spec.bucket().to_owned();
    match pc.spec.deletion_policy() {
        DeletionPolicy::Retain => {
            publish(
                ctx,
                pc,
                EventType::Normal,
                "BucketRetained",
                "Delete",
                format!("KV bucket {bucket} and its presences are kept (deletionPolicy Retain)"),
            )
            .await;
            Ok(Action::await_change())
        }
        DeletionPolicy::Delete => {
            let rctx = render::Context::new(pc, ns)?;
            let (nats_url, _, _) = ctx.hub_addresses(pc, &rctx.names, ns);
            let result = match kv::connect(&nats_url, pc.spec.js_domain()).await {
                Ok(js) => kv::delete_bucket(&js, &bucket).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(existed) => {
                    let note = if existed {
                        format!("deleted KV bucket {bucket}")
                    } else {
                        format!("KV bucket {bucket} was already gone")
                    };
                    publish(ctx, pc, EventType::Normal, "BucketDeleted", "Delete", note).await;
                    Ok(Action::await_change())
                }
                Err(err) => {
                    let since = pc
                        .meta()
                        .deletion_timestamp
                        .as_ref()
                        .map(|t| Timestamp::now().duration_since(t.0))
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or_default();
                    if since >= DELETION_GRACE {
                        publish(ctx, pc, EventType::Warning, "BucketDeletionAbandoned", "Delete", format!("could not delete KV bucket {bucket} within {DELETION_GRACE:?} ({err}); it is left in place")).await;
                        return Ok(Action::await_change());
                    }
                    let deadline = pc
                        .meta()
                        .deletion_timestamp
                        .as_ref()
                        .and_then(|t| t.0.checked_add(DELETION_GRACE).ok())
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                    let err = Error::BucketDeletion {
                        bucket,
                        reason: err.to_string(),
                        deadline,
                    };
                    let mut status = pc.status.clone().unwrap_or_default();
                    set_condition(
                        &mut status.conditions,
                        pc,
                        "Degraded",
                        true,
                        err.reason(),
                        &err.to_string(),
                    );
                    write_status(pc, api, status).await?;
                    Err(err)
                }
            }
        }
    }
}

/// Sets a condition, keeping its transition time when its status is unchanged.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    pc: &PresenceCluster,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let generation = pc.meta().generation;
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(i) if conditions[i].status == status => conditions[i].last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Writes status with a merge patch, only when it changed.
async fn write_status(
    pc: &PresenceCluster,
    api: &Api<PresenceCluster>,
    mut status: PresenceClusterStatus,
) -> Result<(), Error> {
    status.observed_generation = pc.meta().generation;
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

#[cfg(test)]
mod tests {
    //! Controller scenarios against the mocked API server; the hub's KV
    //! bucket and leafnode state come from real nats-server processes.

    use super::*;
    use crate::fixtures::{FakeApi, Recorded};
    use serde_json::{Value, json};

    const NS: &str = "ns";

    fn pc_path(name: &str) -> String {
        format!("/apis/presencecluster.io/v1alpha1/namespaces/{NS}/presenceclusters/{name}")
    }

    fn child_path(child: &Child) -> String {
        let name = child.metadata().name.clone().unwrap_or_default();
        match child {
            Child::ConfigMap(_) => format!("/api/v1/namespaces/{NS}/configmaps/{name}"),
            Child::Service(_) => format!("/api/v1/namespaces/{NS}/services/{name}"),
            Child::Secret(_) => format!("/api/v1/namespaces/{NS}/secrets/{name}"),
            Child::StatefulSet(_) => format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"),
            Child::Deployment(_) => format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}"),
        }
    }

    fn cluster(spec: Value) -> Value {
        json!({"apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
               "metadata": {"name": "p", "namespace": NS, "uid": "uid-p", "generation": 1},
               "spec": spec})
    }

    fn unreachable() -> HubAccess {
        HubAccess::Fixed {
            nats_url: "nats://127.0.0.1:1".into(),
            monitor_host: "127.0.0.1".into(),
            monitor_port: 1,
        }
    }

    fn real(hub: &testkit::Nats) -> HubAccess {
        HubAccess::Fixed {
            nats_url: hub.url(),
            monitor_host: "127.0.0.1".into(),
            monitor_port: hub.monitor_port,
        }
    }

    fn context(fake: &FakeApi, hub: HubAccess) -> Arc<Context> {
        Arc::new(Context::new(
            fake.client(),
            "test",
            Metrics::new().unwrap(),
            hub,
        ))
    }

    fn load(fake: &FakeApi) -> Arc<PresenceCluster> {
        Arc::new(
            serde_json::from_value(fake.get(&pc_path("p")).expect("stored"))
                .expect("a PresenceCluster"),
        )
    }

    /// Reconciles the stored object once (first adding the finalizer if needed).
    async fn reconcile_stored(fake: &FakeApi, ctx: &Arc<Context>) -> Result<Action, Error> {
        if !load(fake).finalizers().iter().any(|f| f == FINALIZER) {
            reconcile(load(fake), ctx.clone()).await?;
        }
        reconcile(load(fake), ctx.clone()).await
    }

    fn status(fake: &FakeApi) -> PresenceClusterStatus {
        serde_json::from_value(fake.get(&pc_path("p")).unwrap()["status"].clone()).unwrap()
    }

    fn find_condition<'a>(status: &'a PresenceClusterStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect(type_)
    }

    fn condition(status: &PresenceClusterStatus, type_: &str) -> (String, String) {
        let c = find_condition(status, type_);
        (c.status.clone(), c.reason.clone())
    }

    fn applies(requests: &[Recorded]) -> Vec<&Recorded> {
        requests
            .iter()
            .filter(|r| {
                r.method == "PATCH" && r.content_type.starts_with("application/apply-patch")
            })
            .collect()
    }

    /// What the controller should have applied: the rendered objects, with
    /// the digest of the JWT secret the fake holds.
    fn rendered(fake: &FakeApi) -> Vec<Child> {
        let pc = load(fake);
        let rctx = render::Context::new(&pc, NS).unwrap();
        let secret: Secret = serde_json::from_value(
            fake.get(&format!(
                "/api/v1/namespaces/{NS}/secrets/{}",
                rctx.names.jwt_secret()
            ))
            .expect("generated secret"),
        )
        .unwrap();
        let inputs = render::Inputs {
            jwt_secret_digest: digest_of(&secret, secrets::JWT_KEY),
            ..Default::default()
        };
        render::render(&pc, &rctx, &inputs).unwrap()
    }

    #[tokio::test]
    async fn a_fresh_cluster_gets_a_finalizer_then_every_object() {
        let fake = FakeApi::default();
        fake.insert(
            &pc_path("p"),
            cluster(json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "us"}]})),
        );
        let ctx = context(&fake, unreachable());

        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let first = fake.requests_without_events();
        assert_eq!(first.len(), 1, "{first:#?}");
        assert_eq!(
            (first[0].method.as_str(), first[0].path.as_str()),
            ("PATCH", pc_path("p").as_str())
        );
        assert!(first[0].content_type.starts_with("application/json-patch"));
        assert_eq!(
            first[0].body[1],
            json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
        );

        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let requests = fake.requests_without_events();
        let calls: Vec<(String, String)> = requests
            .iter()
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect();
        let secret = format!("/api/v1/namespaces/{NS}/secrets/p-jwt");
        let mut expected = vec![
            ("GET".to_owned(), secret.clone()),
            (
                "POST".to_owned(),
                format!("/api/v1/namespaces/{NS}/secrets"),
            ),
        ];
        let children: Vec<Child> = rendered(&fake)
            .into_iter()
            .filter(|c| !matches!(c, Child::Secret(_)))
            .collect();
        expected.extend(children.iter().map(|c| ("PATCH".to_owned(), child_path(c))));
        for kind in [
            "apis/apps/v1/namespaces/ns/deployments",
            "apis/apps/v1/namespaces/ns/statefulsets",
            "api/v1/namespaces/ns/services",
            "api/v1/namespaces/ns/configmaps",
        ] {
            expected.push(("GET".to_owned(), format!("/{kind}")));
        }
        expected.push(("PATCH".to_owned(), format!("{}/status", pc_path("p"))));
        assert_eq!(calls, expected);

        // The generated secret: 64 hex characters, owned by the cluster.
        let created = &requests[1].body;
        let value = created["stringData"]["jwt-secret"].as_str().unwrap();
        assert_eq!(value.len(), 64);
        assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "uid-p");
        // Every apply is server-side apply with our field manager, forced, and
        // carries exactly the rendered object.
        for (request, child) in applies(&requests).into_iter().zip(&children) {
            let params: BTreeSet<&str> =
                request.query.split('&').filter(|p| !p.is_empty()).collect();
            assert_eq!(
                params,
                BTreeSet::from(["fieldManager=presence-operator", "force=true"])
            );
            assert_eq!(
                request.body,
                serde_json::to_value(child).unwrap(),
                "{}",
                child.id()
            );
        }
        let list = requests
            .iter()
            .find(|r| r.method == "GET" && r.path.ends_with("/deployments"))
            .unwrap();
        assert!(
            list.query
                .contains("labelSelector=app.kubernetes.io%2Finstance%3Dp"),
            "{}",
            list.query
        );

        let s = status(&fake);
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(
            condition(&s, "Ready"),
            ("False".into(), "HubNotReady".into())
        );
        assert_eq!(
            condition(&s, "Progressing"),
            ("True".into(), "HubNotReady".into())
        );
        assert_eq!(
            condition(&s, "Degraded"),
            ("False".into(), "AsExpected".into())
        );
        let names: Vec<&str> = s.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["center", "eu", "us"]);

        // A second reconcile finds the Secret and never writes it again.
        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let again = fake.requests_without_events();
        assert!(
            again
                .iter()
                .all(|r| !r.path.contains("/secrets") || r.method == "GET"),
            "{again:#?}"
        );
        assert_eq!(
            fake.get(&secret).unwrap()["stringData"]["jwt-secret"],
            value
        );
        // Nothing changed, so status is not written again.
        assert!(
            !again.iter().any(|r| r.path.ends_with("/status")),
            "{again:#?}"
        );
    }

    #[tokio::test]
    async fn status_follows_readiness_and_the_bucket_is_provisioned_at_the_real_hub() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testkit::Nats::hub(dir.path()).await;
        // A real leaf whose server name is what the StatefulSet's pod would have.
        let _leaf = testkit::Nats::named_leaf(dir.path(), "eu", "p-eu-nats-0", &hub, None).await;
        let fake = FakeApi::default();
        fake.insert(
            &pc_path("p"),
            cluster(
                json!({"center": {}, "leaves": [{"name": "eu"}], "dataplane": {"replicas": 2}}),
            ),
        );
        let ctx = context(&fake, real(&hub));
        let sts = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{n}");
        let dep = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/deployments/{n}");
        fake.set_status(&sts("p-center-nats"), json!({"readyReplicas": 1}));
        fake.set_status(&sts("p-eu-nats"), json!({"readyReplicas": 1}));
        fake.set_status(&dep("p-center-presence"), json!({"readyReplicas": 2}));
        fake.set_status(&dep("p-eu-presence"), json!({"readyReplicas": 1}));

        reconcile_stored(&fake, &ctx).await.unwrap();
        let s = status(&fake);
        assert_eq!(
            condition(&s, "Ready"),
            ("False".into(), "RegionsNotReady".into())
        );
        let ready = find_condition(&s, "Ready");
        assert!(
            ready
                .message
                .contains("eu (NATS 1/1, presence-service 1/2)"),
            "{}",
            ready.message
        );
        let eu = &s.regions[1];
        assert_eq!(
            (
                eu.nats_ready_replicas,
                eu.dataplane_ready_replicas,
                eu.leafnode_connected
            ),
            (1, 1, Some(true))
        );

        // The bucket now exists at the hub, as the spec says.
        let js = kv::connect(&hub.url(), "hub").await.unwrap();
        let stream = js.get_stream("KV_PRESENCE").await.expect("bucket created");
        assert_eq!(stream.cached_info().config.num_replicas, 1);
        assert!(stream.cached_info().config.allow_message_ttl);

        fake.set_status(&dep("p-eu-presence"), json!({"readyReplicas": 2}));
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let s = status(&fake);
        assert_eq!(
            condition(&s, "Ready"),
            ("True".into(), "AllRegionsReady".into())
        );
        assert_eq!(
            condition(&s, "Progressing"),
            ("False".into(), "ReconcileComplete".into())
        );
        assert_eq!(
            condition(&s, "Degraded"),
            ("False".into(), "AsExpected".into())
        );
    }

    #[tokio::test]
    async fn a_spec_change_rolls_only_the_affected_workloads() {
        let fake = FakeApi::default();
        fake.insert(
            &pc_path("p"),
            cluster(json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "us"}]})),
        );
        let ctx = context(&fake, unreachable());
        reconcile_stored(&fake, &ctx).await.unwrap();
        let templates = |requests: &[Recorded]| -> BTreeMap<String, Value> {
            applies(requests)
                .into_iter()
                .filter(|r| r.path.contains("/statefulsets/") || r.path.contains("/deployments/"))
                .map(|r| (r.path.clone(), r.body["spec"]["template"].clone()))
                .collect()
        };
        let before = templates(&fake.requests());

        let mut changed = fake.get(&pc_path("p")).unwrap();
        changed["metadata"]["generation"] = json!(2);
        changed["spec"]["center"]["replicas"] = json!(3);
        changed["spec"]["leaves"][0]["dataplane"] = json!({"cacheMaxCost": 1048576});
        fake.insert(&pc_path("p"), changed);
        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let after = templates(&fake.requests());
        let changed: Vec<&str> = before
            .iter()
            .filter(|(path, template)| after.get(*path) != Some(template))
            .map(|(path, _)| path.rsplit('/').next().unwrap_or_default())
            .collect();
        // The hub's routes changed (center NATS), the center's bucket replicas
        // (center presence-service) and eu's cache size; us is untouched.
        assert_eq!(
            changed,
            ["p-center-presence", "p-eu-presence", "p-center-nats"]
        );
        assert_eq!(status(&fake).observed_generation, Some(2));
    }

    #[tokio::test]
    async fn removing_a_leaf_deletes_its_objects() {
        let fake = FakeApi::default();
        fake.insert(
            &pc_path("p"),
            cluster(json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "us"}]})),
        );
        let ctx = context(&fake, unreachable());
        reconcile_stored(&fake, &ctx).await.unwrap();
        let mut shrunk = fake.get(&pc_path("p")).unwrap();
        shrunk["spec"]["leaves"] = json!([{"name": "eu"}]);
        fake.insert(&pc_path("p"), shrunk);
        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let mut deleted: Vec<String> = fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "DELETE")
            .map(|r| r.path)
            .collect();
        deleted.sort();
        assert_eq!(
            deleted,
            [
                "/api/v1/namespaces/ns/configmaps/p-us-nats-config",
                "/api/v1/namespaces/ns/services/p-us-nats",
                "/api/v1/namespaces/ns/services/p-us-nats-headless",
                "/api/v1/namespaces/ns/services/p-us-presence",
                "/apis/apps/v1/namespaces/ns/deployments/p-us-presence",
                "/apis/apps/v1/namespaces/ns/statefulsets/p-us-nats",
            ]
        );
        assert!(
            fake.get("/apis/apps/v1/namespaces/ns/statefulsets/p-eu-nats")
                .is_some()
        );
        assert!(
            fake.get("/api/v1/namespaces/ns/secrets/p-jwt").is_some(),
            "secrets are never pruned"
        );
    }

    #[tokio::test]
    async fn a_missing_referenced_secret_degrades_and_applies_nothing() {
        let fake = FakeApi::default();
        fake.insert(
            &pc_path("p"),
            cluster(json!({"center": {}, "auth": {"jwtSecretRef": {"name": "mine", "key": "k"}}})),
        );
        let ctx = context(&fake, unreachable());
        reconcile_stored(&fake, &ctx).await.unwrap();
        let requests = fake.requests_without_events();
        assert!(applies(&requests).is_empty(), "{requests:#?}");
        assert!(
            !requests
                .iter()
                .any(|r| r.method == "POST" && r.path.contains("/secrets")),
            "a referenced Secret is never written"
        );
        let s = status(&fake);
        assert_eq!(
            condition(&s, "Degraded"),
            ("True".into(), "SecretNotFound".into())
        );
        assert_eq!(
            condition(&s, "Ready"),
            ("False".into(), "SecretNotFound".into())
        );
        let message = &find_condition(&s, "Degraded").message;
        assert!(
            message.contains("ns/mine") && message.contains("\"k\""),
            "{message}"
        );

        fake.insert("/api/v1/namespaces/ns/secrets/mine", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": NS}, "data": {"k": "c2VjcmV0"}}));
        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        assert!(!applies(&fake.requests()).is_empty());
        assert_eq!(
            condition(&status(&fake), "Degraded"),
            ("False".into(), "AsExpected".into())
        );
        let deployment = fake
            .get("/apis/apps/v1/namespaces/ns/deployments/p-center-presence")
            .unwrap();
        let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .clone();
        let jwt = env.iter().find(|e| e["name"] == "JWT_SECRET").unwrap();
        assert_eq!(jwt["valueFrom"]["secretKeyRef"]["name"], "mine");

        // Rotating the referenced secret rolls the presence-service pods
        // (their config-hash changes) and nothing else.
        let hashes = |fake: &FakeApi| -> BTreeMap<String, Value> {
            applies(&fake.requests())
                .into_iter()
                .map(|r| {
                    (
                        r.path.clone(),
                        r.body["spec"]["template"]["metadata"]["annotations"].clone(),
                    )
                })
                .filter(|(_, a)| !a.is_null())
                .collect()
        };
        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let before = hashes(&fake);
        fake.insert("/api/v1/namespaces/ns/secrets/mine", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": NS}, "data": {"k": "cm90YXRlZA=="}}));
        fake.clear_requests();
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let after = hashes(&fake);
        let rolled: Vec<&str> = before
            .iter()
            .filter(|(path, hash)| after.get(*path) != Some(hash))
            .map(|(path, _)| path.rsplit('/').next().unwrap_or_default())
            .collect();
        assert_eq!(rolled, ["p-center-presence"]);
    }

    #[tokio::test]
    async fn an_api_error_shows_in_status_and_is_retried() {
        let fake = FakeApi::default();
        fake.insert(&pc_path("p"), cluster(json!({"center": {}})));
        let ctx = context(&fake, unreachable());
        fake.fail(
            "PATCH",
            "/apis/apps/v1/namespaces/ns/statefulsets/p-center-nats",
            500,
        );
        let err = reconcile_stored(&fake, &ctx).await.unwrap_err();
        assert_eq!(err.reason(), "KubernetesApiError");
        let s = status(&fake);
        assert_eq!(
            condition(&s, "Degraded"),
            ("True".into(), "KubernetesApiError".into())
        );
        let message = &find_condition(&s, "Degraded").message;
        assert!(message.contains("injected failure"), "{message}");
        assert_eq!(
            error_policy(load(&fake), &err, ctx.clone()),
            Action::requeue(Duration::from_secs(5))
        );
    }

    fn deleting(policy: &str, since_secs: i64) -> Value {
        let when = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(since_secs);
        let mut pc = cluster(json!({"center": {}, "kv": {"deletionPolicy": policy}}));
        pc["metadata"]["finalizers"] = json!([FINALIZER]);
        pc["metadata"]["deletionTimestamp"] = json!(when.to_string());
        pc
    }

    fn finalizer_removed(fake: &FakeApi) -> bool {
        fake.get(&pc_path("p")).unwrap()["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.is_empty())
    }

    #[tokio::test]
    async fn deletion_retains_or_deletes_the_bucket_and_never_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testkit::Nats::hub(dir.path()).await;
        let js = kv::connect(&hub.url(), "hub").await.unwrap();
        let bucket = DesiredBucket {
            name: "PRESENCE".into(),
            replicas: 1,
        };

        // Retain (the default): the bucket and its data stay.
        kv::ensure_bucket(&js, &bucket).await.unwrap();
        let fake = FakeApi::default();
        fake.insert(&pc_path("p"), deleting("Retain", 0));
        reconcile(load(&fake), context(&fake, real(&hub)))
            .await
            .unwrap();
        assert!(finalizer_removed(&fake));
        assert!(
            js.get_stream("KV_PRESENCE").await.is_ok(),
            "Retain keeps the bucket"
        );

        // Delete: the bucket goes, then the finalizer.
        let fake = FakeApi::default();
        fake.insert(&pc_path("p"), deleting("Delete", 0));
        reconcile(load(&fake), context(&fake, real(&hub)))
            .await
            .unwrap();
        assert!(finalizer_removed(&fake));
        assert!(
            js.get_stream("KV_PRESENCE").await.is_err(),
            "Delete removes the bucket"
        );

        // Delete with the hub unreachable: retried and reported...
        let fake = FakeApi::default();
        fake.insert(&pc_path("p"), deleting("Delete", 0));
        let err = reconcile(load(&fake), context(&fake, unreachable()))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "BucketDeletionFailed");
        assert!(!finalizer_removed(&fake));
        assert_eq!(
            condition(&status(&fake), "Degraded"),
            ("True".into(), "BucketDeletionFailed".into())
        );
        // ...but only for a bounded time.
        let fake = FakeApi::default();
        fake.insert(
            &pc_path("p"),
            deleting("Delete", DELETION_GRACE.as_secs() as i64 + 1),
        );
        reconcile(load(&fake), context(&fake, unreachable()))
            .await
            .unwrap();
        assert!(finalizer_removed(&fake));
    }

    #[tokio::test]
    async fn a_paused_cluster_is_left_alone() {
        let fake = FakeApi::default();
        let mut pc = cluster(json!({"center": {}}));
        pc["metadata"]["annotations"] = json!({PAUSED_ANNOTATION: "true"});
        fake.insert(&pc_path("p"), pc);
        let ctx = context(&fake, unreachable());
        reconcile(load(&fake), ctx.clone()).await.unwrap();
        let requests = fake.requests_without_events();
        let calls: Vec<(&str, &str)> = requests
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str()))
            .collect();
        let status_path = format!("{}/status", pc_path("p"));
        assert_eq!(calls, [("PATCH", status_path.as_str())]);
        assert_eq!(
            condition(&status(&fake), "Progressing"),
            ("False".into(), "Paused".into())
        );
    }

    #[tokio::test]
    async fn errors_back_off_exponentially_and_are_reported_as_events() {
        let fake = FakeApi::default();
        fake.insert(&pc_path("p"), cluster(json!({"center": {}})));
        let ctx = context(&fake, unreachable());
        let pc = load(&fake);
        let err = Error::Random("no entropy".into());
        let delays: Vec<Action> = (0..8)
            .map(|_| error_policy(pc.clone(), &err, ctx.clone()))
            .collect();
        assert_eq!(delays[0], Action::requeue(Duration::from_secs(5)));
        assert_eq!(delays[1], Action::requeue(Duration::from_secs(10)));
        assert_eq!(delays[7], Action::requeue(Duration::from_secs(160)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let events: Vec<Recorded> = fake
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/events"))
            .collect();
        assert!(!events.is_empty());
        assert_eq!(events[0].body["reason"], "SecretGenerationFailed");
        assert_eq!(events[0].body["type"], "Warning");
    }
}
