//! The hub's JetStream volumes can grow where the StorageClass allows volume
//! expansion, and never shrink. A StatefulSet's volume claim template can't
//! change once created, so the operator keeps applying the size it was
//! created with and resizes each server's PersistentVolumeClaim instead.

use super::{Context, Error};
use crate::crd::PresenceCluster;
use crate::render::{self, nats::quantity_bytes};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};

/// Options that keep GitOps tools from deleting the hub's volume claims,
/// by annotation. The StatefulSet makes the claims from its template, with
/// the PresenceCluster's `app.kubernetes.io/instance` label and no owner,
/// so Argo CD's label tracking, when its Application has the
/// PresenceCluster's name, takes them for its own resources missing from
/// Git: out of sync, pruned by a sync that prunes, and deleted with the
/// Application (the bucket's data with them). The template can't change
/// once the StatefulSet exists, so the live claims are marked.
pub const GITOPS_KEEP: [(&str, &[&str]); 2] = [
    (
        "argocd.argoproj.io/sync-options",
        &["Prune=false", "Delete=false"],
    ),
    ("argocd.argoproj.io/compare-options", &["IgnoreExtraneous"]),
];

/// The annotations to set on a claim that has `current` ones, so that it
/// carries every [`GITOPS_KEEP`] option (an option of the same name is
/// replaced, any other kept); `None` when it does already. Pure.
pub fn gitops_annotations(
    current: &std::collections::BTreeMap<String, String>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut patch = serde_json::Map::new();
    for (key, wanted) in GITOPS_KEEP {
        let have: Vec<&str> = current
            .get(key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if wanted.iter().all(|w| have.contains(w)) {
            continue;
        }
        let mut options: Vec<&str> = have
            .into_iter()
            .filter(|o| wanted.iter().all(|w| option_name(w) != option_name(o)))
            .collect();
        options.extend(wanted.iter().copied());
        patch.insert(key.to_owned(), options.join(",").into());
    }
    (!patch.is_empty()).then_some(patch)
}

/// The name of an Argo CD option (`Prune` of `Prune=false`).
fn option_name(option: &str) -> &str {
    option.split('=').next().unwrap_or_default().trim()
}

/// One hub volume as the API server reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub name: String,
    /// The annotations to add for GitOps tools, if any (see
    /// [`gitops_annotations`]).
    pub unmarked: Option<serde_json::Map<String, serde_json::Value>>,
    /// What the claim asks for.
    pub requested: Option<Quantity>,
    /// What the volume holds now (behind `requested` while it grows).
    pub capacity: Option<Quantity>,
}

/// The hub's volumes before anything is applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubVolumes {
    /// The StatefulSet's claim template size (`None` before the hub exists).
    pub template: Option<Quantity>,
    pub claims: Vec<Claim>,
}

fn bytes(q: Option<&Quantity>) -> Option<u64> {
    q.and_then(|q| quantity_bytes(&q.0))
}

impl HubVolumes {
    /// The largest size any volume already has or asks for: the spec may
    /// not go below it.
    pub fn largest(&self) -> Option<&Quantity> {
        self.template
            .iter()
            .chain(self.claims.iter().filter_map(|c| c.requested.as_ref()))
            .max_by_key(|q| quantity_bytes(&q.0).unwrap_or(0))
    }

    /// The smallest capacity a volume reports: JetStream may not count on
    /// more disk than that.
    pub fn smallest_capacity(&self) -> Option<&Quantity> {
        self.claims
            .iter()
            .filter_map(|c| c.capacity.as_ref())
            .min_by_key(|q| quantity_bytes(&q.0).unwrap_or(u64::MAX))
    }

    /// The claims that ask for less than `desired`.
    pub fn to_grow(&self, desired: &Quantity) -> Vec<&Claim> {
        let Some(want) = quantity_bytes(&desired.0) else {
            return Vec::new();
        };
        self.claims
            .iter()
            .filter(|c| bytes(c.requested.as_ref()).is_none_or(|have| have < want))
            .collect()
    }
}

