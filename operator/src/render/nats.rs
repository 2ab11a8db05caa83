//! NATS server configuration text and the Kubernetes objects that run it.
//!
//! `nats_conf` is the only place that writes `nats.conf`. Kubernetes and
//! `presence-operator dev` both call it; they differ only in the addresses
//! they pass (cluster DNS names and fixed ports, or loopback ports).

use super::nats_auth::{self, SecurityParams};
use super::{Scope, labels, meta, pod_meta, region_selector};
use crate::crd::{PresenceClusterSpec, Region, Role};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Ports every NATS server uses inside Kubernetes.
pub const CLIENT_PORT: u16 = 4222;
pub const CLUSTER_PORT: u16 = 6222;
pub const LEAFNODE_PORT: u16 = 7422;
pub const MONITOR_PORT: u16 = 8222;
const CONFIG_DIR: &str = "/etc/nats";
const DATA_DIR: &str = "/data";
const PID_DIR: &str = "/var/run/nats";
/// Where the TLS Secret is mounted in NATS pods.
const TLS_DIR: &str = "/etc/nats-tls";

/// Hub-only settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubParams {
    pub domain: String,
    pub store_dir: String,
    /// JetStream file store limit in bytes, if any.
    pub max_file_store: Option<u64>,
    pub leafnode_listen: String,
    /// Leaves reach the hub from outside its network (another cluster,
    /// through a load balancer): the hub must not gossip its servers'
    /// leafnode addresses (pod IPs) to them, which would send them nowhere.
    pub leafnode_no_advertise: bool,
    /// Cluster routes, when the hub has more than one server.
    pub cluster: Option<ClusterParams>,
}

/// Route settings of a clustered hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterParams {
    pub name: String,
    pub listen: String,
    pub routes: Vec<String>,
}

/// Leaf-only settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafParams {
    /// `nats-leaf://host:port` URLs of the hub's leafnode listener.
    pub hub_urls: Vec<String>,
    /// Routes between the region's leaf servers, when it has more than one.
    pub cluster: Option<ClusterParams>,
}

/// What distinguishes one server's config from another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsRole {
    Hub(HubParams),
    Leaf(LeafParams),
}

/// Everything `nats_conf` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsParams {
    pub cluster_name: String,
    pub region: String,
    /// `$POD_NAME` in Kubernetes (expanded by nats-server from the
    /// environment), a fixed name locally.
    pub server_name: String,
    pub client_listen: String,
    pub monitor_listen: String,
    pub pid_file: Option<String>,
    pub role: NatsRole,
    /// Users, permissions and TLS.
    pub security: SecurityParams,
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The `nats.conf` of one server. Deterministic: same input, same bytes.
pub fn nats_conf(p: &NatsParams) -> String {
    let mut out = String::new();
    let kind = match p.role {
        NatsRole::Hub(_) => "hub",
        NatsRole::Leaf(_) => "leaf",
    };
    let _ = writeln!(
        out,
        "# PresenceCluster {}, region {} ({kind}). Rendered by presence-operator; do not edit.",
        p.cluster_name, p.region
    );
    // `$VAR` is expanded by nats-server from the environment; anything else is quoted.
    let server_name = if p.server_name.starts_with('$') {
        p.server_name.clone()
    } else {
        quoted(&p.server_name)
    };
    let _ = writeln!(out, "server_name: {server_name}");
    let _ = writeln!(out, "listen: {}", quoted(&p.client_listen));
    let _ = writeln!(out, "http: {}", quoted(&p.monitor_listen));
    if let Some(pid) = &p.pid_file {
        let _ = writeln!(out, "pid_file: {}", quoted(pid));
    }
    out.push_str("lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"10s\"\n");
    let s = &p.security;
    if s.client_tls {
        out.push('\n');
        nats_auth::tls_block(&mut out, "", &s.tls, false);
    }
    nats_auth::accounts_block(&mut out, s, matches!(p.role, NatsRole::Hub(_)));
    match &p.role {
        NatsRole::Hub(hub) => {
            out.push_str("\njetstream {\n");
            let _ = writeln!(out, "  domain: {}", quoted(&hub.domain));
            let _ = writeln!(out, "  store_dir: {}", quoted(&hub.store_dir));
            if let Some(max) = hub.max_file_store {
                let _ = writeln!(out, "  max_file_store: {max}");
            }
            out.push_str("}\n\nleafnodes {\n");
            let _ = writeln!(out, "  listen: {}", quoted(&hub.leafnode_listen));
            if hub.leafnode_no_advertise {
                out.push_str("  no_advertise: true\n");
            }
            // Leaf servers log in as users of the account (nkeys, per-region
            // permissions): no `authorization {}` here, which could hold
            // neither.
            nats_auth::tls_block(&mut out, "  ", &s.tls, false);
            out.push_str("}\n");
            if let Some(cluster) = &hub.cluster {
                cluster_block(&mut out, cluster, s);
            }
        }
        NatsRole::Leaf(leaf) => {
            out.push_str("\nleafnodes {\n  reconnect: \"1s\"\n  remotes: [\n    {\n");
            let urls: Vec<String> = leaf.hub_urls.iter().map(|u| quoted(u)).collect();
            let _ = writeln!(out, "      urls: [{}]", urls.join(", "));
            let _ = writeln!(out, "      account: {}", quoted(nats_auth::ACCOUNT));
            let _ = writeln!(out, "      nkey: ${}", nats_auth::LEAF_SEED_ENV);
            let _ = writeln!(out, "      tls {{ ca_file: {} }}", quoted(&s.tls.ca));
            out.push_str("    }\n  ]\n}\n");
            if let Some(cluster) = &leaf.cluster {
                cluster_block(&mut out, cluster, s);
            }
        }
    }
    out
}

