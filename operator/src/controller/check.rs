//! Step 1: the spec check. The API server enforces the same rules with CEL
//! when it has the CRD; this catches an object that skipped them (an old
//! CRD, or a manifest run by `render` or `dev`).

use crate::crd::{MAX_CLUSTER_NAME, PresenceCluster};
use crate::render;

/// Why the spec can't be applied, in words a person can act on.
pub fn spec(pc: &PresenceCluster, scope: &render::Scope) -> Result<(), String> {
    render::check_spec(&pc.spec).map_err(|e| e.to_string())?;
    if scope.name.len() > MAX_CLUSTER_NAME {
        return Err(format!(
            "metadata.name {:?} is longer than {MAX_CLUSTER_NAME} characters",
            scope.name
        ));
    }
    Ok(())
}
