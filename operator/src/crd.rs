//! The `PresenceCluster` custom resource.
//!
//! The schema has no defaults at all: every default is applied in code (see
//! the accessors below), so what a user applies is exactly what the API
//! server stores and GitOps tools show no drift. CEL rules say what the
//! schema alone cannot: unique leaf names, no leaf named like the center,
//! replica limits, and fields that cannot change after creation.

use k8s_openapi::api::core::v1::{ResourceRequirements, SecretKeySelector};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every PresenceCluster resource and annotation.
pub const GROUP: &str = "presencecluster.io";

/// The CustomResourceDefinition as installed. Deleting a CRD deletes every
/// PresenceCluster with it, so Argo CD is told never to prune or delete it
/// (an Application deleted or a file dropped from Git would otherwise take
/// every presence cluster down); removing it is a deliberate `kubectl
/// delete` (docs/operator.md, "Uninstalling").
pub fn definition()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt as _;
    let mut crd = PresenceCluster::crd();
    crd.metadata.annotations = Some(
        [(
            "argocd.argoproj.io/sync-options".to_owned(),
            "Prune=false,Delete=false".to_owned(),
        )]
        .into(),
    );
    crd
}
/// Region name of the center when the spec names none.
pub const DEFAULT_CENTER_NAME: &str = "center";
/// JetStream domain of the hub when the spec names none.
pub const DEFAULT_JS_DOMAIN: &str = presence_contract::bucket::DEFAULT_JS_DOMAIN;
/// KV bucket name when the spec names none.
pub const DEFAULT_BUCKET: &str = presence_contract::bucket::DEFAULT_NAME;
/// NATS image used when the spec names none.
pub const DEFAULT_NATS_IMAGE: &str = "nats:2.15.1-alpine";
/// prometheus-nats-exporter image used when the spec names none (the NATS
/// Helm chart's default).
pub const DEFAULT_NATS_EXPORTER_IMAGE: &str = "natsio/prometheus-nats-exporter:0.20.1";
/// Data-plane image used when the spec names none.
pub const DEFAULT_DATAPLANE_IMAGE: &str = "ghcr.io/presencecluster/presence-service:0.1.0";
/// Hub JetStream volume size when the spec names none.
pub const DEFAULT_STORAGE_SIZE: &str = "10Gi";
/// Longest PresenceCluster name: every child name must fit Kubernetes' 63-character limits.
pub const MAX_CLUSTER_NAME: usize = 24;
/// Longest region name, for the same reason.
pub const MAX_REGION_NAME: usize = 16;
/// Most leaves one PresenceCluster may have. Bounded so the API server can
/// price the CEL rules that iterate the list (and `dev`'s port plan fits).
pub const MAX_LEAVES: usize = 64;
/// Most entries of a CORS list; bounded for the CEL rule on origins.
pub const MAX_CORS_ENTRIES: usize = 32;
/// Longest CORS entry (an origin, method or header name).
pub const MAX_CORS_ENTRY: usize = 256;