/// The `cluster {}` block: authenticated routes between the servers of one
/// region. The route URLs (with the password) come from `$ROUTE_<i>`; the
/// password from `$ROUTE_PASSWORD`.
fn cluster_block(out: &mut String, cluster: &ClusterParams, s: &SecurityParams) {
    out.push_str("\ncluster {\n");
    let _ = writeln!(out, "  name: {}", quoted(&cluster.name));
    let _ = writeln!(out, "  listen: {}", quoted(&cluster.listen));
    let _ = writeln!(
        out,
        "  authorization {{ user: {}, password: ${}, timeout: 2 }}",
        quoted(nats_auth::ROUTE_USER),
        nats_auth::ROUTE_PASSWORD_ENV
    );
    out.push_str("  routes: [\n");
    for i in 0..cluster.routes.len() {
        let _ = writeln!(out, "    ${}", nats_auth::route_env(i));
    }
    out.push_str("  ]\n");
    if s.route_tls {
        nats_auth::tls_block(out, "  ", &s.tls, true);
    }
    out.push_str("}\n");
}

/// The Service exposing the hub's leafnode listener outside its cluster,
/// when `center.leafnodes.serviceType` asks for one.
pub fn leafnode_service(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
) -> Option<Service> {
    let exposure = spec.center.leafnodes.as_ref()?;
    let service_type = exposure.service_type?;
    let name = ctx.names.nats_leafnodes(region.name);
    let mut metadata = meta(ctx, &name, COMPONENT, Some(region.name));
    metadata.annotations = exposure.service_annotations.clone();
    let mut port = service_port("leafnodes", LEAFNODE_PORT);
    port.node_port = exposure.node_port;
    Some(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(
                match service_type {
                    crate::crd::ExposureType::LoadBalancer => "LoadBalancer",
                    crate::crd::ExposureType::NodePort => "NodePort",
                }
                .into(),
            ),
            selector: Some(region_selector(ctx, COMPONENT, region.name)),
            ports: Some(vec![port]),
            // Only a load balancer filters by source; a NodePort can't.
            load_balancer_source_ranges: (service_type == crate::crd::ExposureType::LoadBalancer)
                .then(|| exposure.source_ranges.clone())
                .flatten(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The TLS files as mounted in NATS pods.
pub fn k8s_tls_files() -> nats_auth::TlsFiles {
    nats_auth::TlsFiles {
        cert: format!("{TLS_DIR}/tls.crt"),
        key: format!("{TLS_DIR}/tls.key"),
        ca: format!("{TLS_DIR}/ca.crt"),
    }
}

/// The security settings of every server of `spec`, from the identities.
pub fn security_params(
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    ids: &super::NatsIdentities,
    tls: nats_auth::TlsFiles,
) -> SecurityParams {
    let hub = region.role == Role::Center;
    SecurityParams {
        bucket: spec.bucket().to_owned(),
        domain: spec.js_domain().to_owned(),
        presence_user: ids.presence.clone(),
        operator_user: hub.then(|| ids.operator.clone()),
        leaf_users: if hub {
            spec.leaves
                .iter()
                .filter_map(|l| ids.leaves.get(&l.name).cloned())
                .collect()
        } else {
            Vec::new()
        },
        tls,
        client_tls: spec.client_tls(),
        route_tls: spec.route_tls(),
    }
}

/// Parses a Kubernetes quantity (`10Gi`, `500M`, `1073741824`) into bytes.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let q = q.strip_prefix('+').unwrap_or(q);
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number.parse().ok()?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        // A decimal exponent: `1e9`, `2E6`.
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            10f64.powi(digits.parse::<i32>().ok()?)
        }
    };
    let bytes = value * multiplier;
    // NATS reads a size as a signed 64-bit integer: below 2^63 (8Ei).
    (bytes.is_finite() && bytes >= 0.0 && bytes < i64::MAX as f64).then_some(bytes as u64)
}

