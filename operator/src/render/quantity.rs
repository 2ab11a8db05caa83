//! Kubernetes quantities in a spec (`storageSize`, `resources`), checked
//! before anything is applied: the API server takes any string for them in
//! a PresenceCluster, but refuses a StatefulSet or Deployment that carries
//! an invalid one, and a size NATS can't hold would leave the hub's config
//! refused. Either way the spec, not a later apply, should say what is
//! wrong.

use super::RenderError;
use crate::crd::PresenceClusterSpec;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Whether `q` is a Kubernetes quantity that can size a resource: a
/// decimal number (a `+` allowed, a `-` not: no request, limit or volume
/// is negative) followed by nothing, a binary suffix (`Ki`…`Ei`), a
/// decimal SI suffix (`n`, `u`, `m`, `k`, `M`…`E`) or a decimal exponent
/// (`e3`).
pub fn is_quantity(q: &str) -> bool {
    let unsigned = q.strip_prefix('+').unwrap_or(q);
    let end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let dots = number.matches('.').count();
    if digits == 0 || dots > 1 {
        return false;
    }
    match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())),
    }
}

fn dataplane_resources(
    overrides: Option<&crate::crd::DataplaneOverrides>,
) -> Option<&ResourceRequirements> {
    overrides.and_then(|d| d.resources.as_ref())
}

/// Checks every quantity of `spec`, naming the field of the first that
/// is not one, or that is a size no NATS config can hold.
pub fn check_quantities(spec: &PresenceClusterSpec) -> Result<(), RenderError> {
    let center = &spec.center;
    if let Some(size) = center
        .jetstream
        .as_ref()
        .and_then(|j| j.storage_size.as_ref())
    {
        check_size("center.jetstream.storageSize", size)?;
    }
    check_resources("center.resources", center.resources.as_ref(), Sizes::Nats)?;
    check_resources(
        "dataplane.resources",
        spec.dataplane.as_ref().and_then(|d| d.resources.as_ref()),
        Sizes::Kubernetes,
    )?;
    check_resources(
        "center.dataplane.resources",
        dataplane_resources(center.dataplane.as_ref()),
        Sizes::Kubernetes,
    )?;
    for leaf in &spec.leaves {
        let name = &leaf.name;
        let nats = leaf.nats.as_ref().and_then(|n| n.resources.as_ref());
        check_resources(&format!("leaves[{name}].nats.resources"), nats, Sizes::Nats)?;
        let dataplane = dataplane_resources(leaf.dataplane.as_ref());
        check_resources(
            &format!("leaves[{name}].dataplane.resources"),
            dataplane,
            Sizes::Kubernetes,
        )?;
    }
    Ok(())
}

/// Who reads a container's memory as a number: NATS (its `GOMEMLIMIT`,
/// below 8Ei) or Kubernetes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sizes {
    Nats,
    Kubernetes,
}

fn check_resources(
    field: &str,
    resources: Option<&ResourceRequirements>,
    sizes: Sizes,
) -> Result<(), RenderError> {
    let Some(resources) = resources else {
        return Ok(());
    };
    let lists = [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ];
    for (list, quantities) in lists {
        for (resource, quantity) in quantities.iter().flatten() {
            let field = format!("{field}.{list}.{resource}");
            if resource == "memory" && sizes == Sizes::Nats {
                check_size(&field, quantity)?;
            } else if !is_quantity(&quantity.0) {
                return Err(not_a_quantity(&field, quantity));
            }
        }
    }
    Ok(())
}

/// A size in bytes: a quantity, and at most what a signed 64-bit integer
/// holds (NATS reads its limits as one; `GOMEMLIMIT` too).
fn check_size(field: &str, quantity: &Quantity) -> Result<(), RenderError> {
    if !is_quantity(&quantity.0) {
        return Err(not_a_quantity(field, quantity));
    }
    match super::nats::quantity_bytes(&quantity.0) {
        Some(_) => Ok(()),
        None => Err(RenderError::InvalidSpec(format!(
            "{field} {:?} is not a size below 8Ei",
            quantity.0
        ))),
    }
}

fn not_a_quantity(field: &str, quantity: &Quantity) -> RenderError {
    RenderError::InvalidSpec(format!(
        "{field} {:?} is not a Kubernetes quantity (for example 10Gi, 500M or 250m)",
        quantity.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_quantities_are_told_apart() {
        for good in [
            "+1Gi", "10Gi", "500M", "1024", "1.5Ki", "250m", "0.5", "1e9", "2E-3", "+1k", ".5",
            "5.",
        ] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in [
            "20GB", "", "Gi", "1.2.3", "10 Gi", "1e", "1e+", "ten", "10gi", "1Zi", "--1",
        ] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    fn spec(yaml: &str) -> PresenceClusterSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn a_bad_quantity_is_named_by_its_field() {
        let err = |yaml: &str| check_quantities(&spec(yaml)).unwrap_err().to_string();
        let text = err("center: {jetstream: {storageSize: 20GB}}");
        assert!(
            text.contains("center.jetstream.storageSize \"20GB\""),
            "{text}"
        );
        let text = err("center: {jetstream: {storageSize: 100Ei}}");
        assert!(text.contains("not a size"), "{text}");
        let text =
            err("center: {}\nleaves: [{name: eu, nats: {resources: {limits: {memory: 2GB}}}}]");
        assert!(
            text.contains("leaves[eu].nats.resources.limits.memory \"2GB\""),
            "{text}"
        );
        let text = err("center: {}\ndataplane: {resources: {requests: {cpu: lots}}}");
        assert!(text.contains("dataplane.resources.requests.cpu"), "{text}");
        let good = "center: {jetstream: {storageSize: 7Ei}, resources: {requests: {cpu: 250m, memory: 1Gi}}}";
        assert!(check_quantities(&spec(good)).is_ok());
        // Only NATS reads memory as a 64-bit number; a signed `+` is fine.
        let big = "center: {resources: {limits: {memory: +1Gi}}}\ndataplane: {resources: {limits: {memory: 9Ei}}}";
        assert!(check_quantities(&spec(big)).is_ok());
        let negative = err("center: {}\ndataplane: {resources: {requests: {memory: -1Gi}}}");
        assert!(
            negative.contains("is not a Kubernetes quantity"),
            "{negative}"
        );
    }
}
