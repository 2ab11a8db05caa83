//! The status rules: what was observed in, conditions, per-region status
//! and when to look again out. Pure, so every rule is unit tested without
//! an API server or NATS.

use super::conditions::{ConditionType, ConditionUpdate, Reason};
use crate::crd::{RegionStatus, Role};
use std::time::Duration;

/// Requeue interval while something is still converging.
pub const REQUEUE_PROGRESSING: Duration = Duration::from_secs(10);
/// Requeue interval once everything is ready: the drift check, and how
/// soon a rotated Secret is noticed (Secrets are read, never watched).
pub const REQUEUE_READY: Duration = Duration::from_secs(60);
/// Requeue interval while a referenced Secret is missing (Secrets are read,
/// never watched, so this is how soon creating it takes effect).
pub const REQUEUE_SECRET: Duration = Duration::from_secs(30);
/// Requeue interval while an older PresenceCluster holds this one's object
/// names: renaming or deleting that one is not a change to this one.
pub const REQUEUE_NAME_CONFLICT: Duration = Duration::from_secs(60);

/// What one region's workloads reported after they were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionObservation {
    pub name: String,
    pub role: Role,
    pub nats_ready: i32,
    pub nats_wanted: i32,
    pub dataplane_ready: i32,
    pub dataplane_wanted: i32,
    /// Some NATS pod still runs an older spec: the ready count includes
    /// pods that are about to be replaced.
    pub nats_rolling: bool,
    /// Some presence-service pod still runs an older spec.
    pub dataplane_rolling: bool,
    /// The presence-service rollout passed its progress deadline.
    pub dataplane_stalled: bool,
    /// For a leaf: whether the hub lists every one of its servers as a
    /// leafnode; `None` for the center, or when not every hub server could
    /// be asked and the missing links may be on the one that wasn't.
    pub leafnode_connected: Option<bool>,
    /// For a leaf: how many of its servers some hub server lists.
    pub leaf_servers_linked: Option<i32>,
}

impl RegionObservation {
    fn is_ready(&self) -> bool {
        self.is_serving() && !self.nats_rolling && !self.dataplane_rolling
    }

    /// Every wanted pod ready, whichever spec it runs.
    fn is_serving(&self) -> bool {
        self.nats_ready >= self.nats_wanted && self.dataplane_ready >= self.dataplane_wanted
    }

    /// How far the region is from ready, for Ready's message.
    fn progress(&self) -> String {
        let rolling = match (self.nats_rolling, self.dataplane_rolling) {
            (true, true) => ", rolling out NATS and presence-service",
            (true, false) => ", rolling out NATS",
            (false, true) => ", rolling out presence-service",
            (false, false) => "",
        };
        format!(
            "{} (NATS {}/{}, presence-service {}/{}{rolling})",
            self.name,
            self.nats_ready,
            self.nats_wanted,
            self.dataplane_ready,
            self.dataplane_wanted
        )
    }

    /// Serving and linked (as far as is known).
    fn is_healthy(&self) -> bool {
        self.is_ready() && self.leafnode_connected != Some(false)
    }

    fn status(&self) -> RegionStatus {
        RegionStatus {
            name: self.name.clone(),
            role: self.role.as_str().to_owned(),
            nats_ready_replicas: self.nats_ready,
            dataplane_ready_replicas: self.dataplane_ready,
            leafnode_connected: self.leafnode_connected,
        }
    }
}

/// Everything a reconcile learned, in the order the pipeline learns it:
/// each variant ends the pipeline at a different step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The spec check failed; nothing was applied.
    InvalidSpec(String),
    /// An older PresenceCluster in the namespace renders objects of the
    /// same names; nothing was applied.
    NameConflict(String),
    /// The JWT Secret can't be used; nothing was applied.
    SecretProblem { reason: Reason, message: String },
    /// Every child was applied; this is what they and the hub reported.
    Applied {
        /// Every region, center first.
        regions: Vec<RegionObservation>,
        /// `None` while the hub isn't ready (the bucket wasn't tried).
        bucket: Option<Result<(), String>>,
        /// Whether the hub's volumes could be brought to the spec's size.
        storage: Result<(), String>,
        /// When the NATS servers' certificate expires (RFC 3339).
        certificate_expiry: Option<String>,
    },
}

