//! Step 1: the spec check. The API server enforces most of these rules
//! with CEL when it has the CRD; this catches an object that skipped them
//! (an old CRD, or a manifest run by `render` or `dev`), adds what CEL
//! can't say (what a leaf in another cluster needs), and checks that this
//! operator's cluster is one the manifest places regions in.

use crate::crd::{MAX_CLUSTER_NAME, PresenceCluster};
use crate::render;

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