/// A presence service deployment: one center region (the NATS hub holding
/// the presence KV bucket) and any number of regional leaves, each with its
/// own leaf NATS server and presence-service replicas.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "presencecluster.io",
    version = "v1alpha1",
    kind = "PresenceCluster",
    namespaced,
    status = "PresenceClusterStatus",
    shortname = "pcl",
    category = "presence",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Regions", type_ = "string", json_path = ".status.regionsReady"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 24").message(
        "metadata.name must be at most 24 characters so that every child object's name fits Kubernetes limits"
    ),
    doc = "A multi-region presence service: a NATS JetStream hub with the presence KV bucket, regional leaf NATS servers, and presence-service deployments in every region."
)]
#[x_kube(
    validation = Rule::new("!has(self.leaves) || self.leaves.all(l, l.name != (has(self.center.name) ? self.center.name : 'center'))")
        .message("a leaf cannot have the center's name"),
    validation = Rule::new("!has(self.kv) || !has(self.kv.replicas) || self.kv.replicas <= (has(self.center.replicas) ? self.center.replicas : 1)")
        .message("kv.replicas cannot exceed center.replicas: each bucket replica needs its own hub NATS server"),
    validation = Rule::new("(has(self.kv) && has(self.kv.bucket) ? self.kv.bucket : 'PRESENCE') == (has(oldSelf.kv) && has(oldSelf.kv.bucket) ? oldSelf.kv.bucket : 'PRESENCE')")
                .message("kv.bucket is immutable: renaming it would orphan every stored presence"),
    validation = Rule::new("!has(self.leaves) || !self.leaves.exists(l, has(l.cluster)) || has(self.center.cluster)")
        .message("a leaf names its cluster but the center doesn't: set center.cluster too, or every cluster would run a hub of its own"),
)]
#[serde(rename_all = "camelCase")]
pub struct PresenceClusterSpec {
    /// The center region: the NATS hub (JetStream domain, KV bucket storage)
    /// and the presence-service replicas next to it.
    pub center: CenterSpec,
    /// Regional leaves (at most 64), each leaf NATS servers connected to the
    /// hub plus presence-service replicas. A list keyed by name, so names are
    /// unique; removing a leaf deletes its region's objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub leaves: Vec<LeafSpec>,
    /// Settings shared by every region's presence-service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataplaneSpec>,
    /// How API tokens are verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// The presence KV bucket at the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<KvSpec>,
    /// Container images; pinned defaults are used for any left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImagesSpec>,
    /// Scraping by the Prometheus Operator (off by default, so clusters
    /// without its CRDs are unaffected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<MonitoringSpec>,
    /// NetworkPolicies fencing every region (on by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
    /// TLS of the NATS servers: always on the leafnode link, optionally on
    /// client and route ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// The hub region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.jetstream) && has(self.jetstream.domain) ? self.jetstream.domain : 'hub') == (has(oldSelf.jetstream) && has(oldSelf.jetstream.domain) ? oldSelf.jetstream.domain : 'hub')")
        .message("center.jetstream.domain is immutable: every leaf's clients address the hub through it"),
    validation = Rule::new("(has(self.jetstream) && has(self.jetstream.storageClassName) ? self.jetstream.storageClassName : '') == (has(oldSelf.jetstream) && has(oldSelf.jetstream.storageClassName) ? oldSelf.jetstream.storageClassName : '')")
        .message("center.jetstream.storageClassName is immutable: a StatefulSet's volume claims cannot change"),
    validation = Rule::new("(has(oldSelf.replicas) ? oldSelf.replicas : 1) == 1 ? (has(self.replicas) ? self.replicas : 1) == 1 : (has(self.replicas) ? self.replicas : 1) >= oldSelf.replicas")
                .message("center.replicas: a standalone hub can't become clustered, and a clustered hub can't shrink, without risking its JetStream data; growing 3 to 5 is allowed. To change otherwise, create a new PresenceCluster and move clients to it (docs/operator.md, Scaling the hub)"),    validation = Rule::new("(has(self.cluster) ? self.cluster : '') == (has(oldSelf.cluster) ? oldSelf.cluster : '')")
        .message("center.cluster is immutable: the hub in another cluster would start with an empty bucket; create a new PresenceCluster there and move clients to it"),
)]
#[serde(rename_all = "camelCase")]
pub struct CenterSpec {
    /// Region name of the center (default `center`). Lowercase letters,
    /// digits and `-`, at most 16 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 16),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Hub NATS servers: 1, or 3 or 5 for a replicated (Raft) JetStream cluster (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 1 || self == 3 || self == 5").message("center.replicas must be 1, 3 or 5"))]
    pub replicas: Option<i32>,
    /// JetStream settings of the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamSpec>,
    /// CPU and memory of each hub NATS server (default: requests of 100m
    /// and 256Mi, no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Overrides of the shared data-plane settings for the center region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataplaneOverrides>,
    /// Where the center's pods (hub NATS servers and presence-service) run.
    /// Hub servers are spread across zones and hosts unless this says
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
    /// The Kubernetes cluster the center runs in, as its operator is named
    /// (`--cluster-name`); leave out when every region shares one cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub cluster: Option<String>,
    /// How leaf servers in other clusters reach the hub's leafnode port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leafnodes: Option<LeafnodeExposureSpec>,
}