/// When to reconcile again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Only when something changes.
    OnChange,
    After(Duration),
}

/// The status a reconcile writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    /// Ready, Progressing and Degraded.
    pub conditions: Vec<ConditionUpdate>,
    /// Per-region status; `None` keeps what the status had.
    pub regions: Option<Vec<RegionStatus>>,
    /// (ready, all) regions; `None` keeps what the status had.
    pub regions_ready: Option<(usize, usize)>,
    /// The NATS certificate's expiry; `None` keeps what the status had.
    pub certificate_expiry: Option<String>,
    pub requeue: Requeue,
}

fn triple(
    ready: ConditionUpdate,
    progressing: ConditionUpdate,
    degraded: ConditionUpdate,
) -> Vec<ConditionUpdate> {
    vec![ready, progressing, degraded]
}

/// A problem that stops the pipeline before anything is applied:
/// Degraded, not Ready, and not progressing until someone acts.
fn blocked(
    reason: Reason,
    problem: &str,
    ready_message: &str,
    waiting: &str,
) -> Vec<ConditionUpdate> {
    triple(
        ConditionUpdate::new(ConditionType::Ready, false, reason, ready_message),
        ConditionUpdate::new(ConditionType::Progressing, false, reason, waiting),
        ConditionUpdate::new(ConditionType::Degraded, true, reason, problem),
    )
}

/// The status rules.
pub fn compute(observed: &Observed) -> Computed {
    match observed {
        Observed::InvalidSpec(problem) => Computed {
            conditions: blocked(
                Reason::InvalidSpec,
                problem,
                "fix the spec; nothing is applied while it is invalid",
                "waiting for a valid spec",
            ),
            regions: None,
            regions_ready: None,
            certificate_expiry: None,
            requeue: Requeue::OnChange,
        },
        Observed::NameConflict(problem) => Computed {
            conditions: blocked(
                Reason::NameConflict,
                problem,
                "nothing is applied while another PresenceCluster's objects have the same names",
                "waiting for the names to differ",
            ),
            regions: None,
            regions_ready: None,
            certificate_expiry: None,
            requeue: Requeue::After(REQUEUE_NAME_CONFLICT),
        },
        Observed::SecretProblem { reason, message } => Computed {
            conditions: blocked(
                *reason,
                message,
                message,
                "waiting for the Secrets it needs",
            ),
            regions: None,
            regions_ready: None,
            certificate_expiry: None,
            requeue: Requeue::After(REQUEUE_SECRET),
        },
        Observed::Applied {
            regions,
            bucket,
            storage,
            certificate_expiry,
        } => Computed {
            certificate_expiry: certificate_expiry.clone(),
            ..applied(regions, bucket.as_ref(), storage)
        },
    }
}

