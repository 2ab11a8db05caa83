//! Reading a PresenceCluster manifest from a file, for `render` and `dev`,
//! which never send it through an API server. The API server would refuse
//! another kind or version, and drop a field the schema doesn't have; a
//! misspelt field (`replica: 3`) would then quietly mean its default. Here
//! both are errors that name what is wrong.

use crate::crd::PresenceCluster;
use kube::Resource as _;
use serde_yaml::Value;

/// Why a manifest can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not YAML: {0}")]
    Yaml(String),
    /// A field of the wrong type or value, as serde names it.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "apiVersion {found:?} and kind {kind:?}: expected apiVersion {expected_api:?} and kind PresenceCluster"
    )]
    WrongKind {
        found: String,
        kind: String,
        expected_api: String,
    },
    #[error("{} is not a PresenceCluster field (misspelt?)", .0.join(", "))]
    UnknownFields(Vec<String>),
}

/// The PresenceCluster in `text`, refusing another kind or version and
/// any field of `spec` the resource doesn't have.
pub fn parse(text: &str) -> Result<PresenceCluster, ManifestError> {
    let value: Value =
        serde_yaml::from_str(text).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let text_of = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
    let expected_api = PresenceCluster::api_version(&()).into_owned();
    if api_version != expected_api || kind != PresenceCluster::kind(&()) {
        return Err(ManifestError::WrongKind {
            found: api_version,
            kind,
            expected_api,
        });
    }
    let invalid = |e: serde_yaml::Error| ManifestError::Invalid(e.to_string());
    let cluster: PresenceCluster = serde_yaml::from_value(value.clone()).map_err(invalid)?;
    // What the typed resource keeps of the spec: a field it doesn't know
    // is missing from it.
    let kept = serde_yaml::to_value(&cluster.spec).map_err(invalid)?;
    let mut unknown = Vec::new();
    if let Some(spec) = value.get("spec") {
        unknown_fields(spec, &kept, "spec", &mut unknown);
    }
    if unknown.is_empty() {
        Ok(cluster)
    } else {
        Err(ManifestError::UnknownFields(unknown))
    }
}

/// Adds to `unknown` the path of every key of `given` that `kept` lacks,
/// ignoring keys whose value is empty (`null`, `[]`, `{}`), which the
/// typed resource leaves out when it writes itself.
fn unknown_fields(given: &Value, kept: &Value, path: &str, unknown: &mut Vec<String>) {
    match (given, kept) {
        (Value::Mapping(given), Value::Mapping(kept)) => {
            for (key, value) in given {
                let name = key
                    .as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned);
                let here = format!("{path}.{name}");
                match kept.get(key) {
                    Some(kept_value) => unknown_fields(value, kept_value, &here, unknown),
                    None if is_empty(value) => {}
                    None => unknown.push(here),
                }
            }
        }
        (Value::Sequence(given), Value::Sequence(kept)) => {
            for (i, (value, kept_value)) in given.iter().zip(kept).enumerate() {
                unknown_fields(value, kept_value, &format!("{path}[{i}]"), unknown);
            }
        }
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Sequence(items) => items.is_empty(),
        Value::Mapping(map) => map.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str =
        "apiVersion: presencecluster.io/v1alpha1\nkind: PresenceCluster\nmetadata: {name: a}\n";

    #[test]
    fn every_example_reads() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).expect("examples") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            if text.contains("kind: PresenceCluster\n") {
                for document in text.split("\n---\n") {
                    if document.contains("kind: PresenceCluster\n") {
                        parse(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        read += 1;
                    }
                }
            }
        }
        assert!(read >= 5, "{read} examples read");
    }

    #[test]
    fn a_misspelt_field_is_named() {
        let text = format!(
            "{HEAD}spec:\n  center: {{replica: 3}}\n  leaves: [{{name: eu, natz: {{}}}}, {{name: us, nats: {{replicas: 2, resource: {{cpu: 1}}}}}}]\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        // `natz: {}` says nothing, as a typed resource writes no empty map.
        assert_eq!(
            err,
            "spec.center.replica, spec.leaves[1].nats.resource is not a PresenceCluster field (misspelt?)"
        );
    }

    #[test]
    fn empty_lists_and_maps_are_not_unknown() {
        let text = format!(
            "{HEAD}spec:\n  center: {{}}\n  leaves: []\n  dataplane: {{podLabels: {{}}}}\n"
        );
        parse(&text).expect("reads");
    }

    #[test]
    fn another_kind_or_version_is_refused() {
        let other = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {}\n";
        let err = parse(other).unwrap_err().to_string();
        assert!(
            err.contains("expected apiVersion \"presencecluster.io/v1alpha1\""),
            "{err}"
        );
        let old = HEAD.replace("v1alpha1", "v1beta9") + "spec: {center: {}}\n";
        assert!(matches!(parse(&old), Err(ManifestError::WrongKind { .. })));
    }
}
