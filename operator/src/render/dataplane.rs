//! presence-service's environment and the Deployment + Service that run it.
//!
//! `env` is the one place that turns a region into presence-service
//! settings; Kubernetes and `presence-operator dev` both use it.

use super::{Scope, meta, pod_meta, region_selector, secrets};
use crate::crd::{LogLevel, PresenceClusterSpec, Region, Role};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use presence_contract::env;
use std::collections::BTreeMap;

/// HTTP port of presence-service in Kubernetes.
pub const HTTP_PORT: u16 = 8080;

/// Where an environment value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvValue {
    Literal(String),
    /// The pod's name (a unique node ID per replica).
    PodName,
    Secret(SecretKeySelector),
}

/// What differs between a Kubernetes pod and a local process.
#[derive(Debug, Clone)]
pub struct EnvParams {
    pub nats_url: String,
    pub service_port: u16,
    pub node_id: EnvValue,
    pub jwt_secret: EnvValue,
    pub log_format: &'static str,
    /// Path of the file holding presence-service's NATS nkey seed.
    pub nkey_seed_file: String,
    /// Path of the NATS servers' CA, when client ports take TLS.
    pub tls_ca: Option<String>,
}

/// Where presence-service's NATS seed is mounted in its pods.
const NATS_SECRET_DIR: &str = "/etc/presence-nats";
/// Where the NATS CA is mounted in its pods (with client TLS).
const NATS_TLS_DIR: &str = "/etc/presence-nats-tls";

/// CPU and memory requested for a presence-service pod whose spec names
/// no `resources`: its default 64 MiB cache and the runtime fit in 128Mi.
pub const DEFAULT_REQUESTS: (&str, &str) = ("100m", "128Mi");

/// Seconds a deleted pod keeps serving, not ready, before it closes its
/// listener: Endpoints drop it when it is told to stop, and kube-proxy,
/// ingresses and cloud load balancers follow a few seconds later.
pub const SHUTDOWN_DELAY_SECS: u32 = 5;
/// Longest a stopping pod then waits for its in-flight requests.
pub const SHUTDOWN_TIMEOUT_SECS: u32 = 25;
/// The pod's grace period: the delay, the in-flight wait, and a margin
/// before the kubelet's SIGKILL.
const TERMINATION_GRACE_SECS: u32 = SHUTDOWN_DELAY_SECS + SHUTDOWN_TIMEOUT_SECS + 5;

/// A CRD list as its presence-service variable holds it: the items joined
/// with commas (the service splits and trims them again).
pub(super) fn env_list(list: &Option<Vec<String>>) -> Option<String> {
    list.as_ref().map(|items| items.join(","))
}

fn literal(value: impl Into<String>) -> EnvValue {
    EnvValue::Literal(value.into())
}