/// Ready's verdict: the first thing (in dependency order) that isn't ready.
fn readiness(
    regions: &[RegionObservation],
    bucket: Option<&Result<(), String>>,
) -> (bool, Reason, String) {
    // A cluster that only hosts leaves has no hub to wait for.
    if let Some(center) = regions.iter().find(|r| r.role == Role::Center)
        && !(center.nats_ready >= center.nats_wanted && center.nats_wanted > 0)
    {
        return (
            false,
            Reason::HubNotReady,
            format!(
                "waiting for the hub NATS servers of region {} to become ready",
                center.name
            ),
        );
    }
    if let Some(Err(err)) = bucket {
        return (
            false,
            Reason::BucketUnavailable,
            format!("the KV bucket can't be provisioned: {err}"),
        );
    }
    let unready: Vec<&RegionObservation> = regions.iter().filter(|r| !r.is_ready()).collect();
    if !unready.is_empty() {
        // Only rollouts left: every region serves meanwhile.
        let reason = if unready.iter().all(|r| r.is_serving()) {
            Reason::RollingOut
        } else {
            Reason::RegionsNotReady
        };
        let progress: Vec<String> = unready.iter().map(|r| r.progress()).collect();
        return (
            false,
            reason,
            format!("not ready yet: {}", progress.join(", ")),
        );
    }
    let disconnected: Vec<String> = regions
        .iter()
        .filter(|r| r.leafnode_connected == Some(false))
        .map(|r| match r.leaf_servers_linked {
            Some(linked) if r.nats_wanted > 1 => {
                format!("{} ({linked}/{} servers linked)", r.name, r.nats_wanted)
            }
            _ => r.name.clone(),
        })
        .collect();
    if !disconnected.is_empty() {
        return (
            false,
            Reason::LeafnodeDisconnected,
            format!(
                "leaf NATS servers not connected to the hub: {}; their log names the cause \
                 (Authorization Violation: the leaf's credentials; certificate errors: the hub's CA)",
                disconnected.join(", ")
            ),
        );
    }
    (
        true,
        Reason::AllRegionsReady,
        format!("{} regions ready", regions.len()),
    )
}

fn applied(
    regions: &[RegionObservation],
    bucket: Option<&Result<(), String>>,
    storage: &Result<(), String>,
) -> Computed {
    let (ready, reason, message) = readiness(regions, bucket);
    let progressing = if ready {
        ConditionUpdate::new(
            ConditionType::Progressing,
            false,
            Reason::ReconcileComplete,
            "every object is applied and ready",
        )
    } else {
        ConditionUpdate::new(ConditionType::Progressing, true, reason, message.clone())
    };
    let degraded = degraded(regions, bucket, storage);
    Computed {
        conditions: triple(
            ConditionUpdate::new(ConditionType::Ready, ready, reason, message),
            progressing,
            degraded,
        ),
        regions: Some(regions.iter().map(RegionObservation::status).collect()),
        regions_ready: Some((
            regions.iter().filter(|r| r.is_healthy()).count(),
            regions.len(),
        )),
        certificate_expiry: None,
        requeue: Requeue::After(if ready {
            REQUEUE_READY
        } else {
            REQUEUE_PROGRESSING
        }),
    }
}

/// Degraded's verdict: the first problem that needs someone to act.
fn degraded(
    regions: &[RegionObservation],
    bucket: Option<&Result<(), String>>,
    storage: &Result<(), String>,
) -> ConditionUpdate {
    let stalled: Vec<&str> = regions
        .iter()
        .filter(|r| r.dataplane_stalled)
        .map(|r| r.name.as_str())
        .collect();
    let (reason, message) = match (bucket, storage) {
        (Some(Err(err)), _) => (Reason::BucketUnavailable, err.clone()),
        (_, Err(err)) => (Reason::StorageExpansionFailed, err.clone()),
        _ if !stalled.is_empty() => (
            Reason::RolloutStalled,
            format!(
                "presence-service's rollout passed its progress deadline in {}: its new pods \
                 don't become ready (see `kubectl rollout status` and the new pods' events); \
                 the old pods serve meanwhile",
                stalled.join(", ")
            ),
        ),
        _ => {
            return ConditionUpdate::new(
                ConditionType::Degraded,
                false,
                Reason::AsExpected,
                "no problems found",
            );
        }
    };
    ConditionUpdate::new(ConditionType::Degraded, true, reason, message)
}

/// The condition a failed reconcile leaves: Degraded with the failure.
pub fn failed(reason: Reason, message: &str) -> ConditionUpdate {
    ConditionUpdate::new(ConditionType::Degraded, true, reason, message)
}