/// The hub's leafnode listener, exposed outside its cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LeafnodeExposureSpec {
    /// Service type of the exposed listener: `LoadBalancer` or `NodePort`
    /// (default: not exposed, in-cluster leaves only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ExposureType>,
    /// Annotations of that Service (e.g. for an internal load balancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub service_annotations: Option<std::collections::BTreeMap<String, String>>,
    /// The NodePort to use with `NodePort` (default: one the cluster picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,
    /// Source address ranges (CIDRs) a `LoadBalancer` admits, as its
    /// `loadBalancerSourceRanges`: the clusters your leaves dial from
    /// (default: any; the port still needs TLS and a leaf's nkey).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 9, max = 43)))]
    pub source_ranges: Option<Vec<String>>,
    /// `host:port` leaves in other clusters dial (the load balancer's DNS
    /// name or address); also the name the hub's certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 3, max = 260),
        regex(pattern = r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
    )]
    pub advertise: Option<String>,
}

/// How the hub's leafnode listener is exposed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExposureType {
    LoadBalancer,
    NodePort,
}

/// Where a region's pods run: copied onto both its NATS and its
/// presence-service pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Nodes the pods may run on, by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    /// Affinity rules; replaces the operator's default anti-affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// Topology spread; replaces the default spread of hub servers across
    /// zones and hosts. Each constraint's selector is filled in with the
    /// pods' own labels when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints:
        Option<Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
    /// Extra pod labels (e.g. for a service mesh); the operator's own win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_labels: Option<std::collections::BTreeMap<String, String>>,
    /// Extra pod annotations (e.g. sidecar injection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_annotations: Option<std::collections::BTreeMap<String, String>>,
    /// Secrets to pull the images with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub image_pull_secrets: Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>>,
}

/// JetStream settings of the hub (the domain and storage class are
/// immutable once created; the size can only grow).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JetStreamSpec {
    /// JetStream domain of the hub (default `hub`); clients on leaves reach
    /// the bucket through `$JS.<domain>.API`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub domain: Option<String>,
    /// Size of each hub server's JetStream volume (default 10Gi). It can
    /// grow where the StorageClass allows volume expansion; it can't shrink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<Quantity>,
    /// Storage class of the JetStream volumes (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
}

/// A regional leaf.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeafSpec {
    /// Region name, unique in this PresenceCluster. Lowercase letters,
    /// digits and `-`, at most 16 characters.
    #[schemars(
        length(min = 1, max = 16),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The leaf NATS server of this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<LeafNatsSpec>,
    /// Overrides of the shared data-plane settings for this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataplaneOverrides>,
    /// Where this region's pods (NATS and presence-service) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
    /// The Kubernetes cluster this region runs in (default: the center's).
    /// In another cluster than the center's, its servers dial
    /// `center.leafnodes.advertise`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub cluster: Option<String>,
}

/// A leaf's NATS server.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LeafNatsSpec {
    /// Leaf NATS servers of this region (default 1). More than one form a
    /// clustered leaf (without JetStream: the bucket lives at the hub), so
    /// draining one node doesn't cut the region off; each gets a
    /// PodDisruptionBudget of `maxUnavailable: 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: Option<i32>,
    /// CPU and memory of the leaf NATS server (default: requests of 50m and
    /// 64Mi, no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// A Secret key of yours holding this leaf's NATS nkey seed (`SU...`),
    /// which its leafnode connection presents to the hub. When left out,
    /// the operator generates `<name>-<region>-nats-leaf` once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeySelector>,
}

/// Per-region overrides of the data plane.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneOverrides {
    /// presence-service replicas in this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// Cache budget in bytes (CACHE_MAX_COST) in this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 1_099_511_627_776_i64))]
    pub cache_max_cost: Option<i64>,
    /// CPU and memory of each presence-service pod in this region (default:
    /// the shared `resources`, else requests of 100m and 128Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Autoscaling of this region's presence-service (replaces `replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// A HorizontalPodAutoscaler for presence-service. While it is set the
