//! Step 1: the spec check. The API server enforces most of these rules
//! with CEL when it has the CRD; this catches an object that skipped them
//! (an old CRD, or a manifest run by `render` or `dev`), adds what CEL
//! can't say (what a leaf in another cluster needs), and checks that this
//! operator's cluster is one the manifest places regions in.

use crate::crd::{MAX_CLUSTER_NAME, PresenceCluster};
use crate::render;
use kube::{Resource, ResourceExt};

/// Why the spec can't be applied by the operator of the cluster `here`,
/// in words a person can act on.
pub fn spec(pc: &PresenceCluster, scope: &render::Scope, here: Option<&str>) -> Result<(), String> {
    render::check_spec(&pc.spec).map_err(|e| e.to_string())?;
    render::clusters::check_operator_cluster(&pc.spec, here).map_err(|e| e.to_string())?;
    if scope.name.len() > MAX_CLUSTER_NAME {
        return Err(format!(
            "metadata.name {:?} is longer than {MAX_CLUSTER_NAME} characters",
            scope.name
        ));
    }
    Ok(())
}

/// Whether `pc` would render objects that an older PresenceCluster of
/// `others` (the ones in its namespace, `pc` among them or not) renders
/// too: each would take them over from the other on every reconcile
/// (applies are forced), so the later one is refused until the names
/// differ. Older means created earlier, then by name: exactly one of two
/// clashing clusters is refused, and it is the one that came second.
pub fn name_clash(pc: &PresenceCluster, others: &[PresenceCluster]) -> Result<(), String> {
    let ours = render::Names::new(&pc.name_any());
    for other in others.iter().filter(|other| came_first(other, pc)) {
        let theirs = render::Names::new(&other.name_any());
        for region in pc.spec.regions() {
            let prefix = ours.region_prefix(region.name);
            if let Some(clash) = other
                .spec
                .regions()
                .into_iter()
                .find(|r| theirs.region_prefix(r.name) == prefix)
            {
                return Err(format!(
                    "region {:?} would name its objects {prefix}-..., as region {:?} of PresenceCluster {:?} in this namespace, created earlier, does; rename this PresenceCluster or the region",
                    region.name,
                    clash.name,
                    other.name_any()
                ));
            }
        }
    }
    Ok(())
}

/// Whether `a` came before `b` (another object): created earlier, or at
/// the same second with a smaller name. An object without a creation time
/// (not stored yet) comes last.
fn came_first(a: &PresenceCluster, b: &PresenceCluster) -> bool {
    let key = |pc: &PresenceCluster| {
        let created = pc.meta().creation_timestamp.as_ref().map(|t| t.0);
        (created.is_none(), created, pc.name_any())
    };
    a.name_any() != b.name_any() && key(a) < key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, created: Option<&str>, leaves: &[&str]) -> PresenceCluster {
        let leaves: Vec<_> = leaves
            .iter()
            .map(|l| serde_json::json!({"name": l}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"center": {}, "leaves": leaves}
        }))
        .expect("a PresenceCluster")
    }

    #[test]
    fn only_the_later_of_two_clusters_with_the_same_object_names_is_refused() {
        let a = cluster("a", Some("2026-01-01T00:00:00Z"), &["b-eu"]);
        let ab = cluster("a-b", Some("2026-01-02T00:00:00Z"), &["eu"]);
        let all = [a.clone(), ab.clone()];
        assert_eq!(name_clash(&a, &all), Ok(()));
        let refused = name_clash(&ab, &all).expect_err("a-b came second");
        assert!(refused.contains("a-b-eu-"), "{refused}");
        assert!(refused.contains("\"a\""), "{refused}");
        // A center named like the other's leaf clashes too.
        let centered = cluster("a-b", Some("2026-01-02T00:00:00Z"), &[]);
        let mut centered_at_eu = centered.clone();
        centered_at_eu.spec.center.name = Some("eu".into());
        assert!(name_clash(&centered_at_eu, &[a.clone(), centered_at_eu.clone()]).is_err());
        assert_eq!(
            name_clash(&centered, &[a.clone(), centered.clone()]),
            Ok(())
        );
    }

    #[test]
    fn clusters_whose_names_differ_never_clash() {
        let a = cluster("a", Some("2026-01-01T00:00:00Z"), &["eu", "us"]);
        let b = cluster("b", Some("2026-01-02T00:00:00Z"), &["eu", "us"]);
        let ab = cluster("a-b", Some("2026-01-02T00:00:00Z"), &["us"]);
        let all = [a.clone(), b.clone(), ab.clone()];
        for pc in &all {
            assert_eq!(name_clash(pc, &all), Ok(()), "{:?}", pc.metadata.name);
        }
    }

    /// Created in the same second, the smaller name came first; one not
    /// stored yet comes after every stored one.
    #[test]
    fn the_earlier_one_is_decided_by_time_then_name() {
        let a = cluster("a", Some("2026-01-01T00:00:00Z"), &["b-eu"]);
        let ab = cluster("a-b", Some("2026-01-01T00:00:00Z"), &["eu"]);
        assert!(name_clash(&a, &[a.clone(), ab.clone()]).is_ok());
        assert!(name_clash(&ab, &[a.clone(), ab.clone()]).is_err());
        let unsaved = cluster("a", None, &["b-eu"]);
        assert!(name_clash(&unsaved, &[unsaved.clone(), ab.clone()]).is_err());
        assert!(name_clash(&ab, &[unsaved, ab.clone()]).is_ok());
    }
}
