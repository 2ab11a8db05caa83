//! Step 1: the spec check. The API server enforces most of these rules
//! with CEL when it has the CRD; this catches an object that skipped them
//! (an old CRD, or a manifest run by `render` or `dev`), adds what CEL
//! can't say (what a leaf in another cluster needs), and checks that this
//! operator's cluster is one the manifest places regions in.

use crate::crd::{MAX_CLUSTER_NAME, PresenceCluster, PresenceClusterSpec, Region, Role};
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

/// A region of one PresenceCluster whose objects would have the names of
/// another's region: `a` with leaf `b-eu` and `a-b` with leaf `eu` both
/// make `a-b-eu-*`. Each would take them over from the other on every
/// reconcile (applies are forced), so one of the two must give way.
#[derive(Debug, Clone)]
pub struct Clash<'a> {
    /// `<cluster>-<region>`, the names' common start.
    pub prefix: String,
    pub region: String,
    pub other: &'a PresenceCluster,
    pub their_region: String,
}

/// Every region of `pc` whose names another PresenceCluster of `others`
/// (the ones in its namespace, `pc` among them or not) makes too, among
/// the regions with objects in the cluster `here` (see
/// [`has_objects_here`]) on both sides.
pub fn name_clashes<'a>(
    pc: &PresenceCluster,
    others: &'a [PresenceCluster],
    here: Option<&str>,
) -> Vec<Clash<'a>> {
    let ours = render::Names::new(&pc.name_any());
    let mut clashes = Vec::new();
    for other in others.iter().filter(|o| o.name_any() != pc.name_any()) {
        let theirs = render::Names::new(&other.name_any());
        let their_regions = other.spec.regions();
        for region in pc.spec.regions() {
            if !has_objects_here(&pc.spec, &region, here) {
                continue;
            }
            let prefix = ours.region_prefix(region.name);
            if let Some(same) = their_regions.iter().find(|r| {
                has_objects_here(&other.spec, r, here) && theirs.region_prefix(r.name) == prefix
            }) {
                clashes.push(Clash {
                    prefix,
                    region: region.name.to_owned(),
                    other,
                    their_region: same.name.to_owned(),
                });
            }
        }
    }
    clashes
}

/// Whether the operator of the cluster `here` makes objects named after
/// `region`: it runs there, or it is a leaf whose nkey Secret the hub's
/// cluster generates (a leaf elsewhere brings its own).
fn has_objects_here(spec: &PresenceClusterSpec, region: &Region<'_>, here: Option<&str>) -> bool {
    render::clusters::is_here(region, here)
        || (region.role == Role::Leaf
            && region.leaf_credentials.is_none()
            && spec.center_runs_in(here))
}