/// operator leaves the Deployment's `replicas` to the autoscaler. CPU
/// utilization is measured against the pods' CPU requests (100m unless
/// `resources` says otherwise).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas")
    .message("autoscaling.minReplicas cannot exceed autoscaling.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest pods (default 2, so one can be disrupted while another serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: Option<i32>,
    /// Most pods.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU utilization to aim for, in percent of requests (default 70).
    #[serde(
        default,
        rename = "targetCPUUtilizationPercentage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: Option<i32>,
}

/// Autoscaling with every default applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscaling {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub target_cpu_utilization_percentage: i32,
}

impl AutoscalingSpec {
    fn resolved(&self) -> Autoscaling {
        Autoscaling {
            min_replicas: self.min_replicas.unwrap_or(2).min(self.max_replicas),
            max_replicas: self.max_replicas,
            target_cpu_utilization_percentage: self.target_cpu_utilization_percentage.unwrap_or(70),
        }
    }
}

/// Data-plane settings shared by every region.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSpec {
    /// presence-service replicas per region (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// Cache budget in bytes per pod (CACHE_MAX_COST, default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 1_099_511_627_776_i64))]
    pub cache_max_cost: Option<i64>,
    /// CPU and memory of each presence-service pod (default: requests of
    /// 100m and 128Mi, no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Autoscaling of presence-service in every region (replaces `replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Log level of presence-service (default info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// CORS policy of the presence API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSpec>,
    /// Per-user write limits (presence sets and session heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Limits of the change streams (Server-Sent Events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<StreamsSpec>,
}

/// A token bucket per user ID and pod; over it a write gets 429.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained writes per second per user (RATE_LIMIT_WRITES_PER_SECOND,
    /// default 5); 0 turns limiting off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub writes_per_second: Option<i32>,
    /// Writes per user allowed at once after a quiet period (RATE_LIMIT_BURST, default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub burst: Option<i32>,
}

/// How many change streams a pod serves, and how they are kept alive.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamsSpec {
    /// Streams one pod keeps open at once (STREAM_MAX_CONNECTIONS, default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: Option<i32>,
    /// Seconds between keep-alive comments (STREAM_KEEPALIVE_SECS, default 15);
    /// keep it below your load balancer's idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub keep_alive_seconds: Option<i32>,
    /// Users one pod's streams may follow together (STREAM_MAX_FOLLOWS,
    /// default 1000000); each follow holds a user's ID and record while
    /// its stream lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000000))]
    pub max_follows: Option<i32>,
}

/// presence-service log levels.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// CORS policy, as the presence service's CORS_* variables.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.allowCredentials) && self.allowCredentials) || (has(self.allowedOrigins) && !self.allowedOrigins.exists(o, o == '*'))")
    .message("cors.allowCredentials needs explicit cors.allowedOrigins; '*' cannot be combined with credentials"))]
#[serde(rename_all = "camelCase")]
pub struct CorsSpec {
    /// Answer CORS preflights and add CORS headers (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Allowed origins such as `https://app.example.com` (a scheme and a
    /// host), or `*` (default `*`). The operator refuses (`InvalidSpec`)
    /// what presence-service would refuse at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub allowed_origins: Option<Vec<String>>,
    /// Allowed methods (default GET, POST, PUT, DELETE, OPTIONS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub allowed_methods: Option<Vec<String>>,
    /// Allowed request headers (default Authorization, Content-Type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub allowed_headers: Option<Vec<String>>,
    /// Allow credentials (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// Preflight cache duration in seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_age_seconds: Option<i32>,
}

