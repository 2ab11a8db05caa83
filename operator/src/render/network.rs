//! NetworkPolicies that fence each region: who may reach its NATS ports
//! and its presence API. Ingress only; a pod selected by a policy takes
//! nothing it doesn't allow.

use super::{Scope, meta, region_selector};
use crate::crd::{GROUP, PresenceClusterSpec, Region, Role};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// Namespace of the operator when the renderer isn't told (the install's).
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "presence-system";

fn selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    }
}

/// The operator's pods, in its own namespace.
fn operator(namespace: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(selector(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            namespace.to_owned(),
        )]))),
        pod_selector: Some(selector(BTreeMap::from([(
            "app.kubernetes.io/name".to_owned(),
            "presence-operator".to_owned(),
        )]))),
        ..Default::default()
    }
}

/// Pods of this PresenceCluster in its namespace matching `extra`.
fn own_pods(scope: &Scope, extra: &[(&str, &str)]) -> NetworkPolicyPeer {
    let mut labels =
        BTreeMap::from([("app.kubernetes.io/instance".to_owned(), scope.name.clone())]);
    for (k, v) in extra {
        labels.insert((*k).to_owned(), (*v).to_owned());
    }
    NetworkPolicyPeer {
        pod_selector: Some(selector(labels)),
        ..Default::default()
    }
}

/// A rule admitting `from` (anyone when `None`) to the named `ports`.
fn rule(ports: &[&str], from: Option<Vec<NetworkPolicyPeer>>) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        ports: Some(
            ports
                .iter()
                .map(|p| NetworkPolicyPort {
                    port: Some(IntOrString::String((*p).to_owned())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        from,
    }
}

fn policy(
    scope: &Scope,
    name: &str,
    component: &str,
    region: &str,
    rules: Vec<NetworkPolicyIngressRule>,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(scope, name, component, Some(region)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(region_selector(scope, component, region))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(rules),
            ..Default::default()
        }),
    }
}

/// Who may scrape (`networkPolicy.metricsFrom`): nobody when unset.
pub(super) fn metrics_from(spec: &PresenceClusterSpec) -> Vec<NetworkPolicyPeer> {
    spec.network_policy
        .as_ref()
        .and_then(|n| n.metrics_from.clone())
        .unwrap_or_default()
}

/// Who may call the API (`networkPolicy.apiFrom`): anyone when unset.
pub(super) fn api_from(spec: &PresenceClusterSpec) -> Option<Vec<NetworkPolicyPeer>> {
    spec.network_policy
        .as_ref()
        .and_then(|n| n.api_from.clone())
}

/// The policy of a region's NATS servers.
pub fn nats_policy(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
    operator_namespace: &str,
) -> Option<NetworkPolicy> {
    if !spec.network_policies_enabled() {
        return None;
    }
    let region_label = format!("{GROUP}/region");
    let own_presence = own_pods(
        scope,
        &[
            ("app.kubernetes.io/component", "dataplane"),
            (&region_label, region.name),
        ],
    );
    let mut rules = vec![rule(
        &["client"],
        Some(vec![own_presence, operator(operator_namespace)]),
    )];
    if region.role == Role::Center {
        // Leaf servers of this PresenceCluster (any leaf region).
        let leaves: Vec<NetworkPolicyPeer> = spec
            .leaves
            .iter()
            .map(|l| {
                own_pods(
                    scope,
                    &[
                        ("app.kubernetes.io/component", "nats"),
                        (&region_label, &l.name),
                    ],
                )
            })
            .collect();
        if spec.leafnodes_exposed() {
            // Exposed for leaves in other clusters: from anywhere (they
            // still need a seed the hub knows, and TLS).
            rules.push(rule(&["leafnodes"], None));
        } else if !leaves.is_empty() {
            rules.push(rule(&["leafnodes"], Some(leaves)));
        }
    }
    if region.role == Role::Center || region.nats_replicas > 1 {
        let peers = own_pods(
            scope,
            &[
                ("app.kubernetes.io/component", "nats"),
                (&region_label, region.name),
            ],
        );
        rules.push(rule(&["cluster"], Some(vec![peers])));
    }
    let mut monitor_from = vec![operator(operator_namespace)];
    monitor_from.extend(metrics_from(spec));
    rules.push(rule(&["monitor"], Some(monitor_from)));
    if spec.nats_exporter_enabled() && !metrics_from(spec).is_empty() {
        rules.push(rule(&["prom-metrics"], Some(metrics_from(spec))));
    }
    Some(policy(
        scope,
        &scope.names.nats(region.name),
        "nats",
        region.name,
        rules,
    ))
}

/// The policy of a region's presence-service: its API from `apiFrom`
/// (anyone by default) and Prometheus.
pub fn dataplane_policy(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    region: &Region<'_>,
) -> Option<NetworkPolicy> {
    if !spec.network_policies_enabled() {
        return None;
    }
    let from = api_from(spec).map(|mut peers| {
        peers.extend(metrics_from(spec));
        peers
    });
    let rules = vec![rule(&["http"], from)];
    Some(policy(
        scope,
        &scope.names.dataplane(region.name),
        "dataplane",
        region.name,
        rules,
    ))
}
