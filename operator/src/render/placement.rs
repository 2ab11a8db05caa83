//! Where a region's pods run: its `placement` (node selector, tolerations,
//! affinity, topology spread, priority, extra labels and annotations, pull
//! secrets) applied to a pod template, over the operator's defaults (spread
//! across hosts; the hub also across zones).

use super::{Scope, region_selector};
use crate::crd::{PlacementSpec, Region, Role};
use k8s_openapi::api::core::v1::{PodSpec, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

/// Spread the hub's servers over zones and hosts, as evenly as the
/// cluster allows (never blocking scheduling on a single-zone cluster).
fn default_hub_spread(scope: &Scope, region: &str) -> Vec<TopologySpreadConstraint> {
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(region_selector(scope, "nats", region)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// Applies `region`'s placement to the pod template of `component`.
pub fn apply(
    scope: &Scope,
    region: &Region<'_>,
    component: &str,
    meta: &mut ObjectMeta,
    pod: &mut PodSpec,
) {
    if component == "nats" && region.role == Role::Center {
        pod.topology_spread_constraints = Some(default_hub_spread(scope, region.name));
    }
    let Some(p) = region.placement else {
        return;
    };
    apply_scheduling(scope, region, component, p, pod);
    if let Some(extra) = &p.pod_labels {
        let labels = meta.labels.get_or_insert_with(Default::default);
        for (k, v) in extra {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    if let Some(extra) = &p.pod_annotations {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        for (k, v) in extra {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

fn apply_scheduling(
    scope: &Scope,
    region: &Region<'_>,
    component: &str,
    p: &PlacementSpec,
    pod: &mut PodSpec,
) {
    if p.node_selector.is_some() {
        pod.node_selector = p.node_selector.clone();
    }
    if p.tolerations.is_some() {
        pod.tolerations = p.tolerations.clone();
    }
    if p.affinity.is_some() {
        pod.affinity = p.affinity.clone();
    }
    if let Some(constraints) = &p.topology_spread_constraints {
        let own = region_selector(scope, component, region.name);
        pod.topology_spread_constraints = Some(
            constraints
                .iter()
                .cloned()
                .map(|mut c| {
                    if c.label_selector.is_none() {
                        c.label_selector = Some(LabelSelector {
                            match_labels: Some(own.clone()),
                            ..Default::default()
                        });
                    }
                    c
                })
                .collect(),
        );
    }
    if p.priority_class_name.is_some() {
        pod.priority_class_name = p.priority_class_name.clone();
    }
    if p.image_pull_secrets.is_some() {
        pod.image_pull_secrets = p.image_pull_secrets.clone();
    }
}