/// Token verification.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// An existing Secret key holding the HS256 JWT secret. When left out,
    /// the operator generates a Secret `<name>-jwt` once and never rotates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeySelector>,
    /// When set, tokens must carry this `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// The presence KV bucket.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KvSpec {
    /// Bucket name (default PRESENCE). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub bucket: Option<String>,
    /// Replicas of the bucket: 1, 3 or 5, at most center.replicas (default: center.replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 1 || self == 3 || self == 5").message("kv.replicas must be 1, 3 or 5"))]
    pub replicas: Option<i32>,
    /// What happens to the bucket when the PresenceCluster is deleted:
    /// `Retain` (default) keeps every stored presence, `Delete` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
}

/// Fate of the KV bucket on deletion.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// PodMonitors for every region's presence-service and NATS servers, and
/// the NATS metrics sidecar they scrape.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Render the PodMonitors (needs the Prometheus Operator's CRDs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Run prometheus-nats-exporter next to every NATS server, with its own
    /// PodMonitor (default true while monitoring is enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_exporter: Option<bool>,
    /// Scrape interval such as `30s` (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), regex(pattern = r"^[1-9][0-9]{0,4}(s|m)$"))]
    pub interval: Option<String>,
    /// Labels of the PodMonitors, so your Prometheus selects them (for
    /// kube-prometheus-stack: `release: <its release name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 16))]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// Who may reach what. Each region's NATS servers take clients only from
/// that region's presence-service and the operator, leafnode links only
/// from the cluster's leaf servers, routes only from their own region's
/// servers, and monitoring only from the operator and Prometheus.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Render the NetworkPolicies (default true; turn off where no
    /// NetworkPolicy controller runs, where they would do nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Who may call the presence API (default: anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub api_from: Option<Vec<NetworkPolicyPeer>>,
    /// Who may scrape the metrics ports (presence-service's, the NATS
    /// monitor and exporter); the operator always may reach NATS monitoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub metrics_from: Option<Vec<NetworkPolicyPeer>>,
}

/// Certificates of the NATS servers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret of yours with `tls.crt`, `tls.key` and `ca.crt` (as
    /// cert-manager writes them), valid for every NATS Service name of this
    /// PresenceCluster. When left out, the operator runs its own CA and
    /// renews the certificate well before it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub secret_name: Option<String>,
    /// TLS on the NATS client ports too (presence-service and the operator
    /// verify the servers against `ca.crt`). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<bool>,
    /// Mutual TLS on routes too. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<bool>,
}

/// Container images.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSpec {
    /// NATS server image (default nats:2.15.1-alpine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<String>,
    /// presence-service image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
    /// prometheus-nats-exporter image of the NATS metrics sidecar (default
    /// natsio/prometheus-nats-exporter:0.20.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_exporter: Option<String>,
    /// Pull policy for every image (default IfNotPresent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// Kubernetes image pull policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Observed state, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PresenceClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, with CamelCase reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One entry per region, center first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionStatus>,
    /// Ready regions out of all, e.g. `2/3` (the Regions printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions_ready: Option<String>,
    /// When the NATS servers' certificate expires (RFC 3339). The operator
    /// renews its own 30 days before; a referenced one is yours to renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_certificate_expiry: Option<String>,
}

/// Observed state of one region.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// Region name.
    pub name: String,
    /// `center` or `leaf`.
    pub role: String,
    /// Ready NATS servers of the region.
    pub nats_ready_replicas: i32,
    /// Ready presence-service pods of the region.
    pub dataplane_ready_replicas: i32,
    /// For a leaf: whether every one of its NATS servers is linked to the
    /// hub (absent while that can't be known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leafnode_connected: Option<bool>,
}

/// The role of a region in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Center,
    Leaf,
}

impl Role {
    /// Wire name (`center` / `leaf`), also NODE_TYPE of its data plane.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Center => "center",
            Role::Leaf => "leaf",
        }
    }
}

