//! The condition types and reasons the operator reports, typed so that a
//! reason can't be misspelt in one place and so that every one of them is
//! listed (and documented in docs/operator.md) here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The three standard conditions (the kstatus convention Argo CD and
/// `kubectl wait` understand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConditionType {
    /// Every region serves, the bucket exists, leaves are linked.
    Ready,
    /// The operator is still converging on the spec.
    Progressing,
    /// Something needs a person: a bad spec, a missing Secret, a failure.
    Degraded,
}

impl ConditionType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
        }
    }
}

/// Every reason a condition can carry (CamelCase on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Ready: every region is ready and linked.
    AllRegionsReady,
    /// Progressing=False once everything is applied and ready.
    ReconcileComplete,
    /// Degraded=False: nothing wrong.
    AsExpected,
    /// The spec breaks a rule the API server would normally enforce.
    InvalidSpec,
    /// An older PresenceCluster in the namespace renders objects of the
    /// same names.
    NameConflict,
    /// `spec.auth.jwtSecretRef` names a Secret that doesn't exist.
    SecretNotFound,
    /// The referenced Secret lacks the named key.
    SecretKeyMissing,
    /// A Secret holds something unusable: not an nkey seed, or the same
    /// identity as another region.
    InvalidSecret,
    /// The hub's NATS servers aren't all ready yet.
    HubNotReady,
    /// The KV bucket can't be created or brought to the spec.
    BucketUnavailable,
    /// Some region's NATS or presence-service pods aren't ready.
    RegionsNotReady,
    /// Every region serves, but some still run pods of an older spec.
    RollingOut,
    /// A presence-service rollout passed its progress deadline.
    RolloutStalled,
    /// A leaf NATS server isn't connected to the hub.
    LeafnodeDisconnected,
    /// The paused annotation stops reconciling.
    Paused,
    /// A Kubernetes API call failed.
    KubernetesApiError,
    /// The object itself is unusable (no namespace).
    InvalidObject,
    /// The JWT secret couldn't be generated.
    SecretGenerationFailed,
    /// Deleting the bucket on `deletionPolicy: Delete` failed (retried).
    BucketDeletionFailed,
    /// The finalizer couldn't be added or removed.
    FinalizerFailed,
    /// A hub volume couldn't grow to the spec's storage size.
    StorageExpansionFailed,
}

impl Reason {
    /// Every reason, for tests and docs checks.
    pub const ALL: [Reason; 21] = [
        Reason::AllRegionsReady,
        Reason::ReconcileComplete,
        Reason::AsExpected,
        Reason::InvalidSpec,
        Reason::NameConflict,
        Reason::SecretNotFound,
        Reason::SecretKeyMissing,
        Reason::InvalidSecret,
        Reason::HubNotReady,
        Reason::BucketUnavailable,
        Reason::RegionsNotReady,
        Reason::RollingOut,
        Reason::RolloutStalled,
        Reason::LeafnodeDisconnected,
        Reason::Paused,
        Reason::KubernetesApiError,
        Reason::InvalidObject,
        Reason::SecretGenerationFailed,
        Reason::BucketDeletionFailed,
        Reason::FinalizerFailed,
        Reason::StorageExpansionFailed,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllRegionsReady => "AllRegionsReady",
            Reason::ReconcileComplete => "ReconcileComplete",
            Reason::AsExpected => "AsExpected",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::NameConflict => "NameConflict",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::InvalidSecret => "InvalidSecret",
            Reason::HubNotReady => "HubNotReady",
            Reason::BucketUnavailable => "BucketUnavailable",
            Reason::RegionsNotReady => "RegionsNotReady",
            Reason::RollingOut => "RollingOut",
            Reason::RolloutStalled => "RolloutStalled",
            Reason::LeafnodeDisconnected => "LeafnodeDisconnected",
            Reason::Paused => "Paused",
            Reason::KubernetesApiError => "KubernetesApiError",
            Reason::InvalidObject => "InvalidObject",
            Reason::SecretGenerationFailed => "SecretGenerationFailed",
            Reason::BucketDeletionFailed => "BucketDeletionFailed",
            Reason::FinalizerFailed => "FinalizerFailed",
            Reason::StorageExpansionFailed => "StorageExpansionFailed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One condition as the status rules decide it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    pub type_: ConditionType,
    /// `None` is `Unknown`: the operator can't say (e.g. while paused).
    pub status: Option<bool>,
    pub reason: Reason,
    pub message: String,
}

impl ConditionUpdate {
    /// A True or False condition of `type_`.
    pub fn new(
        type_: ConditionType,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
    ) -> Self {
        ConditionUpdate {
            type_,
            status: Some(status),
            reason,
            message: message.into(),
        }
    }

    /// An Unknown condition of `type_`.
    pub fn unknown(type_: ConditionType, reason: Reason, message: impl Into<String>) -> Self {
        ConditionUpdate {
            type_,
            status: None,
            reason,
            message: message.into(),
        }
    }
}

/// Sets a condition, keeping its transition time when its status is
/// unchanged; conditions stay sorted by type. Pure: `now` is passed in.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    generation: Option<i64>,
    update: &ConditionUpdate,
    now: Timestamp,
) {
    let type_ = update.type_.as_str();
    let status = match update.status {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    }
    .to_owned();
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(i) if conditions[i].status == status => conditions[i].last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status,
        reason: update.reason.as_str().to_owned(),
        message: update.message.clone(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_camel_case() {
        let names: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for name in names {
            assert!(name.starts_with(|c: char| c.is_ascii_uppercase()), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
        }
    }

    #[test]
    fn every_reason_is_explained_in_the_operator_docs() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator.md"),
        )
        .expect("docs/operator.md");
        for reason in Reason::ALL {
            assert!(
                doc.contains(&format!("`{reason}`")),
                "docs/operator.md never explains {reason}"
            );
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut conditions = Vec::new();
        let ready =
            |status, reason| ConditionUpdate::new(ConditionType::Ready, status, reason, "m");
        set_condition(
            &mut conditions,
            Some(1),
            &ready(false, Reason::HubNotReady),
            t0,
        );
        set_condition(
            &mut conditions,
            Some(2),
            &ready(false, Reason::RegionsNotReady),
            t1,
        );
        assert_eq!(conditions[0].last_transition_time, Time(t0));
        assert_eq!(conditions[0].reason, "RegionsNotReady");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(
            &mut conditions,
            Some(2),
            &ready(true, Reason::AllRegionsReady),
            t1,
        );
        assert_eq!(conditions[0].last_transition_time, Time(t1));
        let degraded = ConditionUpdate::new(ConditionType::Degraded, false, Reason::AsExpected, "");
        set_condition(&mut conditions, Some(2), &degraded, t1);
        let types: Vec<&str> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Degraded", "Ready"]);
    }
}