/// Service DNS name of a region's NATS servers.
pub fn client_host(ctx: &Scope, region: &str) -> String {
    format!("{}.{}.svc", ctx.names.nats(region), ctx.namespace)
}

/// The Kubernetes parameters of a region's NATS servers.
pub fn k8s_params(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    volume_capacity: Option<&Quantity>,
    ids: &super::NatsIdentities,
) -> NatsParams {
    let any = |port: u16| format!("0.0.0.0:{port}");
    let headless = ctx.names.nats_headless(region.name);
    // Routes between the region's servers (pods of its StatefulSet).
    let cluster = (region.nats_replicas > 1).then(|| ClusterParams {
        name: format!("{}-{}", ctx.name, region.name),
        listen: any(CLUSTER_PORT),
        routes: (0..region.nats_replicas)
            .map(|i| {
                format!(
                    "nats://{}-{i}.{headless}.{}.svc:{CLUSTER_PORT}",
                    ctx.names.nats(region.name),
                    ctx.namespace
                )
            })
            .collect(),
    });
    let role = match region.role {
        Role::Center => {
            // JetStream's limit follows the disk it really has: the spec's
            // size until a grown volume actually reports the new capacity.
            let size = spec.storage_size();
            let bytes = quantity_bytes(&size.0);
            let capacity = volume_capacity.and_then(|c| quantity_bytes(&c.0));
            let usable = match (bytes, capacity) {
                (Some(want), Some(have)) => Some(want.min(have)),
                (want, _) => want,
            };
            NatsRole::Hub(HubParams {
                domain: spec.js_domain().to_owned(),
                store_dir: format!("{DATA_DIR}/jetstream"),
                // Leave 10% of the volume for the filesystem and compaction.
                max_file_store: usable.map(|b| b / 10 * 9),
                leafnode_listen: any(LEAFNODE_PORT),
                leafnode_no_advertise: spec.leafnodes_exposed(),
                cluster,
            })
        }
        Role::Leaf => NatsRole::Leaf(LeafParams {
            hub_urls: vec![match spec.leafnode_advertise().filter(|_| region.remote) {
                // In another cluster: only the hub's exposed address works.
                Some(advertise) => format!("nats-leaf://{advertise}"),
                None => format!(
                    "nats-leaf://{}:{LEAFNODE_PORT}",
                    client_host(ctx, spec.center_name())
                ),
            }],
            cluster,
        }),
    };
    NatsParams {
        cluster_name: ctx.name.clone(),
        region: region.name.to_owned(),
        server_name: "$POD_NAME".into(),
        client_listen: any(CLIENT_PORT),
        monitor_listen: any(MONITOR_PORT),
        pid_file: Some(format!("{PID_DIR}/nats.pid")),
        role,
        security: security_params(spec, region, ids, k8s_tls_files()),
    }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn service_port(name: &str, number: u16) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: i32::from(number),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        app_protocol: Some("tcp".into()),
        ..Default::default()
    }
}