/// The conditions of a paused object: nothing of this generation was
/// applied, so Ready is Unknown (tools such as Argo CD must not report a
/// generation that was never applied as healthy) and nothing progresses.
pub fn paused(annotation: &str, applied: Option<i64>) -> Vec<ConditionUpdate> {
    let applied = applied.map_or("no generation has been applied yet".to_owned(), |g| {
        format!("the status describes generation {g}")
    });
    let message = format!(
        "reconciling is paused by the annotation {annotation}=\"true\"; remove it to resume ({applied})"
    );
    vec![
        ConditionUpdate::unknown(ConditionType::Ready, Reason::Paused, message.clone()),
        ConditionUpdate::new(ConditionType::Progressing, false, Reason::Paused, message),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(
        name: &str,
        role: Role,
        nats: (i32, i32),
        dataplane: (i32, i32),
        leaf: Option<bool>,
    ) -> RegionObservation {
        RegionObservation {
            name: name.into(),
            role,
            nats_ready: nats.0,
            nats_wanted: nats.1,
            dataplane_ready: dataplane.0,
            dataplane_wanted: dataplane.1,
            nats_rolling: false,
            dataplane_rolling: false,
            dataplane_stalled: false,
            leafnode_connected: leaf,
            leaf_servers_linked: leaf.map(|l| if l { nats.1 } else { 0 }),
        }
    }

    fn all_ready() -> Vec<RegionObservation> {
        vec![
            region("center", Role::Center, (3, 3), (2, 2), None),
            region("eu", Role::Leaf, (1, 1), (2, 2), Some(true)),
        ]
    }

    /// (type, status, reason) of every condition; only True/False here.
    fn summary(c: &Computed) -> Vec<(&'static str, bool, &'static str)> {
        c.conditions
            .iter()
            .map(|u| {
                (
                    u.type_.as_str(),
                    u.status.expect("known"),
                    u.reason.as_str(),
                )
            })
            .collect()
    }

    fn applied_with(
        regions: Vec<RegionObservation>,
        bucket: Option<Result<(), String>>,
    ) -> Computed {
        compute(&Observed::Applied {
            regions,
            bucket,
            storage: Ok(()),
            certificate_expiry: None,
        })
    }

    #[test]
    fn a_volume_that_cannot_grow_degrades_but_the_cluster_serves() {
        let c = compute(&Observed::Applied {
            regions: all_ready(),
            bucket: Some(Ok(())),
            storage: Err("cannot grow volume data-p-center-nats-0".into()),
            certificate_expiry: Some("2027-01-01T00:00:00Z".into()),
        });
        assert_eq!(
            c.certificate_expiry.as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            summary(&c),
            [
                ("Ready", true, "AllRegionsReady"),
                ("Progressing", false, "ReconcileComplete"),
                ("Degraded", true, "StorageExpansionFailed")
            ]
        );
    }

    #[test]
    fn everything_ready() {
        let c = applied_with(all_ready(), Some(Ok(())));
        assert_eq!(
            summary(&c),
            [
                ("Ready", true, "AllRegionsReady"),
                ("Progressing", false, "ReconcileComplete"),
                ("Degraded", false, "AsExpected")
            ]
        );
        assert_eq!(c.conditions[0].message, "2 regions ready");
        assert_eq!(c.requeue, Requeue::After(REQUEUE_READY));
        let regions = c.regions.unwrap();
        assert_eq!(
            (
                regions[1].name.as_str(),
                regions[1].role.as_str(),
                regions[1].leafnode_connected
            ),
            ("eu", "leaf", Some(true))
        );
    }

    #[test]
    fn an_invalid_spec_blocks_everything() {
        let c = compute(&Observed::InvalidSpec(
            "leaf name \"x\" appears twice".into(),
        ));
        assert_eq!(
            summary(&c),
            [
                ("Ready", false, "InvalidSpec"),
                ("Progressing", false, "InvalidSpec"),
                ("Degraded", true, "InvalidSpec")
            ]
        );
        assert!(c.conditions[2].message.contains("appears twice"));
        assert_eq!((c.regions, c.requeue), (None, Requeue::OnChange));
    }

    #[test]
    fn a_secret_problem_blocks_and_retries() {
        for reason in [
            Reason::SecretNotFound,
            Reason::SecretKeyMissing,
            Reason::InvalidSecret,
        ] {
            let c = compute(&Observed::SecretProblem {
                reason,
                message: "Secret ns/x".into(),
            });
            let r = reason.as_str();
            assert_eq!(
                summary(&c),
                [
                    ("Ready", false, r),
                    ("Progressing", false, r),
                    ("Degraded", true, r)
                ]
            );
            assert_eq!(c.conditions[1].message, "waiting for the Secrets it needs");
            assert_eq!(c.requeue, Requeue::After(REQUEUE_SECRET));
        }
    }

    #[test]
    fn the_hub_comes_first() {
        let mut regions = all_ready();
        regions[0].nats_ready = 2;
        regions[1].dataplane_ready = 0;
        let c = applied_with(regions.clone(), None);
        assert_eq!(
            summary(&c),
            [
                ("Ready", false, "HubNotReady"),
                ("Progressing", true, "HubNotReady"),
                ("Degraded", false, "AsExpected")
            ]
        );
        assert!(c.conditions[0].message.contains("region center"));
        assert_eq!(c.requeue, Requeue::After(REQUEUE_PROGRESSING));
        // A hub with no servers wanted is not ready either.
        regions[0].nats_ready = 0;
        regions[0].nats_wanted = 0;
        assert_eq!(
            applied_with(regions, None).conditions[0].reason,
            Reason::HubNotReady
        );
    }

    /// Every pod ready is not enough while some of them run the old spec:
    /// right after an edit the old pods are all still ready.
    #[test]
    fn a_region_rolling_out_is_not_ready_yet() {
        let mut regions = all_ready();
        regions[1].dataplane_rolling = true;
        let c = applied_with(regions.clone(), Some(Ok(())));
        assert_eq!(
            summary(&c),
            [
                ("Ready", false, "RollingOut"),
                ("Progressing", true, "RollingOut"),
                ("Degraded", false, "AsExpected")
            ]
        );
        assert!(
            c.conditions[0]
                .message
                .contains("eu (NATS 1/1, presence-service 2/2, rolling out presence-service)"),
            "{}",
            c.conditions[0].message
        );
        assert_eq!(c.regions_ready, Some((1, 2)));
        // A hub rolling its servers one by one still serves the bucket.
        regions[1].dataplane_rolling = false;
        regions[0].nats_rolling = true;
        let c = applied_with(regions.clone(), Some(Ok(())));
        assert_eq!(c.conditions[0].reason, Reason::RollingOut);
        assert!(c.conditions[0].message.contains("rolling out NATS"));
        // A region short of pods too: not only a rollout any more.
        regions[1].dataplane_ready = 1;
        let c = applied_with(regions.clone(), Some(Ok(())));
        assert_eq!(c.conditions[0].reason, Reason::RegionsNotReady);
        // A rollout past its deadline needs someone to act: Degraded.
        regions[1].dataplane_rolling = true;
        regions[1].dataplane_stalled = true;
        let c = applied_with(regions, Some(Ok(())));
        assert_eq!(
            (c.conditions[2].status, c.conditions[2].reason),
            (Some(true), Reason::RolloutStalled)
        );
        assert!(c.conditions[2].message.contains("in eu"));
    }

    #[test]
    fn a_cluster_with_only_leaves_waits_for_no_hub() {
        let leaf = all_ready().remove(1);
        let c = applied_with(vec![leaf.clone()], None);
        assert_eq!(c.conditions[0].reason, Reason::AllRegionsReady);
        let mut down = leaf;
        down.dataplane_ready = 0;
        assert_eq!(
            applied_with(vec![down], None).conditions[0].reason,
            Reason::RegionsNotReady
        );
    }

    #[test]
    fn a_bucket_failure_degrades() {
        let c = applied_with(all_ready(), Some(Err("JetStream refused".into())));
        assert_eq!(
            summary(&c),
            [
                ("Ready", false, "BucketUnavailable"),
                ("Progressing", true, "BucketUnavailable"),
                ("Degraded", true, "BucketUnavailable")
            ]
        );
        assert_eq!(c.conditions[2].message, "JetStream refused");
        assert!(c.conditions[0].message.ends_with("JetStream refused"));
    }

    #[test]
    fn unready_regions_are_named_with_their_counts() {
        let mut regions = all_ready();
        regions[1].dataplane_ready = 1;
        let c = applied_with(regions, Some(Ok(())));
        assert_eq!(summary(&c)[0], ("Ready", false, "RegionsNotReady"));
        assert_eq!(
            c.conditions[0].message,
            "not ready yet: eu (NATS 1/1, presence-service 1/2)"
        );
        assert_eq!(c.conditions[1].reason, Reason::RegionsNotReady);
    }

    #[test]
    fn a_disconnected_leaf_is_not_ready_but_an_unknown_link_is() {
        let mut regions = all_ready();
        regions[1].leafnode_connected = Some(false);
        let c = applied_with(regions.clone(), Some(Ok(())));
        assert_eq!(summary(&c)[0], ("Ready", false, "LeafnodeDisconnected"));
        assert!(
            c.conditions[0]
                .message
                .starts_with("leaf NATS servers not connected to the hub: eu; their log names"),
            "{}",
            c.conditions[0].message
        );
        // A clustered leaf with one of two servers linked says so.
        regions[1].nats_wanted = 2;
        regions[1].nats_ready = 2;
        regions[1].leaf_servers_linked = Some(1);
        let c = applied_with(regions.clone(), Some(Ok(())));
        assert!(
            c.conditions[0].message.starts_with(
                "leaf NATS servers not connected to the hub: eu (1/2 servers linked);"
            ),
            "{}",
            c.conditions[0].message
        );
        assert_eq!(c.regions_ready, Some((1, 2)));
        regions[1].leafnode_connected = None;
        let c = applied_with(regions, Some(Ok(())));
        assert_eq!(c.conditions[0].status, Some(true));
        assert_eq!(c.regions_ready, Some((2, 2)));
    }

    #[test]
    fn regions_ready_counts_only_serving_regions() {
        let mut regions = all_ready();
        assert_eq!(
            applied_with(regions.clone(), Some(Ok(()))).regions_ready,
            Some((2, 2))
        );
        regions[0].dataplane_ready = 1;
        assert_eq!(
            applied_with(regions, Some(Ok(()))).regions_ready,
            Some((1, 2))
        );
        let blocked = compute(&Observed::InvalidSpec("x".into()));
        assert_eq!(
            blocked.regions_ready, None,
            "a blocked reconcile keeps the last count"
        );
    }

    #[test]
    fn failures_and_pauses() {
        let f = failed(Reason::KubernetesApiError, "boom");
        assert_eq!(
            (f.type_, f.status, f.message.as_str()),
            (ConditionType::Degraded, Some(true), "boom")
        );
        let p = paused("presencecluster.io/paused", Some(3));
        let kinds: Vec<_> = p.iter().map(|u| (u.type_, u.status, u.reason)).collect();
        assert_eq!(
            kinds,
            [
                (ConditionType::Ready, None, Reason::Paused),
                (ConditionType::Progressing, Some(false), Reason::Paused)
            ]
        );
        assert!(p[0].message.contains("presencecluster.io/paused=\"true\""));
        assert!(p[0].message.contains("generation 3"), "{}", p[0].message);
        let never = paused("a", None);
        assert!(never[0].message.contains("no generation has been applied"));
    }
}