/// Reads the hub StatefulSet's claim template and the hub's claims.
pub async fn inspect(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<HubVolumes, Error> {
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let center = pc.spec.center_name();
    let Some(live) = statefulsets.get_opt(&scope.names.nats(center)).await? else {
        return Ok(HubVolumes::default());
    };
    let template = live
        .spec
        .volume_claim_templates
        .into_iter()
        .flatten()
        .find(|c| c.metadata.name.as_deref() == Some("data"))
        .and_then(|c| c.spec?.resources?.requests?.remove("storage"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let selector = render::region_selector(scope, "nats", center)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let claims = claims
        .list(&ListParams::default().labels(&selector))
        .await?
        .into_iter()
        .map(|claim| Claim {
            name: claim.name_any(),
            unmarked: gitops_annotations(claim.annotations()),
            requested: claim
                .spec
                .and_then(|s| s.resources)
                .and_then(|r| r.requests)
                .and_then(|mut r| r.remove("storage")),
            capacity: claim
                .status
                .and_then(|s| s.capacity)
                .and_then(|mut c| c.remove("storage")),
        })
        .collect();
    Ok(HubVolumes { template, claims })
}

/// Marks each hub claim that lacks them with the [`GITOPS_KEEP`] options;
/// a failure is logged and tried again next reconcile (the claims serve on
/// either way).
pub async fn keep_from_gitops(ctx: &Context, scope: &render::Scope, volumes: &HubVolumes) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    for claim in &volumes.claims {
        let Some(annotations) = &claim.unmarked else {
            continue;
        };
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        if let Err(error) = api
            .patch(&claim.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(claim = %claim.name, %error, "cannot mark a hub volume claim for GitOps tools");
        }
    }
}

/// Refuses a size below what the volumes already have. Pure.
pub fn check_growth(desired: &Quantity, largest: Option<&Quantity>) -> Result<(), String> {
    let Some(want) = quantity_bytes(&desired.0) else {
        return Err(format!(
            "center.jetstream.storageSize {:?} is not a size",
            desired.0
        ));
    };
    match largest {
        Some(have) if bytes(Some(have)).is_some_and(|have| want < have) => Err(format!(
            "center.jetstream.storageSize can't shrink from {} to {}: volumes only grow; set it back to at least {}",
            have.0, desired.0, have.0
        )),
        _ => Ok(()),
    }
}

/// Asks for `desired` on each claim in `claims`, going on past failures;
/// returns the claims resized, or every failure (a StorageClass without
/// expansion refuses, and the error says so).
pub async fn expand(
    ctx: &Context,
    scope: &render::Scope,
    claims: &[&Claim],
    desired: &Quantity,
) -> (Vec<String>, Result<(), String>) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": desired.0}}}});
    let mut resized = Vec::new();
    let mut failures = Vec::new();
    for claim in claims {
        match api
            .patch(&claim.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => resized.push(claim.name.clone()),
            Err(e) => failures.push(format!("{}: {e}", claim.name)),
        }
    }
    let outcome = if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "cannot grow hub volumes to {} (their StorageClass must allow volume expansion): {}",
            desired.0,
            failures.join("; ")
        ))
    };
    (resized, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    fn claim(name: &str, requested: &str, capacity: &str) -> Claim {
        Claim {
            name: name.into(),
            unmarked: None,
            requested: Some(q(requested)),
            capacity: Some(q(capacity)),
        }
    }

    #[test]
    fn gitops_options_are_added_without_dropping_the_users() {
        let annotations = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let (sync, compare) = (GITOPS_KEEP[0].0, GITOPS_KEEP[1].0);
        let fresh = gitops_annotations(&annotations(&[])).expect("a patch");
        assert_eq!(fresh[sync], "Prune=false,Delete=false");
        assert_eq!(fresh[compare], "IgnoreExtraneous");
        // The user's other options stay; a contrary one of ours is replaced.
        let theirs = annotations(&[
            (sync, "ServerSideApply=true, Prune=true"),
            (compare, "IgnoreExtraneous"),
        ]);
        let patch = gitops_annotations(&theirs).expect("a patch");
        assert_eq!(patch[sync], "ServerSideApply=true,Prune=false,Delete=false");
        assert!(!patch.contains_key(compare), "already there");
        // Marked already, in any order: nothing to do.
        let marked = annotations(&[
            (sync, "Delete=false,Prune=false"),
            (compare, "IgnoreExtraneous"),
        ]);
        assert_eq!(gitops_annotations(&marked), None);
    }

    #[test]
    fn volumes_grow_but_never_shrink() {
        assert!(check_growth(&q("20Gi"), None).is_ok());
        assert!(check_growth(&q("20Gi"), Some(&q("10Gi"))).is_ok());
        assert!(check_growth(&q("10Gi"), Some(&q("10Gi"))).is_ok());
        assert!(check_growth(&q("10240Mi"), Some(&q("10Gi"))).is_ok());
        let err = check_growth(&q("5Gi"), Some(&q("10Gi"))).unwrap_err();
        assert!(err.contains("can't shrink from 10Gi to 5Gi"), "{err}");
        assert!(check_growth(&q("lots"), Some(&q("10Gi"))).is_err());
    }

    #[test]
    fn the_largest_request_and_the_smallest_capacity_count() {
        let volumes = HubVolumes {
            template: Some(q("10Gi")),
            claims: vec![claim("a", "20Gi", "10Gi"), claim("b", "10Gi", "10Gi")],
        };
        // Grown once to 20Gi: 15Gi would shrink volume a.
        assert_eq!(volumes.largest(), Some(&q("20Gi")));
        assert!(check_growth(&q("15Gi"), volumes.largest()).is_err());
        // a's expansion hasn't finished: JetStream may count on 10Gi only.
        assert_eq!(volumes.smallest_capacity(), Some(&q("10Gi")));
        let names: Vec<&str> = volumes
            .to_grow(&q("20Gi"))
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["b"]);
    }
}