/// presence-service's environment for `region`, in a fixed order.
pub fn env(
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    p: &EnvParams,
) -> Vec<(&'static str, EnvValue)> {
    let mut env = vec![
        (env::NODE_TYPE, literal(region.role.as_str())),
        (env::NODE_ID, p.node_id.clone()),
        (env::SERVICE_HOST, literal("0.0.0.0")),
        (env::SERVICE_PORT, literal(p.service_port.to_string())),
        (env::NATS_URL, literal(p.nats_url.clone())),
        (env::NATS_JS_DOMAIN, literal(spec.js_domain())),
        (env::NATS_NKEY_SEED_FILE, literal(p.nkey_seed_file.clone())),
        (env::KV_BUCKET, literal(spec.bucket())),
        (env::JWT_SECRET, p.jwt_secret.clone()),
        (
            env::CACHE_MAX_COST,
            literal(region.cache_max_cost.to_string()),
        ),
    ];
    if let Some(ca) = &p.tls_ca {
        env.push((env::NATS_TLS_CA, literal(ca.clone())));
    }
    // Only the center creates the bucket; leaving this out of leaves keeps a
    // hub resize from rolling every region.
    if region.role == Role::Center {
        env.push((env::KV_REPLICAS, literal(spec.kv_replicas().to_string())));
    }
    if let Some(auth) = &spec.auth {
        if let Some(iss) = &auth.issuer {
            env.push((env::JWT_ISSUER, literal(iss.clone())));
        }
        if let Some(aud) = &auth.audience {
            env.push((env::JWT_AUDIENCE, literal(aud.clone())));
        }
    }
    let shared = spec.dataplane.as_ref();
    let level = match shared.and_then(|d| d.log_level).unwrap_or(LogLevel::Info) {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    };
    env.push((env::LOG_LEVEL, literal(level)));
    env.push((env::LOG_FORMAT, literal(p.log_format)));
    env.push((
        env::SHUTDOWN_DELAY_SECS,
        literal(SHUTDOWN_DELAY_SECS.to_string()),
    ));
    env.push((
        env::SHUTDOWN_TIMEOUT_SECS,
        literal(SHUTDOWN_TIMEOUT_SECS.to_string()),
    ));
    if let Some(cors) = shared.and_then(|d| d.cors.as_ref()) {
        if let Some(enabled) = cors.enabled {
            env.push((env::CORS_ENABLED, literal(enabled.to_string())));
        }
        if let Some(origins) = env_list(&cors.allowed_origins) {
            env.push((env::CORS_ALLOWED_ORIGINS, literal(origins)));
        }
        if let Some(methods) = env_list(&cors.allowed_methods) {
            env.push((env::CORS_ALLOWED_METHODS, literal(methods)));
        }
        if let Some(headers) = env_list(&cors.allowed_headers) {
            env.push((env::CORS_ALLOWED_HEADERS, literal(headers)));
        }
        if let Some(credentials) = cors.allow_credentials {
            env.push((
                env::CORS_ALLOW_CREDENTIALS,
                literal(credentials.to_string()),
            ));
        }
        if let Some(max_age) = cors.max_age_seconds {
            env.push((env::CORS_MAX_AGE, literal(max_age.to_string())));
        }
    }
    if let Some(limit) = shared.and_then(|d| d.rate_limit.as_ref()) {
        if let Some(rate) = limit.writes_per_second {
            env.push((env::RATE_LIMIT_WRITES_PER_SECOND, literal(rate.to_string())));
        }
        if let Some(burst) = limit.burst {
            env.push((env::RATE_LIMIT_BURST, literal(burst.to_string())));
        }
    }
    if let Some(streams) = shared.and_then(|d| d.streams.as_ref()) {
        if let Some(max) = streams.max_connections {
            env.push((env::STREAM_MAX_CONNECTIONS, literal(max.to_string())));
            // Streams are connections too: at their cap they must leave
            // room under the HTTP cap for reads and writes.
            let streams = usize::try_from(max).unwrap_or_default();
            let http = presence_contract::rules::http_connections_for_streams(streams);
            env.push((env::HTTP_MAX_CONNECTIONS, literal(http.to_string())));
        }
        if let Some(seconds) = streams.keep_alive_seconds {
            env.push((env::STREAM_KEEPALIVE_SECS, literal(seconds.to_string())));
        }
        if let Some(follows) = streams.max_follows {
            env.push((env::STREAM_MAX_FOLLOWS, literal(follows.to_string())));
        }
    }
    env
}

