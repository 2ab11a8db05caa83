//! Deletion: the finalizer's side. Kubernetes garbage-collects the children
//! (owner references); only the KV bucket, outside Kubernetes, needs work.

use super::events::{EventReason, publish};
use super::probe::hub_addresses;
use super::status::failed;
use super::{Context, Error, write_status};
use crate::crd::{DeletionPolicy, PresenceCluster};
use crate::{kv, render};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::Api;
use kube::runtime::controller::Action;
use std::time::Duration;

/// After this long in deletion, an unreachable hub no longer blocks removal.
pub const DELETION_GRACE: Duration = Duration::from_secs(120);

/// Keeps or deletes the bucket, as `kv.deletionPolicy` says.
pub async fn cleanup(
    pc: &PresenceCluster,
    ctx: &Context,
    api: &Api<PresenceCluster>,
    ns: &str,
) -> Result<Action, Error> {
    let bucket = pc.spec.bucket().to_owned();
    // The bucket is the business of the center's cluster alone.
    if !crate::credentials::hub_here(&pc.spec, ctx.cluster_name.as_deref()) {
        return Ok(Action::await_change());
    }
    if pc.spec.deletion_policy() == DeletionPolicy::Retain {
        let note = format!("KV bucket {bucket} and its presences are kept (deletionPolicy Retain)");
        publish(ctx, pc, EventReason::BucketRetained, "Delete", note).await;
        return Ok(Action::await_change());
    }
    let scope = render::Scope::new(pc, ns)?;
    match hub_of_another(pc, ctx, &scope).await {
        Ok(false) => {}
        Ok(true) => {
            let note = format!(
                "KV bucket {bucket} is left in place: the hub {} belongs to another PresenceCluster, whose object names this one's share",
                scope.names.nats(pc.spec.center_name())
            );
            publish(ctx, pc, EventReason::BucketRetained, "Delete", note).await;
            return Ok(Action::await_change());
        }
        Err(reason) => return deletion_failed(pc, ctx, api, bucket, reason).await,
    }
    let (nats_url, _) = hub_addresses(&ctx.hub, pc, &scope);
    let auth = super::nats_secrets::operator_auth(pc, ctx, &scope).await;
    let result = match kv::connect(&nats_url, pc.spec.js_domain(), &auth).await {
        Ok(js) => kv::delete_bucket(&js, &bucket).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(existed) => {
            let note = if existed {
                format!("deleted KV bucket {bucket}")
            } else {
                format!("KV bucket {bucket} was already gone")
            };
            publish(ctx, pc, EventReason::BucketDeleted, "Delete", note).await;
            Ok(Action::await_change())
        }
        Err(err) => deletion_failed(pc, ctx, api, bucket, err.to_string()).await,
    }
}

/// Whether the hub `pc`'s names point at is another PresenceCluster's:
/// its StatefulSet is controlled by one (`pc` was refused with
/// `NameConflict` and never ran a hub of its own), so the bucket behind it
/// is not `pc`'s to delete. A hub that isn't there at all says nothing:
/// the deletion then fails to reach it, within the grace period. `Err`:
/// the StatefulSet could not be read.
async fn hub_of_another(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<bool, String> {
    let hub = scope.names.nats(pc.spec.center_name());
    let hubs: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let found = hubs
        .get_opt(&hub)
        .await
        .map_err(|err| format!("cannot tell whose hub {hub} is: {err}"))?;
    let controller = found.as_ref().and_then(super::controller_uid);
    Ok(controller.is_some_and(|theirs| pc.meta().uid.as_deref() != Some(theirs)))
}

/// How long the object has been in deletion.
fn deleting_for(pc: &PresenceCluster) -> Duration {
    pc.meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default()
}

/// Retries (reported in status) until the grace period ends, then gives up
/// on the bucket so that deletion never hangs.
async fn deletion_failed(
    pc: &PresenceCluster,
    ctx: &Context,
    api: &Api<PresenceCluster>,
    bucket: String,
    reason: String,
) -> Result<Action, Error> {
    if deleting_for(pc) >= DELETION_GRACE {
        let note = format!(
            "could not delete KV bucket {bucket} within {DELETION_GRACE:?} ({reason}); it is left in place"
        );
        publish(
            ctx,
            pc,
            EventReason::BucketDeletionAbandoned,
            "Delete",
            note,
        )
        .await;
        return Ok(Action::await_change());
    }
    let deadline = pc
        .meta()
        .deletion_timestamp
        .as_ref()
        .and_then(|t| t.0.checked_add(DELETION_GRACE).ok())
        .map(|t| t.to_string())
        .unwrap_or_default();
    let err = Error::BucketDeletion {
        bucket,
        reason,
        deadline,
    };
    let mut status = pc.status.clone().unwrap_or_default();
    super::conditions::set_condition(
        &mut status.conditions,
        pc.meta().generation,
        &failed(err.reason(), &err.to_string()),
        Timestamp::now(),
    );
    write_status(pc, api, status).await?;
    Err(err)
}