/// ConfigMap, headless Service, client Service and StatefulSet of a region's NATS.
pub fn objects(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    inputs: &super::Inputs,
    ids: &super::NatsIdentities,
) -> (ConfigMap, Service, Service, StatefulSet) {
    let conf = nats_conf(&k8s_params(
        ctx,
        spec,
        region,
        inputs.hub_volume_capacity.as_ref(),
        ids,
    ));
    // The config names Secrets; their contents' digests roll the pods when
    // one is rotated.
    let mut hashed = conf.clone().into_bytes();
    for secret in secrets_used(ctx, spec, region) {
        hashed.extend(ids.digest(&secret).bytes());
    }
    let hash = super::config_hash(&hashed);
    let config_map = ConfigMap {
        metadata: meta(
            ctx,
            &ctx.names.nats_config(region.name),
            COMPONENT,
            Some(region.name),
        ),
        data: Some(BTreeMap::from([("nats.conf".to_owned(), conf)])),
        ..Default::default()
    };
    let ports = container_ports(region);
    let (headless, client) = services(ctx, region, &ports);
    let claim_size = inputs
        .hub_volume_size
        .clone()
        .unwrap_or_else(|| spec.storage_size());
    let statefulset = statefulset(ctx, spec, region, ports, hash, claim_size);
    (config_map, headless, client, statefulset)
}

/// The `app.kubernetes.io/component` of NATS objects.
const COMPONENT: &str = "nats";

fn container_ports(region: &Region<'_>) -> Vec<ContainerPort> {
    let mut ports = vec![port("client", CLIENT_PORT), port("monitor", MONITOR_PORT)];
    if region.role == Role::Center {
        ports.push(port("leafnodes", LEAFNODE_PORT));
        ports.push(port("cluster", CLUSTER_PORT));
    } else if region.nats_replicas > 1 {
        ports.push(port("cluster", CLUSTER_PORT));
    }
    ports
}

