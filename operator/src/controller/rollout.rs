//! Whether a workload's pods all run its current spec, after the rules of
//! `kubectl rollout status` (a StatefulSet's revisions must also agree,
//! which kubectl checks only without a partition). A ready count alone
//! still counts the old pods of a rollout in progress: right after an edit
//! that rolls pods, the status would say Ready (and Argo CD Healthy)
//! before any pod runs it. Pure, so every rule is unit tested.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};

/// Whether the Deployment still has pods of an older spec, or has not
/// seen its latest spec yet. Pods of the current spec that are not ready
/// yet are the ready count's business, not a rollout. A generation the API
/// server didn't report counts as 0 (only test doubles leave it out).
pub fn deployment_rolling(deployment: &Deployment) -> bool {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let Some(status) = &deployment.status else {
        return generation > 0;
    };
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    status.observed_generation.unwrap_or(0) < generation
        || updated < wanted
        // Old pods still running (or terminating) beside the new ones.
        || status.replicas.unwrap_or(0) > updated
}

/// Whether the Deployment's controller gave up waiting for its rollout:
/// its `Progressing` condition is `False` with `ProgressDeadlineExceeded`
/// (new pods that never become ready: a bad image, a crash loop, no room).
pub fn deployment_stalled(deployment: &Deployment) -> bool {
    deployment
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_.as_deref() == Some("Progressing")
                && c.status.as_deref() == Some("False")
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
}

/// Whether the StatefulSet still has pods of an older revision, or has not
/// seen its latest spec yet (`OnDelete` updates are the user's to finish).
pub fn stateful_set_rolling(set: &StatefulSet) -> bool {
    let generation = set.metadata.generation.unwrap_or(0);
    let Some(status) = &set.status else {
        return generation > 0;
    };
    if status.observed_generation.unwrap_or(0) < generation {
        return true;
    }
    let strategy = set.spec.update_strategy.as_ref();
    if strategy.and_then(|s| s.type_.as_deref()) == Some("OnDelete") {
        return false;
    }
    let wanted = set.spec.replicas.unwrap_or(1);
    let partition = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    if partition > 0 {
        return status.updated_replicas.unwrap_or(0) < wanted - partition;
    }
    status.update_revision != status.current_revision
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn deployment(generation: i64, replicas: i32, status: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d", "generation": generation},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": status,
        }))
        .expect("a Deployment")
    }

    fn stateful_set(generation: i64, replicas: i32, strategy: Value, status: Value) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "s", "generation": generation},
            "spec": {"replicas": replicas, "selector": {}, "template": {}, "serviceName": "s",
                     "updateStrategy": strategy},
            "status": status,
        }))
        .expect("a StatefulSet")
    }

    #[test]
    fn a_deployment_is_rolled_out_when_every_pod_runs_the_observed_spec() {
        let done = json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2,
                          "readyReplicas": 2, "availableReplicas": 2});
        assert!(!deployment_rolling(&deployment(3, 2, done.clone())));
        // The edit is not seen yet: the old pods are all ready.
        assert!(deployment_rolling(&deployment(4, 2, done)));
        // Two old pods ready, one new one coming up.
        let midway = json!({"observedGeneration": 4, "replicas": 3, "updatedReplicas": 1,
                            "readyReplicas": 2, "availableReplicas": 2});
        assert!(deployment_rolling(&deployment(4, 2, midway)));
        // Every pod updated, an old one still terminating.
        let leaving = json!({"observedGeneration": 4, "replicas": 3, "updatedReplicas": 2,
                             "readyReplicas": 2, "availableReplicas": 2});
        assert!(deployment_rolling(&deployment(4, 2, leaving)));
        // Every pod of the new spec, one not ready yet: the ready count
        // tells that, not the rollout.
        let starting = json!({"observedGeneration": 4, "replicas": 2, "updatedReplicas": 2,
                              "readyReplicas": 1, "availableReplicas": 1});
        assert!(!deployment_rolling(&deployment(4, 2, starting)));
        // Just created: no status yet.
        let created: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "d", "generation": 1}, "spec": {"selector": {}, "template": {}}
        }))
        .expect("a Deployment");
        assert!(deployment_rolling(&created));
    }

    #[test]
    fn a_deployment_past_its_progress_deadline_is_stalled() {
        let condition = |status: &str, reason: &str| {
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1,
                   "conditions": [{"type": "Progressing", "status": status, "reason": reason}]})
        };
        let stalled = deployment(2, 2, condition("False", "ProgressDeadlineExceeded"));
        assert!(deployment_stalled(&stalled) && deployment_rolling(&stalled));
        let going = deployment(2, 2, condition("True", "ReplicaSetUpdated"));
        assert!(!deployment_stalled(&going));
        assert!(!deployment_stalled(&deployment(1, 1, json!({}))));
    }

    #[test]
    fn a_stateful_set_is_rolled_out_when_its_revisions_agree() {
        let rolling = json!({"type": "RollingUpdate"});
        let done = json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3,
                          "updatedReplicas": 3, "currentRevision": "s-2", "updateRevision": "s-2"});
        assert!(!stateful_set_rolling(&stateful_set(
            2,
            3,
            rolling.clone(),
            done.clone()
        )));
        assert!(stateful_set_rolling(&stateful_set(
            3,
            3,
            rolling.clone(),
            done
        )));
        let midway = json!({"observedGeneration": 3, "replicas": 3, "readyReplicas": 3,
                            "updatedReplicas": 1, "currentRevision": "s-2", "updateRevision": "s-3"});
        assert!(stateful_set_rolling(&stateful_set(
            3,
            3,
            rolling,
            midway.clone()
        )));
        // OnDelete: pods change only when someone deletes them.
        let on_delete = json!({"type": "OnDelete"});
        assert!(!stateful_set_rolling(&stateful_set(
            3,
            3,
            on_delete,
            midway.clone()
        )));
        // A partition holds back the pods below it on purpose.
        let partitioned = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
        assert!(!stateful_set_rolling(&stateful_set(
            3,
            3,
            partitioned,
            midway
        )));
    }
}
