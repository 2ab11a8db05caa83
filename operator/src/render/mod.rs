//! PresenceCluster -> desired objects. Pure and deterministic: the same CR
//! always renders the same objects, byte for byte, so they can be golden
//! tested, diffed in review, and applied idempotently.

pub mod advice;
pub mod availability;
pub mod clusters;

pub mod dataplane;
pub mod monitoring;
pub mod nats;
pub mod nats_auth;
pub mod network;
pub mod placement;
pub mod quantity;
pub mod secrets;

pub use clusters::{is_here, needed_leaves};

use crate::crd::{GROUP, PresenceCluster, PresenceClusterSpec, PullPolicy};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, PodAffinityTerm, PodAntiAffinity, Secret, SecurityContext,
    Service, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use presence_contract::{env, rules};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Field manager and `managed-by` label value.
pub const MANAGER: &str = "presence-operator";

/// Why a PresenceCluster can't be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("the PresenceCluster has no metadata.name")]
    MissingName,
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("the NATS identities (public nkeys) of {0} are unknown")]
    MissingIdentities(String),
}

/// The public halves of the NATS identities, read from their Secrets (or
/// generated for an offline render): what the rendered configs name. The
/// digests change when a Secret is rotated, rolling the pods that use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsIdentities {
    /// presence-service's public nkey.
    pub presence: String,
    /// The operator's public nkey.
    pub operator: String,
    /// Each leaf region's public nkey.
    pub leaves: BTreeMap<String, String>,
    /// Digests of the Secrets' contents, by Secret name.
    pub digests: BTreeMap<String, String>,
}

impl NatsIdentities {
    /// The digest of Secret `name`, or "" when unknown.
    pub fn digest(&self, name: &str) -> &str {
        self.digests.get(name).map_or("", String::as_str)
    }
}

/// Names of every child object; the one place that builds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    cluster: String,
}

impl Names {
    /// Names for the PresenceCluster called `cluster`.
    pub fn new(cluster: &str) -> Self {
        Names {
            cluster: cluster.to_owned(),
        }
    }
    /// What every object of `region` is named after: `<cluster>-<region>`.
    /// The cluster's own objects end in suffixes no region's object ends
    /// in, so two PresenceClusters in one namespace render an object of
    /// the same kind and name only when two of their regions share this
    /// prefix (`a` with region `b-eu` and `a-b` with region `eu`).
    pub fn region_prefix(&self, region: &str) -> String {
        format!("{}-{region}", self.cluster)
    }
    /// StatefulSet and client Service of a region's NATS.
    pub fn nats(&self, region: &str) -> String {
        format!("{}-nats", self.region_prefix(region))
    }
    /// Headless Service of a region's NATS (stable pod DNS names for routes).
    pub fn nats_headless(&self, region: &str) -> String {
        format!("{}-nats-headless", self.region_prefix(region))
    }
    /// The hub's leafnode Service, which leaves in other clusters dial.
    pub fn nats_leafnodes(&self, region: &str) -> String {
        format!("{}-nats-leafnodes", self.region_prefix(region))
    }
    /// ConfigMap holding a region's `nats.conf`.
    pub fn nats_config(&self, region: &str) -> String {
        format!("{}-nats-config", self.region_prefix(region))
    }
    /// Deployment and Service of a region's presence-service.
    pub fn dataplane(&self, region: &str) -> String {
        format!("{}-presence", self.region_prefix(region))
    }
    /// The generated JWT Secret.
    pub fn jwt_secret(&self) -> String {
        format!("{}-jwt", self.cluster)
    }
    /// presence-service's NATS nkey seed.
    pub fn nats_presence_secret(&self) -> String {
        format!("{}-nats-presence", self.cluster)
    }
    /// The operator's NATS nkey seed.
    pub fn nats_operator_secret(&self) -> String {
        format!("{}-nats-operator", self.cluster)
    }
    /// A leaf region's NATS nkey seed (when the spec references none).
    pub fn nats_leaf_secret(&self, region: &str) -> String {
        format!("{}-nats-leaf", self.region_prefix(region))
    }
    /// The password of every route.
    pub fn nats_routes_secret(&self) -> String {
        format!("{}-nats-routes", self.cluster)
    }
    /// The NATS servers' certificate (`tls.crt`, `tls.key`, `ca.crt`).
    pub fn nats_tls_secret(&self) -> String {
        format!("{}-nats-tls", self.cluster)
    }
    /// The generated CA (`ca.crt`, `ca.key`); only the operator reads it.
    pub fn nats_ca_secret(&self) -> String {
        format!("{}-nats-ca", self.cluster)
    }
}

