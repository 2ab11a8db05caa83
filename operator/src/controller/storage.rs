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

/// The storage request of the live hub StatefulSet's claim template, if
/// the StatefulSet exists.
pub async fn live_template_size(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<Option<Quantity>, Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let Some(live) = api
        .get_opt(&scope.names.nats(pc.spec.center_name()))
        .await?
    else {
        return Ok(None);
    };
    Ok(live
        .spec
        .volume_claim_templates
        .into_iter()
        .flatten()
        .find(|c| c.metadata.name.as_deref() == Some("data"))
        .and_then(|c| c.spec?.resources?.requests?.remove("storage")))
}

/// Refuses a size below what the volumes were created with. Pure.
pub fn check_growth(desired: &Quantity, created: Option<&Quantity>) -> Result<(), String> {
    let Some(created) = created else {
        return Ok(());
    };
    match (quantity_bytes(&desired.0), quantity_bytes(&created.0)) {
        (Some(want), Some(have)) if want < have => Err(format!(
            "center.jetstream.storageSize can't shrink from {} to {}: volumes only grow; set it back to at least {}",
            created.0, desired.0, created.0
        )),
        (None, _) => Err(format!(
            "center.jetstream.storageSize {:?} is not a size",
            desired.0
        )),
        _ => Ok(()),
    }
}

/// Asks for `desired` on every hub volume that has less; returns the names
/// of the claims it resized. A StorageClass without expansion refuses, and
/// the error says so.
pub async fn expand_volumes(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
    desired: &Quantity,
) -> Result<Vec<String>, String> {
    let Some(want) = quantity_bytes(&desired.0) else {
        return Ok(Vec::new());
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let selector = render::region_selector(scope, "nats", pc.spec.center_name())
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let claims = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("cannot list the hub's volumes: {e}"))?;
    let mut resized = Vec::new();
    for claim in claims {
        let requested = claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .and_then(|q| quantity_bytes(&q.0));
        if requested.is_some_and(|have| have >= want) {
            continue;
        }
        let name = claim.name_any();
        let patch =
            serde_json::json!({"spec": {"resources": {"requests": {"storage": desired.0}}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                format!(
                    "cannot grow volume {name} to {}: {e} (its StorageClass must allow volume expansion)",
                    desired.0
                )
            })?;
        resized.push(name);
    }
    Ok(resized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_grow_but_never_shrink() {
        let q = |s: &str| Quantity(s.into());
        assert!(check_growth(&q("20Gi"), None).is_ok());
        assert!(check_growth(&q("20Gi"), Some(&q("10Gi"))).is_ok());
        assert!(check_growth(&q("10Gi"), Some(&q("10Gi"))).is_ok());
        assert!(check_growth(&q("10240Mi"), Some(&q("10Gi"))).is_ok());
        let err = check_growth(&q("5Gi"), Some(&q("10Gi"))).unwrap_err();
        assert!(err.contains("can't shrink from 10Gi to 5Gi"), "{err}");
        assert!(check_growth(&q("lots"), Some(&q("10Gi"))).is_err());
    }
}