/// One region with every default applied: what the renderer works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Region<'a> {
    pub name: &'a str,
    pub role: Role,
    /// NATS servers of the region.
    pub nats_replicas: i32,
    pub dataplane_replicas: i32,
    /// When set, a HorizontalPodAutoscaler owns the replicas instead.
    pub autoscaling: Option<Autoscaling>,
    pub cache_max_cost: i64,
    pub dataplane_resources: Option<&'a ResourceRequirements>,
    pub nats_resources: Option<&'a ResourceRequirements>,
    pub leaf_credentials: Option<&'a SecretKeySelector>,
    pub placement: Option<&'a PlacementSpec>,
    /// The cluster the region runs in ("" when the manifest names none).
    pub cluster: &'a str,
    /// Whether it runs in another cluster than the center.
    pub remote: bool,
}

/// Whether a region placed in `cluster` ("" when the manifest names none)
/// runs in the cluster `here` an operator serves (`None`: it serves every
/// cluster). A region whose cluster nobody named runs wherever the manifest
/// is applied, so single-cluster manifests work under any `--cluster-name`.
pub fn runs_in(cluster: &str, here: Option<&str>) -> bool {
    here.is_none_or(|h| cluster.is_empty() || cluster == h)
}

impl PresenceClusterSpec {
    /// Center region name.
    pub fn center_name(&self) -> &str {
        self.center.name.as_deref().unwrap_or(DEFAULT_CENTER_NAME)
    }

    /// The cluster of the center ("" when the manifest names none).
    pub fn center_cluster(&self) -> &str {
        self.center.cluster.as_deref().unwrap_or("")
    }

    /// Whether the center runs in the cluster `here` serves (see
    /// [`runs_in`]).
    pub fn center_runs_in(&self, here: Option<&str>) -> bool {
        runs_in(self.center_cluster(), here)
    }

    /// The hub's leafnode address for leaves in other clusters.
    pub fn leafnode_advertise(&self) -> Option<&str> {
        self.center
            .leafnodes
            .as_ref()
            .and_then(|l| l.advertise.as_deref())
    }

    /// Whether the hub's leafnode port is reached from outside its cluster
    /// (a Service exposes it, an address is advertised, or a leaf runs in
    /// another cluster), so it is open to any source and gossips no pod
    /// address.
    pub fn leafnodes_exposed(&self) -> bool {
        self.center
            .leafnodes
            .as_ref()
            .is_some_and(|l| l.service_type.is_some() || l.advertise.is_some())
            || self.has_remote_leaves()
    }

    /// Whether any leaf runs in another cluster than the center.
    pub fn has_remote_leaves(&self) -> bool {
        self.regions().iter().any(|r| r.remote)
    }

    /// Hub NATS servers.
    pub fn center_replicas(&self) -> i32 {
        self.center.replicas.unwrap_or(1)
    }

    /// JetStream domain of the hub.
    pub fn js_domain(&self) -> &str {
        self.center
            .jetstream
            .as_ref()
            .and_then(|j| j.domain.as_deref())
            .unwrap_or(DEFAULT_JS_DOMAIN)
    }

    /// Size of each hub server's JetStream volume.
    pub fn storage_size(&self) -> Quantity {
        self.center
            .jetstream
            .as_ref()
            .and_then(|j| j.storage_size.clone())
            .unwrap_or_else(|| Quantity(DEFAULT_STORAGE_SIZE.into()))
    }

    /// Bucket name.
    pub fn bucket(&self) -> &str {
        self.kv
            .as_ref()
            .and_then(|k| k.bucket.as_deref())
            .unwrap_or(DEFAULT_BUCKET)
    }

    /// Bucket replicas: as many as hub servers unless set.
    pub fn kv_replicas(&self) -> i32 {
        self.kv
            .as_ref()
            .and_then(|k| k.replicas)
            .unwrap_or_else(|| self.center_replicas())
    }

    /// What deletion does to the bucket.
    pub fn deletion_policy(&self) -> DeletionPolicy {
        self.kv
            .as_ref()
            .and_then(|k| k.deletion_policy)
            .unwrap_or_default()
    }

    /// NATS image.
    pub fn nats_image(&self) -> &str {
        self.images
            .as_ref()
            .and_then(|i| i.nats.as_deref())
            .unwrap_or(DEFAULT_NATS_IMAGE)
    }

