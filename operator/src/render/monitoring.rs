//! Scraping by the Prometheus Operator: a PodMonitor per region for its
//! presence-service and (with the sidecar) its NATS servers, and the
//! prometheus-nats-exporter sidecar itself, as the NATS Helm chart runs it.

use super::{Scope, meta, region_selector};
use crate::crd::{PresenceClusterSpec, Region, Role};
use k8s_openapi::api::core::v1::{Container, ContainerPort, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use std::collections::BTreeMap;

/// Port of the exporter's `/metrics`.
pub const EXPORTER_PORT: u16 = 7777;
/// Scrape interval when the spec names none.
const DEFAULT_INTERVAL: &str = "30s";

/// The PodMonitor kind of the Prometheus Operator.
pub fn pod_monitor_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "monitoring.coreos.com",
        "v1",
        "PodMonitor",
    ))
}

/// The exporter sidecar of a NATS server (chart arguments: connections,
/// routes, subscriptions, server and leafnode stats, JetStream at the hub;
/// metric names prefixed `nats_`).
pub fn exporter_sidecar(spec: &PresenceClusterSpec, region: &Region<'_>) -> Container {
    let mut args = vec![
        format!("-port={EXPORTER_PORT}"),
        "-connz".into(),
        "-routez".into(),
        "-subz".into(),
        "-varz".into(),
        "-prefix=nats".into(),
        "-use_internal_server_id".into(),
    ];
    if region.role == Role::Center {
        args.push("-jsz=all".into());
    }
    args.push("-leafz".into());
    args.push(format!("http://localhost:{}/", super::nats::MONITOR_PORT));
    Container {
        name: "prom-exporter".into(),
        image: Some(spec.nats_exporter_image().to_owned()),
        image_pull_policy: super::pull_policy(spec),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("prom-metrics".into()),
            container_port: i32::from(EXPORTER_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(exporter_resources()),
        security_context: Some(super::locked_down()),
        ..Default::default()
    }
}

/// The sidecar's share of its pod: it scrapes one local server every few
/// seconds (about 15 MiB in use). Requests and limits, so that namespaces
/// whose quota requires them schedule the pod, and so that it can never
/// take memory or much CPU from the NATS server beside it.
fn exporter_resources() -> ResourceRequirements {
    let quantity = |q: &str| Quantity(q.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), quantity("10m")),
            ("memory".to_owned(), quantity("32Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), quantity("100m")),
            ("memory".to_owned(), quantity("64Mi")),
        ])),
        ..Default::default()
    }
}

/// Relabelings that give every series the `region` and `presencecluster`
/// labels the dashboard and alerts group by.
fn relabelings() -> serde_json::Value {
    json!([
        {"sourceLabels": ["__meta_kubernetes_pod_label_presencecluster_io_region"], "targetLabel": "region"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"], "targetLabel": "presencecluster"},
    ])
}

fn pod_monitor(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    (name, component, region): (&str, &str, &str),
    port: &str,
) -> DynamicObject {
    let monitoring = spec.monitoring.as_ref();
    let interval = monitoring
        .and_then(|m| m.interval.as_deref())
        .unwrap_or(DEFAULT_INTERVAL);
    let mut metadata = meta(scope, name, component, Some(region));
    if let Some(extra) = monitoring.and_then(|m| m.labels.as_ref()) {
        let labels = metadata.labels.get_or_insert_with(Default::default);
        for (k, v) in extra {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let mut object = DynamicObject::new(name, &pod_monitor_resource()).data(json!({
        "spec": {
            "selector": {"matchLabels": region_selector(scope, component, region)},
            "podMetricsEndpoints": [{
                "port": port,
                "path": "/metrics",
                "interval": interval,
                "relabelings": relabelings(),
            }],
        }
    }));
    object.metadata = metadata;
    object
}

/// The PodMonitors of a region: presence-service always, NATS with the
/// sidecar. None unless monitoring is enabled.
pub fn pod_monitors(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
) -> Vec<DynamicObject> {
    if !spec.monitoring_enabled() {
        return Vec::new();
    }
    let mut out = vec![pod_monitor(
        scope,
        spec,
        (
            &scope.names.dataplane(region.name),
            "dataplane",
            region.name,
        ),
        "http",
    )];
    if spec.nats_exporter_enabled() {
        out.push(pod_monitor(
            scope,
            spec,
            (&scope.names.nats(region.name), "nats", region.name),
            "prom-metrics",
        ));
    }
    out
}