fn env_var(name: &str, value: EnvValue) -> EnvVar {
    let value_from = |source| EnvVar {
        name: name.into(),
        value_from: Some(source),
        ..Default::default()
    };
    match value {
        EnvValue::Literal(v) => EnvVar {
            name: name.into(),
            value: Some(v),
            ..Default::default()
        },
        EnvValue::PodName => value_from(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        EnvValue::Secret(selector) => value_from(EnvVarSource {
            secret_key_ref: Some(selector),
            ..Default::default()
        }),
    }
}

/// Deployment and Service of a region's presence-service.
pub fn objects(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    inputs: &super::Inputs,
) -> (Deployment, Service) {
    let name = ctx.names.dataplane(region.name);
    let params = EnvParams {
        nats_url: format!(
            "nats://{}:{}",
            super::nats::client_host(ctx, region.name),
            super::nats::CLIENT_PORT
        ),
        service_port: HTTP_PORT,
        node_id: EnvValue::PodName,
        jwt_secret: EnvValue::Secret(secrets::jwt_secret_source(ctx, spec)),
        log_format: "json",
        nkey_seed_file: format!("{NATS_SECRET_DIR}/{}", secrets::SEED_KEY),
        tls_ca: spec.client_tls().then(|| format!("{NATS_TLS_DIR}/ca.crt")),
    };
    let env: Vec<EnvVar> = env(spec, region, &params)
        .into_iter()
        .map(|(name, value)| env_var(name, value))
        .collect();
    let mut digests = vec![inputs.jwt_secret_digest.clone().unwrap_or_default()];
    if let Some(ids) = &inputs.nats {
        digests.push(ids.digest(&ctx.names.nats_presence_secret()).to_owned());
        if spec.client_tls() {
            // Only the CA is mounted: a renewed certificate doesn't roll these pods.
            let tls = super::nats::tls_secret_name(ctx, spec);
            digests.push(ids.digest(&format!("{tls}/ca.crt")).to_owned());
        }
    }
    let annotations = BTreeMap::from([(
        format!("{}/config-hash", crate::crd::GROUP),
        pod_config_hash(&env, &digests),
    )]);
    let mut container = container(spec, region, env);
    let (mounts, volumes) = nats_secret_volumes(ctx, spec);
    container.volume_mounts = Some(mounts);
    let selector = region_selector(ctx, COMPONENT, region.name);
    let deployment = Deployment {
        metadata: meta(ctx, &name, COMPONENT, Some(region.name)),
        spec: DeploymentSpec {
            // Under autoscaling the HorizontalPodAutoscaler owns replicas.
            replicas: region
                .autoscaling
                .is_none()
                .then_some(region.dataplane_replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: {
                let mut meta = pod_meta(ctx, COMPONENT, region.name, annotations);
                let mut pod = PodSpec {
                    volumes: Some(volumes),
                    ..pod_spec(ctx, region, container)
                };
                super::placement::apply(ctx, region, COMPONENT, &mut meta, &mut pod);
                PodTemplateSpec {
                    metadata: Some(meta),
                    spec: Some(pod),
                }
            },
            ..Default::default()
        },
        ..Default::default()
    };
    (deployment, service(ctx, region, &name, selector))
}

/// The `app.kubernetes.io/component` of presence-service objects.
const COMPONENT: &str = "dataplane";

/// The environment is in the pod spec already; what the hash adds is the
/// JWT secret's content, which the pod spec only names.
fn pod_config_hash(env: &[EnvVar], secret_digests: &[String]) -> String {
    let mut hashed = serde_json::to_vec(env).unwrap_or_default();
    for digest in secret_digests {
        hashed.extend(digest.bytes());
    }
    super::config_hash(&hashed)
}

/// The NATS seed (and, with client TLS, the servers' CA) as read-only files.
fn nats_secret_volumes(ctx: &Scope, spec: &PresenceClusterSpec) -> (Vec<VolumeMount>, Vec<Volume>) {
    let secret_volume = |name: &str, secret: String, key: &str| Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: key.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let mut mounts = vec![mount("nats-identity", NATS_SECRET_DIR)];
    let mut volumes = vec![secret_volume(
        "nats-identity",
        ctx.names.nats_presence_secret(),
        secrets::SEED_KEY,
    )];
    if spec.client_tls() {
        mounts.push(mount("nats-tls", NATS_TLS_DIR));
        volumes.push(secret_volume(
            "nats-tls",
            super::nats::tls_secret_name(ctx, spec),
            "ca.crt",
        ));
    }
    (mounts, volumes)
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn container(spec: &PresenceClusterSpec, region: &Region<'_>, env: Vec<EnvVar>) -> Container {
    Container {
        name: "presence-service".into(),
        image: Some(spec.dataplane_image().to_owned()),
        image_pull_policy: super::pull_policy(spec),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(HTTP_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(super::resources_or(
            region.dataplane_resources,
            DEFAULT_REQUESTS,
        )),
        readiness_probe: Some(probe("/health/readiness", 5, 2)),
        liveness_probe: Some(probe("/health/liveness", 10, 3)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            ..super::locked_down()
        }),
        ..Default::default()
    }
}

fn pod_spec(ctx: &Scope, region: &Region<'_>, container: Container) -> PodSpec {
    PodSpec {
        containers: vec![container],
        termination_grace_period_seconds: Some(i64::from(TERMINATION_GRACE_SECS)),
        enable_service_links: Some(false),
        automount_service_account_token: Some(false),
        affinity: Some(super::spread_affinity(ctx, COMPONENT, region.name)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service(
    ctx: &Scope,
    region: &Region<'_>,
    name: &str,
    selector: BTreeMap<String, String>,
) -> Service {
    Service {
        metadata: meta(ctx, name, COMPONENT, Some(region.name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