/// Why `pc` must give way to the other side of `clash`, if it must. The one
/// that holds the objects already (`holder`: the controller of the clashing
/// region's NATS ConfigMap or nkey Secret, if one exists) keeps them, so a
/// spec change that brings a clash about is the one refused, as an invalid
/// spec would be. When neither holds them, the one created first keeps
/// them (then the smaller name). Over one clashing region exactly one of
/// the two gives way; two clusters clashing over two regions each hold
/// one of can both be refused, until either spec is mended.
pub fn gives_way(pc: &PresenceCluster, clash: &Clash<'_>, holder: Option<&str>) -> Option<String> {
    let other = clash.other;
    let why = match holder {
        Some(uid) if pc.uid().as_deref() == Some(uid) => return None,
        Some(uid) if other.uid().as_deref() == Some(uid) => "which holds them",
        _ if came_first(other, pc) => "created earlier",
        _ => return None,
    };
    Some(format!(
        "region {:?} would name its objects {}-..., as region {:?} of PresenceCluster {:?} in this namespace, {why}, does; rename this PresenceCluster or the region",
        clash.region,
        clash.prefix,
        clash.their_region,
        other.name_any()
    ))
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

    /// Why `pc` gives way to any of `others`, nobody holding the objects.
    fn refusal(pc: &PresenceCluster, others: &[PresenceCluster]) -> Result<(), String> {
        match name_clashes(pc, others, None)
            .iter()
            .find_map(|clash| gives_way(pc, clash, None))
        {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    #[test]
    fn only_the_later_of_two_clusters_with_the_same_object_names_is_refused() {
        let a = cluster("a", Some("2026-01-01T00:00:00Z"), &["b-eu"]);
        let ab = cluster("a-b", Some("2026-01-02T00:00:00Z"), &["eu"]);
        let all = [a.clone(), ab.clone()];
        assert_eq!(refusal(&a, &all), Ok(()));
        let refused = refusal(&ab, &all).expect_err("a-b came second");
        assert!(refused.contains("a-b-eu-"), "{refused}");
        assert!(
            refused.contains("\"a\" in this namespace, created earlier"),
            "{refused}"
        );
        let clashes = name_clashes(&a, &all, None);
        assert_eq!(
            clashes
                .iter()
                .map(|c| (
                    c.prefix.as_str(),
                    c.region.as_str(),
                    c.their_region.as_str()
                ))
                .collect::<Vec<_>>(),
            [("a-b-eu", "b-eu", "eu")]
        );
        // A center named like the other's leaf clashes too.
        let centered = cluster("a-b", Some("2026-01-02T00:00:00Z"), &[]);
        let mut centered_at_eu = centered.clone();
        centered_at_eu.spec.center.name = Some("eu".into());
        assert!(refusal(&centered_at_eu, &[a.clone(), centered_at_eu.clone()]).is_err());
        assert_eq!(refusal(&centered, &[a.clone(), centered.clone()]), Ok(()));
    }

    /// The one holding the objects keeps them, however old: a spec change
    /// of the older one that brings the clash about is what is refused.
    #[test]
    fn the_one_holding_the_objects_keeps_them() {
        let mut a = cluster("a", Some("2026-01-01T00:00:00Z"), &["b-eu"]);
        a.metadata.uid = Some("uid-a".into());
        let mut ab = cluster("a-b", Some("2026-01-02T00:00:00Z"), &["eu"]);
        ab.metadata.uid = Some("uid-a-b".into());
        let all = [a.clone(), ab.clone()];
        let [ours] = name_clashes(&a, &all, None).try_into().expect("one clash");
        let why = gives_way(&a, &ours, Some("uid-a-b")).expect("a-b holds them");
        assert!(
            why.contains("\"a-b\" in this namespace, which holds them"),
            "{why}"
        );
        let [theirs] = name_clashes(&ab, &all, None).try_into().expect("one clash");
        assert_eq!(gives_way(&ab, &theirs, Some("uid-a-b")), None);
        // Held by neither (a third owner, or none): the older one keeps them.
        assert_eq!(gives_way(&a, &ours, Some("uid-x")), None);
        assert!(gives_way(&ab, &theirs, Some("uid-x")).is_some());
    }

    #[test]
    fn clusters_whose_names_differ_never_clash() {
        let a = cluster("a", Some("2026-01-01T00:00:00Z"), &["eu", "us"]);
        let b = cluster("b", Some("2026-01-02T00:00:00Z"), &["eu", "us"]);
        let ab = cluster("a-b", Some("2026-01-02T00:00:00Z"), &["us"]);
        let all = [a.clone(), b.clone(), ab.clone()];
        for pc in &all {
            assert!(
                name_clashes(pc, &all, None).is_empty(),
                "{:?}",
                pc.metadata.name
            );
        }
    }

    /// Regions count where their objects are: two leaves placed in another
    /// Kubernetes cluster, each with its own nkey Secret, clash there and
    /// not in the hub's cluster; a leaf whose Secret the hub's cluster
    /// generates clashes there too.
    #[test]
    fn regions_clash_only_where_their_objects_are() {
        let placed = |name: &str, created: &str, leaf: &str, own_seed: bool| {
            let mut leaf = serde_json::json!({"name": leaf, "cluster": "eu-cluster"});
            if own_seed {
                leaf["nats"] =
                    serde_json::json!({"credentialsSecretRef": {"name": "s", "key": "seed"}});
            }
            serde_json::from_value::<PresenceCluster>(serde_json::json!({
                "apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
                "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
                "spec": {"center": {"cluster": "hub-cluster"}, "leaves": [leaf]}
            }))
            .expect("a PresenceCluster")
        };
        let a = placed("a", "2026-01-01T00:00:00Z", "b-eu", true);
        let ab = placed("a-b", "2026-01-02T00:00:00Z", "eu", true);
        let all = [a, ab.clone()];
        assert!(name_clashes(&ab, &all, Some("hub-cluster")).is_empty());
        assert_eq!(name_clashes(&ab, &all, Some("eu-cluster")).len(), 1);
        assert_eq!(name_clashes(&ab, &all, None).len(), 1);
        let generated = [
            placed("a", "2026-01-01T00:00:00Z", "b-eu", false),
            placed("a-b", "2026-01-02T00:00:00Z", "eu", false),
        ];
        assert_eq!(
            name_clashes(&generated[1], &generated, Some("hub-cluster")).len(),
            1
        );
    }

    /// Created in the same second, the smaller name came first; one not
    /// stored yet comes after every stored one.
    #[test]
    fn the_earlier_one_is_decided_by_time_then_name() {
        let a = cluster("a", Some("2026-01-01T00:00:00Z"), &["b-eu"]);
        let ab = cluster("a-b", Some("2026-01-01T00:00:00Z"), &["eu"]);
        assert!(refusal(&a, &[a.clone(), ab.clone()]).is_ok());
        assert!(refusal(&ab, &[a.clone(), ab.clone()]).is_err());
        let unsaved = cluster("a", None, &["b-eu"]);
        assert!(refusal(&unsaved, &[unsaved.clone(), ab.clone()]).is_err());
        assert!(refusal(&ab, &[unsaved, ab.clone()]).is_ok());
    }
}