    /// prometheus-nats-exporter image.
    pub fn nats_exporter_image(&self) -> &str {
        self.images
            .as_ref()
            .and_then(|i| i.nats_exporter.as_deref())
            .unwrap_or(DEFAULT_NATS_EXPORTER_IMAGE)
    }

    /// Whether client ports take TLS only.
    pub fn client_tls(&self) -> bool {
        self.tls.as_ref().and_then(|t| t.clients) == Some(true)
    }

    /// Whether routes use mutual TLS.
    pub fn route_tls(&self) -> bool {
        self.tls.as_ref().and_then(|t| t.routes) == Some(true)
    }

    /// Whether NetworkPolicies are rendered.
    pub fn network_policies_enabled(&self) -> bool {
        self.network_policy.as_ref().and_then(|n| n.enabled) != Some(false)
    }

    /// Whether PodMonitors are rendered.
    pub fn monitoring_enabled(&self) -> bool {
        self.monitoring.as_ref().and_then(|m| m.enabled) == Some(true)
    }

    /// Whether the NATS metrics sidecar runs (and is scraped).
    pub fn nats_exporter_enabled(&self) -> bool {
        self.monitoring_enabled()
            && self.monitoring.as_ref().and_then(|m| m.nats_exporter) != Some(false)
    }

    /// presence-service image.
    pub fn dataplane_image(&self) -> &str {
        self.images
            .as_ref()
            .and_then(|i| i.dataplane.as_deref())
            .unwrap_or(DEFAULT_DATAPLANE_IMAGE)
    }

    fn region<'s>(
        &'s self,
        name: &'s str,
        role: Role,
        overrides: Option<&'s DataplaneOverrides>,
    ) -> Region<'s> {
        let shared = self.dataplane.as_ref();
        Region {
            name,
            role,
            nats_replicas: 1,
            // The most specific setting wins: a region's own autoscaling,
            // else its own fixed replicas, else the shared autoscaling.
            autoscaling: match overrides {
                Some(o) if o.autoscaling.is_some() => o.autoscaling.as_ref(),
                Some(o) if o.replicas.is_some() => None,
                _ => shared.and_then(|s| s.autoscaling.as_ref()),
            }
            .map(AutoscalingSpec::resolved),
            dataplane_replicas: overrides
                .and_then(|o| o.replicas)
                .or(shared.and_then(|s| s.replicas))
                .unwrap_or(2),
            cache_max_cost: overrides
                .and_then(|o| o.cache_max_cost)
                .or(shared.and_then(|s| s.cache_max_cost))
                .unwrap_or(64 * 1024 * 1024),
            dataplane_resources: overrides
                .and_then(|o| o.resources.as_ref())
                .or(shared.and_then(|s| s.resources.as_ref())),
            nats_resources: None,
            leaf_credentials: None,
            placement: None,
            cluster: "",
            remote: false,
        }
    }

    /// Every region in a fixed order: center first, then leaves as listed.
    pub fn regions(&self) -> Vec<Region<'_>> {
        let mut regions = Vec::with_capacity(1 + self.leaves.len());
        let mut center = self.region(
            self.center_name(),
            Role::Center,
            self.center.dataplane.as_ref(),
        );
        center.nats_resources = self.center.resources.as_ref();
        center.nats_replicas = self.center_replicas();
        center.placement = self.center.placement.as_ref();
        center.cluster = self.center_cluster();
        regions.push(center);
        for leaf in &self.leaves {
            let mut r = self.region(&leaf.name, Role::Leaf, leaf.dataplane.as_ref());
            let nats = leaf.nats.as_ref();
            r.nats_resources = nats.and_then(|n| n.resources.as_ref());
            r.nats_replicas = nats.and_then(|n| n.replicas).unwrap_or(1);
            r.placement = leaf.placement.as_ref();
            r.cluster = leaf.cluster.as_deref().unwrap_or(self.center_cluster());
            r.remote = r.cluster != self.center_cluster();
            r.leaf_credentials = nats.and_then(|n| n.credentials_secret_ref.as_ref());
            regions.push(r);
        }
        regions
    }
}
