//! Which regions run in which Kubernetes cluster, and what a manifest
//! spread over clusters must say for each cluster's operator to do its
//! share and nothing more. `crate::crd::runs_in` is the one rule.

use super::RenderError;
use crate::crd::{PresenceClusterSpec, Role};
use std::collections::BTreeSet;

/// What a leaf in another cluster than the center needs: an address to
/// dial, and everything both clusters must share coming from Secrets you
/// place in both (generated ones never leave their cluster).
pub fn check_multi_cluster(spec: &PresenceClusterSpec) -> Result<(), RenderError> {
    let remote: Vec<&crate::crd::LeafSpec> = spec
        .leaves
        .iter()
        .filter(|l| {
            l.cluster
                .as_deref()
                .is_some_and(|c| c != spec.center_cluster())
        })
        .collect();
    let invalid = |m: String| Err(RenderError::InvalidSpec(m));
    if spec.center.cluster.is_none()
        && let Some(leaf) = spec.leaves.iter().find(|l| l.cluster.is_some())
    {
        return invalid(format!(
            "leaf {:?} names its cluster but the center doesn't: set center.cluster too, or \
             every cluster would run a hub of its own",
            leaf.name
        ));
    }
    let Some(first) = remote.first() else {
        return Ok(());
    };
    if spec.leafnode_advertise().is_none() {
        return invalid(format!(
            "leaf {:?} runs in another cluster than the center: set center.leafnodes.advertise to the address it dials (and center.leafnodes.serviceType to expose it)",
            first.name
        ));
    }
    if let Some(leaf) = remote.iter().find(|l| {
        l.nats
            .as_ref()
            .and_then(|n| n.credentials_secret_ref.as_ref())
            .is_none()
    }) {
        return invalid(format!(
            "leaf {:?} runs in another cluster than the center: set leaves[].nats.credentialsSecretRef to a Secret holding its nkey seed, present in both clusters",
            leaf.name
        ));
    }
    if spec
        .tls
        .as_ref()
        .and_then(|t| t.secret_name.as_ref())
        .is_none()
    {
        return invalid("leaves run in other clusters than the center: set tls.secretName to a certificate Secret present in every cluster (its ca.crt lets leaves check the hub)".into());
    }
    if spec
        .auth
        .as_ref()
        .and_then(|a| a.jwt_secret_ref.as_ref())
        .is_none()
    {
        return invalid("leaves run in other clusters than the center: set auth.jwtSecretRef to a Secret present in every cluster, so a token works in every region".into());
    }
    Ok(())
}

/// Whether `region` runs in the cluster `here` (see [`crate::crd::runs_in`]).
pub fn is_here(region: &crate::crd::Region<'_>, here: Option<&str>) -> bool {
    crate::crd::runs_in(region.cluster, here)
}

/// The leaf regions whose identities the cluster `here` needs: all of them
/// where the hub runs (its config lists every leaf), else its own.
pub fn needed_leaves(spec: &PresenceClusterSpec, here: Option<&str>) -> Vec<String> {
    let hub_here = spec.center_runs_in(here);
    spec.regions()
        .iter()
        .filter(|r| r.role == Role::Leaf && (hub_here || is_here(r, here)))
        .map(|r| r.name.to_owned())
        .collect()
}

/// The clusters the manifest names (the center's and the leaves').
pub fn named_clusters(spec: &PresenceClusterSpec) -> BTreeSet<&str> {
    spec.center
        .cluster
        .as_deref()
        .into_iter()
        .chain(spec.leaves.iter().filter_map(|l| l.cluster.as_deref()))
        .collect()
}

/// Whether an operator serving the cluster `here` (`None`: started without
/// `--cluster-name`) may act on `spec`. A manifest that names clusters needs
/// the operator to know its own, and to find it there: otherwise it would
/// run every region, or (a typo) prune every region it made before.
pub fn check_operator_cluster(
    spec: &PresenceClusterSpec,
    here: Option<&str>,
) -> Result<(), RenderError> {
    let named = named_clusters(spec);
    if named.is_empty() {
        return Ok(());
    }
    let list = named.iter().copied().collect::<Vec<_>>().join(", ");
    match here {
        None => Err(RenderError::InvalidSpec(format!(
            "this manifest places its regions in clusters ({list}): start the operator with \
             --cluster-name (PRESENCE_CLUSTER_NAME) set to the one it runs in"
        ))),
        Some(c) if !named.contains(c) => Err(RenderError::InvalidSpec(format!(
            "no region of this manifest runs in cluster {c:?} (it names {list}); check the \
             operator's --cluster-name, or delete this PresenceCluster here to remove what is \
             left of it in this cluster"
        ))),
        Some(_) => Ok(()),
    }
}