/// What every child shares: the owner, where it lives, how it is named.
#[derive(Debug, Clone)]
pub struct Scope {
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
    pub names: Names,
}

impl Scope {
    /// Builds the context of `cluster`; `default_namespace` applies when the
    /// object has none (e.g. a manifest rendered offline).
    pub fn new(cluster: &PresenceCluster, default_namespace: &str) -> Result<Self, RenderError> {
        let name = cluster
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(RenderError::MissingName)?;
        let namespace = cluster
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_owned());
        let owner = OwnerReference {
            api_version: format!("{GROUP}/v1alpha1"),
            kind: "PresenceCluster".into(),
            name: name.clone(),
            // Offline renders have no UID; the controller always has one.
            uid: cluster.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(Scope {
            names: Names::new(&name),
            name,
            namespace,
            owner,
        })
    }
}

/// The labels of every child: the standard `app.kubernetes.io` set plus the
/// region. Never copied from the CR's own labels.
pub fn labels(ctx: &Scope, component: &str, region: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    let app = if component == "dataplane" {
        "presence-service"
    } else {
        component
    };
    l.insert("app.kubernetes.io/name".into(), app.into());
    l.insert("app.kubernetes.io/instance".into(), ctx.name.clone());
    l.insert("app.kubernetes.io/component".into(), component.into());
    l.insert("app.kubernetes.io/part-of".into(), "presencecluster".into());
    l.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    if let Some(region) = region {
        l.insert(format!("{GROUP}/region"), region.into());
    }
    l
}

/// Selector of a region's pods of one component (a stable subset of labels).
pub fn region_selector(ctx: &Scope, component: &str, region: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), ctx.name.clone()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (format!("{GROUP}/region"), region.to_owned()),
    ])
}

/// Metadata of a child object.
pub fn meta(ctx: &Scope, name: &str, component: &str, region: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ctx.namespace.clone()),
        labels: Some(labels(ctx, component, region)),
        owner_references: Some(vec![ctx.owner.clone()]),
        ..Default::default()
    }
}

fn pod_meta(
    ctx: &Scope,
    component: &str,
    region: &str,
    annotations: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        labels: Some(labels(ctx, component, Some(region))),
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..Default::default()
    }
}

