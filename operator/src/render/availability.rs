//! PodDisruptionBudgets and HorizontalPodAutoscalers: what keeps a region
//! serving through a `kubectl drain` and what sizes it under load.

use super::{Scope, meta, region_selector};
use crate::crd::{Autoscaling, Region, Role};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// One pod of the selected set may be voluntarily disrupted at a time.
fn max_one_unavailable(
    scope: &Scope,
    name: &str,
    component: &str,
    region: &str,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(scope, name, component, Some(region)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(region_selector(scope, component, region)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The budget of a region's NATS servers: always for the hub (a drain must
/// never take two of three servers and with them the JetStream quorum), and
/// for a leaf that runs more than one server. A single leaf server gets
/// none: a budget it could never satisfy would block every drain.
pub fn nats_budget(scope: &Scope, region: &Region<'_>) -> Option<PodDisruptionBudget> {
    (region.role == Role::Center || region.nats_replicas > 1)
        .then(|| max_one_unavailable(scope, &scope.names.nats(region.name), "nats", region.name))
}

/// The budget of a region's presence-service, when it runs more than one pod.
pub fn dataplane_budget(scope: &Scope, region: &Region<'_>) -> Option<PodDisruptionBudget> {
    let fewest = region
        .autoscaling
        .map_or(region.dataplane_replicas, |a| a.min_replicas);
    (fewest > 1).then(|| {
        max_one_unavailable(
            scope,
            &scope.names.dataplane(region.name),
            "dataplane",
            region.name,
        )
    })
}

/// The autoscaler of a region's presence-service, when autoscaling is on.
pub fn dataplane_autoscaler(scope: &Scope, region: &Region<'_>) -> Option<HorizontalPodAutoscaler> {
    let Autoscaling {
        min_replicas,
        max_replicas,
        target_cpu_utilization_percentage,
    } = region.autoscaling?;
    let name = scope.names.dataplane(region.name);
    Some(HorizontalPodAutoscaler {
        metadata: meta(scope, &name, "dataplane", Some(region.name)),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(min_replicas),
            max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(target_cpu_utilization_percentage),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    })
}
