//! Kubernetes Events the operator records on a PresenceCluster: what it
//! did that a person may want to know about (`kubectl describe`).

use super::Context;
use super::conditions::Reason;
use crate::crd::PresenceCluster;
use kube::Resource;
use kube::runtime::events::{Event, EventType};

/// Why an Event was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    /// The operator created the JWT Secret.
    SecretGenerated,
    /// Objects of removed regions were deleted.
    RegionRemoved,
    BucketCreated,
    BucketUpdated,
    /// Deletion kept the bucket (`deletionPolicy: Retain`).
    BucketRetained,
    BucketDeleted,
    /// The hub stayed unreachable past the deletion grace period.
    BucketDeletionAbandoned,
    /// Hub volumes were asked to grow to a new storage size.
    VolumesExpanded,
    /// The NATS servers' certificate was issued again before it expired.
    CertificateRenewed,
    /// Every server of a leaf region is linked to the hub (again).
    LeafnodeConnected,
    /// A leaf region's servers are not (all) linked to the hub any more (a
    /// Warning).
    LeafnodeDisconnected,
    /// A leaf region, first seen, is not linked yet (a new region, or one
    /// refused from the start).
    LeafnodeWaiting,
    /// A new generation of the spec works, but probably not as meant: a
    /// region a drain would cut off, metrics no Prometheus may scrape (a
    /// Warning; see [`crate::render::advice`]).
    SpecAdvice,
    /// A reconcile failed (a Warning).
    Failed(Reason),
}

impl EventReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::SecretGenerated => "SecretGenerated",
            EventReason::RegionRemoved => "RegionRemoved",
            EventReason::BucketCreated => "BucketCreated",
            EventReason::BucketUpdated => "BucketUpdated",
            EventReason::BucketRetained => "BucketRetained",
            EventReason::BucketDeleted => "BucketDeleted",
            EventReason::BucketDeletionAbandoned => "BucketDeletionAbandoned",
            EventReason::VolumesExpanded => "VolumesExpanded",
            EventReason::CertificateRenewed => "CertificateRenewed",
            EventReason::LeafnodeConnected => "LeafnodeConnected",
            EventReason::LeafnodeDisconnected => "LeafnodeDisconnected",
            EventReason::LeafnodeWaiting => "LeafnodeWaiting",
            EventReason::SpecAdvice => "SpecAdvice",
            EventReason::Failed(reason) => reason.as_str(),
        }
    }

    fn event_type(self) -> EventType {
        match self {
            EventReason::Failed(_)
            | EventReason::BucketDeletionAbandoned
            | EventReason::LeafnodeDisconnected
            | EventReason::SpecAdvice => EventType::Warning,
            _ => EventType::Normal,
        }
    }
}

/// Records an Event; a failure to record is logged, never fatal.
pub async fn publish(
    ctx: &Context,
    pc: &PresenceCluster,
    reason: EventReason,
    action: &str,
    note: String,
) {
    let event = Event {
        type_: reason.event_type(),
        reason: reason.as_str().into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &pc.object_ref(&())).await {
        tracing::warn!(error = %err, "cannot publish event");
    }
}