/// Short content hash for the config-hash annotation that rolls pods when
/// their configuration changes.
pub fn config_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Every container's security context: no privilege escalation, a
/// read-only root filesystem, no capabilities.
fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pull_policy(spec: &PresenceClusterSpec) -> Option<String> {
    let policy = spec
        .images
        .as_ref()
        .and_then(|i| i.pull_policy)
        .unwrap_or(PullPolicy::IfNotPresent);
    Some(
        match policy {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
        .into(),
    )
}

/// Prefer spreading a region's replicas across nodes.
fn spread_affinity(ctx: &Scope, component: &str, region: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(region_selector(ctx, component, region)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One object the operator manages.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Child {
    ConfigMap(ConfigMap),
    Service(Service),
    StatefulSet(StatefulSet),
    Deployment(Deployment),
    Secret(Secret),
    PodDisruptionBudget(PodDisruptionBudget),
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
    /// A Prometheus Operator PodMonitor (not a built-in kind).
    PodMonitor(kube::api::DynamicObject),
    NetworkPolicy(k8s_openapi::api::networking::v1::NetworkPolicy),
}

impl Child {
    /// `Kind/name`, for logs and tests.
    pub fn id(&self) -> String {
        let (kind, meta) = match self {
            Child::ConfigMap(o) => ("ConfigMap", &o.metadata),
            Child::Service(o) => ("Service", &o.metadata),
            Child::StatefulSet(o) => ("StatefulSet", &o.metadata),
            Child::Deployment(o) => ("Deployment", &o.metadata),
            Child::Secret(o) => ("Secret", &o.metadata),
            Child::PodDisruptionBudget(o) => ("PodDisruptionBudget", &o.metadata),
            Child::HorizontalPodAutoscaler(o) => ("HorizontalPodAutoscaler", &o.metadata),
            Child::PodMonitor(o) => ("PodMonitor", &o.metadata),
            Child::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata),
        };
        format!("{kind}/{}", meta.name.as_deref().unwrap_or_default())
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Child::ConfigMap(o) => &o.metadata,
            Child::Service(o) => &o.metadata,
            Child::StatefulSet(o) => &o.metadata,
            Child::Deployment(o) => &o.metadata,
            Child::Secret(o) => &o.metadata,
            Child::PodDisruptionBudget(o) => &o.metadata,
            Child::HorizontalPodAutoscaler(o) => &o.metadata,
            Child::PodMonitor(o) => &o.metadata,
            Child::NetworkPolicy(o) => &o.metadata,
        }
    }
}

/// Input besides the CR itself.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Value for the generated JWT Secret (only used when the CR references
    /// none). The controller creates that Secret once and never updates it.
    pub generated_jwt_secret: Option<String>,
    /// A digest of the JWT secret's current value (never the value itself),
    /// so that rotating the Secret rolls the presence-service pods.
    pub jwt_secret_digest: Option<String>,
    /// The size the hub's volume claim template was created with: a
    /// StatefulSet's template can't change, so it is kept (volumes are
    /// grown one by one instead). `None` before the hub exists.
    pub hub_volume_size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// The smallest capacity a hub volume reports: JetStream's storage
    /// limit never exceeds what the disks really hold (a volume whose
    /// expansion hasn't finished or was refused). `None` when unknown.
    pub hub_volume_capacity: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// The operator's namespace, whose pods the NetworkPolicies admit to
    /// NATS (default presence-system, where the install puts it).
    pub operator_namespace: Option<String>,
    /// The NATS identities' public keys; required to render NATS configs.
    pub nats: Option<NatsIdentities>,
    /// The Kubernetes cluster being rendered for: only its regions are
    /// rendered. `None` renders every region (one cluster for all).
    pub cluster: Option<String>,
}

