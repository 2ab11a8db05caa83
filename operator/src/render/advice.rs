//! Specs that are valid and render, but that will probably not do what
//! their author wants: a drain that cuts a region off, dashboards that stay
//! empty. Not errors (a test cluster may want exactly that), so the
//! operator reports them as Warning Events and `render` prints them. Pure.

use super::network;
use crate::crd::{PresenceClusterSpec, Region, Role};

/// One piece of advice about `spec`, in the regions' order: about the
/// regions that run in the cluster `here` (`None`: all of them).
pub fn advice(spec: &PresenceClusterSpec, here: Option<&str>) -> Vec<String> {
    let mut notes: Vec<String> = spec
        .regions()
        .iter()
        .filter(|region| super::is_here(region, here))
        .flat_map(single_points)
        .collect();
    if let Some(note) = unscrapable_metrics(spec) {
        notes.push(note);
    }
    notes
}

/// What one pod's eviction (a `kubectl drain`, a node upgrade) does to a
/// region that runs only that pod.
fn single_points(region: &Region<'_>) -> Vec<String> {
    let mut notes = Vec::new();
    if region.nats_replicas == 1 {
        notes.push(match region.role {
            Role::Center => format!(
                "region {}: a single hub NATS server; a drain of its node stops every write \
                 until it runs elsewhere (center.replicas: 3 and kv.replicas: 3 survive it)",
                region.name
            ),
            Role::Leaf => format!(
                "region {}: a single leaf NATS server; a drain of its node cuts the region off \
                 until it runs elsewhere (leaves[].nats.replicas: 2 survives it)",
                region.name
            ),
        });
    }
    let api_pods = match &region.autoscaling {
        Some(autoscaling) => autoscaling.min_replicas,
        None => region.dataplane_replicas,
    };
    if api_pods == 1 {
        notes.push(format!(
            "region {}: a single presence-service pod; a drain or rollout leaves the region \
             without a ready API pod until its replacement has filled its cache \
             (about 8 s per million presences); run two or more",
            region.name
        ));
    }
    notes
}

/// PodMonitors are rendered, but the NetworkPolicies let no scraper in.
fn unscrapable_metrics(spec: &PresenceClusterSpec) -> Option<String> {
    if !(spec.monitoring_enabled()
        && spec.network_policies_enabled()
        && network::metrics_from(spec).is_empty())
    {
        return None;
    }
    let api_fenced = network::api_from(spec).is_some_and(|peers| !peers.is_empty());
    let fenced: Vec<&str> = [
        (spec.nats_exporter_enabled(), "the NATS exporter (7777)"),
        (api_fenced, "presence-service's /metrics"),
    ]
    .into_iter()
    .filter_map(|(blocked, what)| blocked.then_some(what))
    .collect();
    (!fenced.is_empty()).then(|| {
        format!(
            "spec.monitoring is on but spec.networkPolicy.metricsFrom is empty: the \
             NetworkPolicies let no Prometheus reach {}; add its namespace to metricsFrom",
            fenced.join(" or ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> PresenceClusterSpec {
        serde_json::from_value(value).expect("a spec")
    }

    #[test]
    fn single_pods_are_named_by_region() {
        let notes = advice(
            &spec(json!({
                "center": {"replicas": 3},
                "leaves": [
                    {"name": "eu", "nats": {"replicas": 2}},
                    {"name": "us", "dataplane": {"replicas": 1}},
                    {"name": "ap", "nats": {"replicas": 2},
                     "dataplane": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}}
                ]
            })),
            None,
        );
        assert_eq!(notes.len(), 3, "{notes:#?}");
        assert!(notes[0].starts_with("region us: a single leaf NATS server"));
        assert!(notes[1].starts_with("region us: a single presence-service pod"));
        assert!(notes[2].starts_with("region ap: a single presence-service pod"));
        // The defaults: one hub server, two API pods per region.
        let minimal = advice(&spec(json!({"center": {}})), None);
        assert_eq!(minimal.len(), 1, "{minimal:#?}");
        assert!(minimal[0].contains("a single hub NATS server"));
        // Each cluster's operator speaks of its own regions only.
        let spread = spec(json!({
            "center": {"replicas": 3, "cluster": "hub"},
            "leaves": [{"name": "eu", "cluster": "eu"}, {"name": "us", "cluster": "us"}]
        }));
        let in_eu = advice(&spread, Some("eu"));
        assert_eq!(in_eu.len(), 1, "{in_eu:#?}");
        assert!(in_eu[0].starts_with("region eu:"));
        assert!(advice(&spread, Some("hub")).is_empty());
    }

    #[test]
    fn monitoring_behind_closed_network_policies_is_pointed_out() {
        let ha = json!({"replicas": 3});
        let with = |extra: serde_json::Value| {
            let mut value = json!({"center": ha, "monitoring": {"enabled": true}});
            if let (Some(map), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
                map.extend(extra.clone());
            }
            advice(&spec(value), None)
        };
        let closed = with(json!({}));
        assert_eq!(closed.len(), 1, "{closed:#?}");
        assert!(
            closed[0].contains("the NATS exporter (7777)"),
            "{closed:#?}"
        );
        let scraper = json!([{"namespaceSelector": {}}]);
        assert!(with(json!({"networkPolicy": {"metricsFrom": scraper}})).is_empty());
        assert!(with(json!({"networkPolicy": {"enabled": false}})).is_empty());
        // Without the exporter only a fenced API keeps Prometheus out.
        let no_exporter = json!({"monitoring": {"enabled": true, "natsExporter": false}});
        assert!(with(no_exporter.clone()).is_empty());
        let mut fenced = no_exporter;
        fenced["networkPolicy"] = json!({"apiFrom": scraper});
        let notes = with(fenced);
        assert_eq!(notes.len(), 1, "{notes:#?}");
        assert!(notes[0].contains("presence-service's /metrics"));
    }
}