/// The headless Service (stable pod names, every port) and the client
/// Service (every port but routes).
fn services(ctx: &Scope, region: &Region<'_>, ports: &[ContainerPort]) -> (Service, Service) {
    let service_ports: Vec<ServicePort> = ports
        .iter()
        .map(|p| {
            service_port(
                p.name.as_deref().unwrap_or_default(),
                u16::try_from(p.container_port).unwrap_or(0),
            )
        })
        .collect();
    let selector = region_selector(ctx, COMPONENT, region.name);
    let headless = Service {
        metadata: meta(
            ctx,
            &ctx.names.nats_headless(region.name),
            COMPONENT,
            Some(region.name),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector.clone()),
            ports: Some(service_ports.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let client = Service {
        metadata: meta(
            ctx,
            &ctx.names.nats(region.name),
            COMPONENT,
            Some(region.name),
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(
                service_ports
                    .into_iter()
                    .filter(|p| p.name.as_deref() != Some("cluster"))
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    (headless, client)
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("monitor".into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(10),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Probes as the official NATS Helm chart renders them, for the reasons
/// its original authors gave (nats-server's `/healthz` options):
/// - startup `/healthz`, the full check: JetStream is current with the meta
///   leader and every stream and consumer on this server has caught up. A
///   restarted hub server only becomes Ready after that (readiness counts
///   from the end of startup), so a rolling restart never moves to the next
///   server while this one is still catching up. Up to 15 minutes.
/// - readiness `/healthz?js-server-only=true`: the server accepts clients
///   (on 2.11+ this skips JetStream state, so a hub that briefly loses its
///   meta leader isn't pulled out of its Service).
/// - liveness `/healthz?js-enabled-only=true`: only "JetStream is enabled",
///   so a server that is catching up or has no meta leader is never killed.
///
/// Leaves have no JetStream; the same paths then check the server is up.
fn probes() -> (Probe, Probe, Probe) {
    (
        probe("/healthz", 10, 90),
        probe("/healthz?js-server-only=true", 10, 3),
        probe("/healthz?js-enabled-only=true", 30, 3),
    )
}

/// Mounts and volumes of the container: config, pid directory, the hub's
/// data, and a leaf's credentials.
/// The Secret holding a leaf region's nkey seed, and its key.
pub fn leaf_seed_source(ctx: &Scope, region: &Region<'_>) -> SecretKeySelector {
    region
        .leaf_credentials
        .cloned()
        .unwrap_or_else(|| SecretKeySelector {
            name: ctx.names.nats_leaf_secret(region.name),
            key: super::secrets::SEED_KEY.into(),
            ..Default::default()
        })
}

/// The Secret with the NATS servers' certificate.
pub fn tls_secret_name(ctx: &Scope, spec: &PresenceClusterSpec) -> String {
    spec.tls
        .as_ref()
        .and_then(|t| t.secret_name.clone())
        .unwrap_or_else(|| ctx.names.nats_tls_secret())
}

/// Every Secret a region's NATS pods read.
fn secrets_used(ctx: &Scope, spec: &PresenceClusterSpec, region: &Region<'_>) -> Vec<String> {
    let mut used = vec![tls_secret_name(ctx, spec)];
    if region.role == Role::Leaf {
        used.push(leaf_seed_source(ctx, region).name);
    }
    if region.nats_replicas > 1 {
        used.push(ctx.names.nats_routes_secret());
    }
    used
}

fn secret_env(name: &str, selector: SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(selector),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// CPU and memory requested for a hub NATS server whose spec names no
/// `resources` (JetStream keeps the bucket's index and caches in memory).
pub const HUB_REQUESTS: (&str, &str) = ("100m", "256Mi");

/// The same for a leaf NATS server, which only routes.
pub const LEAF_REQUESTS: (&str, &str) = ("50m", "64Mi");

/// Bytes the Go runtime of a NATS server with a memory limit aims to stay
/// under: 90% of the limit, so its garbage collector works harder before
/// the kernel's OOM killer ends the server (and a hub's JetStream with it).
fn go_memory_limit(region: &Region<'_>) -> Option<u64> {
    let limit = region.nats_resources?.limits.as_ref()?.get("memory")?;
    // Below that, no NATS server runs; a tiny GOMEMLIMIT would only make
    // its garbage collector run without pause.
    const SMALLEST: u64 = 32 * 1024 * 1024;
    quantity_bytes(&limit.0)
        .filter(|bytes| *bytes >= SMALLEST)
        .map(|bytes| bytes / 10 * 9)
}

/// The container's environment: its pod name, the Go memory limit, and
/// the secrets its config names (`$LEAF_NKEY_SEED`, `$ROUTE_PASSWORD`,
/// `$ROUTE_<i>`).
fn nats_env(ctx: &Scope, region: &Region<'_>) -> Vec<EnvVar> {
    let mut env = vec![EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(limit) = go_memory_limit(region) {
        env.push(EnvVar {
            name: "GOMEMLIMIT".into(),
            value: Some(limit.to_string()),
            ..Default::default()
        });
    }
    if region.role == Role::Leaf {
        env.push(secret_env(
            nats_auth::LEAF_SEED_ENV,
            leaf_seed_source(ctx, region),
        ));
    }
    if region.nats_replicas > 1 {
        env.push(secret_env(
            nats_auth::ROUTE_PASSWORD_ENV,
            SecretKeySelector {
                name: ctx.names.nats_routes_secret(),
                key: super::secrets::PASSWORD_KEY.into(),
                ..Default::default()
            },
        ));
        let headless = ctx.names.nats_headless(region.name);
        for i in 0..region.nats_replicas {
            let url = format!(
                "nats://{}-{i}.{headless}.{}.svc:{CLUSTER_PORT}",
                ctx.names.nats(region.name),
                ctx.namespace
            );
            let password = format!("$({})", nats_auth::ROUTE_PASSWORD_ENV);
            env.push(EnvVar {
                name: nats_auth::route_env(usize::try_from(i).unwrap_or(0)),
                value: Some(nats_auth::route_url_with_credentials(&url, &password)),
                ..Default::default()
            });
        }
    }
    env
}

fn mounts_and_volumes(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
) -> (Vec<VolumeMount>, Vec<Volume>) {
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "pid".into(),
            mount_path: PID_DIR.into(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ctx.names.nats_config(region.name),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "pid".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    if region.role == Role::Center {
        mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..Default::default()
        });
    }
    // Servers with a certificate of their own mount the whole Secret; a
    // leaf that only checks the hub's certificate mounts just the CA.
    let whole = region.role == Role::Center || spec.client_tls() || spec.route_tls();
    mounts.push(VolumeMount {
        name: "tls".into(),
        mount_path: TLS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls_secret_name(ctx, spec)),
            items: (!whole).then(|| {
                vec![k8s_openapi::api::core::v1::KeyToPath {
                    key: "ca.crt".into(),
                    path: "ca.crt".into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    (mounts, volumes)
}

/// The hub's JetStream volume, one per server.
fn hub_volume_claims(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    size: Quantity,
) -> Vec<PersistentVolumeClaim> {
    let jetstream = spec.center.jetstream.as_ref();
    vec![PersistentVolumeClaim {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels(ctx, COMPONENT, Some(region.name))),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: jetstream.and_then(|j| j.storage_class_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), size)])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]
}

fn container(
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    ports: Vec<ContainerPort>,
    (mounts, env): (Vec<VolumeMount>, Vec<EnvVar>),
) -> Container {
    let (startup, readiness, liveness) = probes();
    Container {
        name: "nats".into(),
        image: Some(spec.nats_image().to_owned()),
        image_pull_policy: super::pull_policy(spec),
        args: Some(vec!["--config".into(), format!("{CONFIG_DIR}/nats.conf")]),
        env: Some(env),
        ports: Some(ports),
        resources: Some(super::resources_or(
            region.nats_resources,
            if region.role == Role::Center {
                HUB_REQUESTS
            } else {
                LEAF_REQUESTS
            },
        )),
        volume_mounts: Some(mounts),
        startup_probe: Some(startup),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        lifecycle: Some(k8s_openapi::api::core::v1::Lifecycle {
            pre_stop: Some(k8s_openapi::api::core::v1::LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "nats-server".into(),
                        format!("-sl=ldm={PID_DIR}/nats.pid"),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(super::locked_down()),
        ..Default::default()
    }
}

fn statefulset(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    ports: Vec<ContainerPort>,
    config_hash: String,
    claim_size: Quantity,
) -> StatefulSet {
    let is_hub = region.role == Role::Center;
    let (mounts, volumes) = mounts_and_volumes(ctx, spec, region);
    let container = container(spec, region, ports, (mounts, nats_env(ctx, region)));
    let replicas = region.nats_replicas;
    let annotations = BTreeMap::from([(format!("{}/config-hash", crate::crd::GROUP), config_hash)]);
    let mut containers = vec![container];
    if spec.nats_exporter_enabled() {
        containers.push(super::monitoring::exporter_sidecar(spec, region));
    }
    StatefulSet {
        metadata: meta(
            ctx,
            &ctx.names.nats(region.name),
            COMPONENT,
            Some(region.name),
        ),
        spec: StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(ctx.names.nats_headless(region.name)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(region_selector(ctx, COMPONENT, region.name)),
                ..Default::default()
            },
            template: {
                let mut meta = pod_meta(ctx, COMPONENT, region.name, annotations);
                let mut pod = PodSpec {
                    containers,
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(60),
                    enable_service_links: Some(false),
                    // nats-server never calls the Kubernetes API: no token
                    // in the pod for a compromise to use.
                    automount_service_account_token: Some(false),
                    affinity: (is_hub || replicas > 1)
                        .then(|| super::spread_affinity(ctx, COMPONENT, region.name)),
                    security_context: Some(nats_pod_security()),
                    ..Default::default()
                };
                super::placement::apply(ctx, region, COMPONENT, &mut meta, &mut pod);
                PodTemplateSpec {
                    metadata: Some(meta),
                    spec: Some(pod),
                }
            },
            volume_claim_templates: is_hub
                .then(|| hub_volume_claims(ctx, spec, region, claim_size)),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn nats_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        run_as_group: Some(1000),
        fs_group: Some(1000),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("10Gi"), Some(10 * 1024 * 1024 * 1024));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1024"), Some(1024));
        assert_eq!(quantity_bytes("1.5Ki"), Some(1536));
        assert_eq!(quantity_bytes("10Zi"), None);
        assert_eq!(quantity_bytes("100Ei"), None, "beyond what NATS reads");
        assert_eq!(quantity_bytes("+1Ki"), Some(1024));
        assert_eq!(
            quantity_bytes("8Ei"),
            None,
            "2^63 is one more than NATS reads"
        );
        assert!(quantity_bytes("7Ei").is_some());
        assert_eq!(quantity_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("2E6"), Some(2_000_000));
        assert_eq!(quantity_bytes("1E"), Some(1_000_000_000_000_000_000));
        assert_eq!(
            quantity_bytes("500m"),
            None,
            "milli-bytes are no memory size"
        );
        assert_eq!(quantity_bytes("lots"), None);
    }

    #[test]
    fn quoting_escapes() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