/// Checks what the API server's CEL rules would refuse, for manifests that
/// never went through an API server (`render`, `dev`).
pub fn check_spec(spec: &PresenceClusterSpec) -> Result<(), RenderError> {
    let invalid = |m: String| Err(RenderError::InvalidSpec(m));
    let is_label = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    let center = spec.center_name();
    if !is_label(center, crate::crd::MAX_REGION_NAME) {
        return invalid(format!(
            "center name {center:?} must be a lowercase DNS label of at most 16 characters"
        ));
    }
    if spec.leaves.len() > crate::crd::MAX_LEAVES {
        return invalid(format!(
            "at most {} leaves are allowed",
            crate::crd::MAX_LEAVES
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for leaf in &spec.leaves {
        if !is_label(&leaf.name, crate::crd::MAX_REGION_NAME) {
            return invalid(format!(
                "leaf name {:?} must be a lowercase DNS label of at most 16 characters",
                leaf.name
            ));
        }
        if leaf.name == center {
            return invalid(format!("leaf {:?} has the center's name", leaf.name));
        }
        if !seen.insert(&leaf.name) {
            return invalid(format!("leaf name {:?} appears twice", leaf.name));
        }
    }
    if ![1, 3, 5].contains(&spec.center_replicas()) {
        return invalid("center.replicas must be 1, 3 or 5".into());
    }
    for region in spec.regions() {
        if !(1..=5).contains(&region.nats_replicas) {
            return invalid(format!(
                "leaf {:?}: nats.replicas must be between 1 and 5",
                region.name
            ));
        }
    }
    let autoscaling = std::iter::once(spec.dataplane.as_ref().and_then(|d| d.autoscaling.as_ref()))
        .chain(
            spec.leaves
                .iter()
                .map(|l| l.dataplane.as_ref().and_then(|d| d.autoscaling.as_ref())),
        )
        .chain(std::iter::once(
            spec.center
                .dataplane
                .as_ref()
                .and_then(|d| d.autoscaling.as_ref()),
        ));
    for a in autoscaling.flatten() {
        if a.min_replicas.is_some_and(|min| min > a.max_replicas) {
            return invalid("autoscaling.minReplicas cannot exceed autoscaling.maxReplicas".into());
        }
    }
    let kv = spec.kv_replicas();
    if ![1, 3, 5].contains(&kv) || kv > spec.center_replicas() {
        return invalid("kv.replicas must be 1, 3 or 5 and at most center.replicas".into());
    }
    check_cors(spec)?;
    check_source_ranges(spec)?;
    quantity::check_quantities(spec)?;
    clusters::check_multi_cluster(spec)
}

/// Refuses a `center.leafnodes.sourceRanges` entry that isn't a CIDR
/// (`203.0.113.0/24`, `2001:db8::/32`): the Service carrying it would be
/// refused, or a cloud load balancer would ignore it.
fn check_source_ranges(spec: &PresenceClusterSpec) -> Result<(), RenderError> {
    let ranges = spec
        .center
        .leafnodes
        .as_ref()
        .and_then(|l| l.source_ranges.as_ref());
    for range in ranges.into_iter().flatten() {
        let cidr = range.split_once('/').and_then(|(address, bits)| {
            let address: std::net::IpAddr = address.parse().ok()?;
            let bits: u8 = bits.parse().ok()?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            (bits <= max).then_some(())
        });
        if cidr.is_none() {
            return Err(RenderError::InvalidSpec(format!(
                "center.leafnodes.sourceRanges: {range:?} is not a CIDR like 203.0.113.0/24"
            )));
        }
    }
    Ok(())
}

/// Refuses a CORS policy that presence-service would refuse at start (its
/// own rules, from the contract), which would otherwise pass `kubectl
/// apply` and leave every region's pods crashing.
fn check_cors(spec: &PresenceClusterSpec) -> Result<(), RenderError> {
    let Some(cors) = spec.dataplane.as_ref().and_then(|d| d.cors.as_ref()) else {
        return Ok(());
    };
    if cors.enabled == Some(false) {
        return Ok(());
    }
    // What the service reads: the variable as rendered, split again,
    // items trimmed and empty ones dropped.
    let read = |list: &Option<Vec<String>>, default: &str| {
        dataplane::env_list(list).unwrap_or_else(|| default.to_owned())
    };
    let origins = read(&cors.allowed_origins, rules::DEFAULT_CORS_ORIGINS);
    let methods = read(&cors.allowed_methods, rules::DEFAULT_CORS_METHODS);
    let headers = read(&cors.allowed_headers, rules::DEFAULT_CORS_HEADERS);
    let problem = rules::cors_problem(
        &rules::split_list(&origins),
        &rules::split_list(&methods),
        &rules::split_list(&headers),
        cors.allow_credentials.unwrap_or(false),
    );
    match problem {
        None => Ok(()),
        Some((variable, problem)) => {
            let field = match variable {
                env::CORS_ALLOWED_METHODS => "allowedMethods",
                env::CORS_ALLOWED_HEADERS => "allowedHeaders",
                _ => "allowedOrigins",
            };
            Err(RenderError::InvalidSpec(format!(
                "dataplane.cors.{field}: {problem}"
            )))
        }
    }
}

/// A container's resources: the spec's, or else these requests (no
/// limits), so that a manifest that names none still gets Burstable pods,
/// which the kubelet evicts after BestEffort ones under node pressure, and
/// CPU requests an autoscaler can measure utilization against.
pub fn resources_or(
    given: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    (cpu, memory): (&str, &str),
) -> k8s_openapi::api::core::v1::ResourceRequirements {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    given
        .cloned()
        .unwrap_or_else(|| k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_owned(), Quantity(cpu.to_owned())),
                    ("memory".to_owned(), Quantity(memory.to_owned())),
                ]
                .into(),
            ),
            ..Default::default()
        })
}

/// Every object of `cluster`, in apply order (config and secrets first).
pub fn render(
    cluster: &PresenceCluster,
    ctx: &Scope,
    inputs: &Inputs,
) -> Result<Vec<Child>, RenderError> {
    let spec = &cluster.spec;
    check_spec(spec)?;
    if ctx.name.len() > crate::crd::MAX_CLUSTER_NAME {
        return Err(RenderError::InvalidSpec(format!(
            "metadata.name {:?} is longer than {} characters",
            ctx.name,
            crate::crd::MAX_CLUSTER_NAME
        )));
    }
    let ids = inputs
        .nats
        .as_ref()
        .ok_or_else(|| RenderError::MissingIdentities(ctx.name.clone()))?;
    let here = inputs.cluster.as_deref();
    for leaf in needed_leaves(spec, here) {
        if !ids.leaves.contains_key(&leaf) {
            return Err(RenderError::MissingIdentities(format!(
                "{}, leaf {leaf}",
                ctx.name
            )));
        }
    }
    let mut out = Vec::new();
    if let Some(secret) = secrets::generated_jwt_secret(ctx, spec, inputs) {
        out.push(Child::Secret(secret));
    }
    for region in spec.regions().into_iter().filter(|r| is_here(r, here)) {
        if region.role == crate::crd::Role::Center {
            out.extend(nats::leafnode_service(ctx, spec, &region).map(Child::Service));
        }
        let (config_map, headless, client, statefulset) =
            nats::objects(ctx, spec, &region, inputs, ids);
        out.push(Child::ConfigMap(config_map));
        out.push(Child::Service(headless));
        out.push(Child::Service(client));
        out.push(Child::StatefulSet(statefulset));
        let operator_namespace = inputs
            .operator_namespace
            .as_deref()
            .unwrap_or(network::DEFAULT_OPERATOR_NAMESPACE);
        out.extend(
            network::nats_policy(ctx, spec, &region, operator_namespace).map(Child::NetworkPolicy),
        );
        out.extend(availability::nats_budget(ctx, &region).map(Child::PodDisruptionBudget));
        let (deployment, service) = dataplane::objects(ctx, spec, &region, inputs);
        out.push(Child::Deployment(deployment));
        out.push(Child::Service(service));
        out.extend(network::dataplane_policy(ctx, spec, &region).map(Child::NetworkPolicy));
        out.extend(availability::dataplane_budget(ctx, &region).map(Child::PodDisruptionBudget));
        out.extend(
            availability::dataplane_autoscaler(ctx, &region).map(Child::HorizontalPodAutoscaler),
        );
        out.extend(
            monitoring::pod_monitors(ctx, spec, &region)
                .into_iter()
                .map(Child::PodMonitor),
        );
    }
    Ok(out)
}

/// Multi-document YAML of `objects`, as `presence-operator render` prints it.
pub fn to_yaml(objects: &[Child]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(out)
}
