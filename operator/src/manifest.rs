//! Reading a PresenceCluster manifest from a file, for `render` and `dev`,
//! which never send it through an API server. The API server would refuse
//! another kind or version, and drop a field the schema doesn't have; a
//! misspelt field (`replica: 3`) would then quietly mean its default. Here
//! both are errors that name what is wrong.

use crate::crd::PresenceCluster;
use kube::Resource as _;
use serde::Deserialize as _;
use serde_yaml::Value;

/// Why a manifest can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not YAML: {0}")]
    Yaml(String),
    /// No document, or several, to take as the PresenceCluster.
    #[error("{0}")]
    Documents(String),
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
    /// A value outside the CRD schema's bounds, which the API server would
    /// refuse: `spec.dataplane.replicas: -1 is below the minimum 0`.
    #[error("{0}")]
    OutOfBounds(String),
}

/// The PresenceCluster in `text`, refusing another kind or version and
/// any field of `spec` the resource doesn't have.
pub fn parse(text: &str) -> Result<PresenceCluster, ManifestError> {
    let (document, value) = the_presence_cluster(text)?;
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
    let cluster: PresenceCluster = serde_yaml::from_value(value.clone())
        .map_err(|e| ManifestError::Invalid(located(text, document, &e.to_string())))?;
    // What the typed resource keeps of the spec: a field it doesn't know
    // is missing from it.
    let kept = serde_yaml::to_value(&cluster.spec).map_err(invalid)?;
    let mut unknown = Vec::new();
    if let Some(spec) = value.get("spec") {
        unknown_fields(spec, &kept, "spec", &mut unknown);
    }
    if !unknown.is_empty() {
        return Err(ManifestError::UnknownFields(unknown));
    }
    let crd = crate::crd::definition();
    let schema = crd.spec.versions.first().and_then(|v| v.schema.as_ref());
    let schema = schema.and_then(|s| s.open_api_v3_schema.as_ref());
    if let (Some(schema), Some(spec)) = (schema, value.get("spec")) {
        let schema =
            serde_json::to_value(schema).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        let spec = serde_json::to_value(spec).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        bounds(&spec, &schema["properties"]["spec"], "spec").map_err(ManifestError::OutOfBounds)?;
    }
    Ok(cluster)
}

/// `message`, the error of reading document `document` of `text` as a
/// value, with the field and line that reading the text gives
/// (`spec.center.replicas: invalid type: ... at line 5 column 13`) when
/// that read fails the same way. Only for the message: read from the
/// text, a plain scalar passes for a string (`name: 123`), which the API
/// server, and the value, refuse, so the text's read may stop elsewhere.
fn located(text: &str, document: usize, message: &str) -> String {
    let Some(document) = serde_yaml::Deserializer::from_str(text).nth(document) else {
        return message.to_owned();
    };
    match PresenceCluster::deserialize(document) {
        Err(e) if e.to_string().contains(message) => e.to_string(),
        _ => message.to_owned(),
    }
}

/// Checks `value` against the bounds `schema` sets, as the API server's
/// OpenAPI validation does (types are serde's job, CEL rules
/// [`crate::render::check_spec`]'s): minimum and maximum, string lengths
/// and patterns, enums, list and map sizes.
fn bounds(value: &serde_json::Value, schema: &serde_json::Value, path: &str) -> Result<(), String> {
    use serde_json::Value as J;
    let number = |key: &str| schema.get(key).and_then(J::as_f64);
    let count = |key: &str| schema.get(key).and_then(J::as_u64);
    match value {
        J::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(min) = number("minimum").filter(|min| n < *min) {
                return Err(format!("{path}: {value} is below the minimum {min}"));
            }
            if let Some(max) = number("maximum").filter(|max| n > *max) {
                return Err(format!("{path}: {value} is above the maximum {max}"));
            }
        }
        J::String(text) => {
            let length = text.chars().count() as u64;
            if count("minLength").is_some_and(|min| length < min) {
                return Err(format!(
                    "{path}: {text:?} is shorter than {} characters",
                    count("minLength").unwrap_or_default()
                ));
            }
            if count("maxLength").is_some_and(|max| length > max) {
                return Err(format!(
                    "{path}: {text:?} is longer than {} characters",
                    count("maxLength").unwrap_or_default()
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(J::as_str) {
                let matches = regex::Regex::new(pattern).map(|re| re.is_match(text));
                if matches.is_ok_and(|m| !m) {
                    return Err(format!("{path}: {text:?} does not match {pattern}"));
                }
            }
            if let Some(choices) = schema.get("enum").and_then(J::as_array)
                && !choices.contains(value)
            {
                let choices: Vec<String> = choices.iter().map(J::to_string).collect();
                return Err(format!(
                    "{path}: {text:?} is not one of {}",
                    choices.join(", ")
                ));
            }
        }
        J::Array(items) => {
            if let Some(max) = count("maxItems").filter(|max| items.len() as u64 > *max) {
                return Err(format!(
                    "{path}: {} items, at most {max} allowed",
                    items.len()
                ));
            }
            for (i, item) in items.iter().enumerate() {
                bounds(item, &schema["items"], &format!("{path}[{i}]"))?;
            }
        }
        J::Object(fields) => {
            if let Some(max) = count("maxProperties").filter(|max| fields.len() as u64 > *max) {
                return Err(format!(
                    "{path}: {} entries, at most {max} allowed",
                    fields.len()
                ));
            }
            for (key, field) in fields {
                let field_schema = match schema.get("properties").and_then(|p| p.get(key)) {
                    Some(known) => known,
                    None => &schema["additionalProperties"],
                };
                bounds(field, field_schema, &format!("{path}.{key}"))?;
            }
        }
        J::Null | J::Bool(_) => {}
    }
    Ok(())
}

/// The one document of `text` that is a PresenceCluster (a file may hold
/// other objects beside it, separated by `---`), else the only document,
/// with its place among the file's documents.
fn the_presence_cluster(text: &str) -> Result<(usize, Value), ManifestError> {
    let mut documents = Vec::new();
    for (place, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| ManifestError::Yaml(e.to_string()))?;
        if !value.is_null() {
            documents.push((place, value));
        }
    }
    let kind = |v: &Value| {
        v.get("kind").and_then(Value::as_str) == Some(PresenceCluster::kind(&()).as_ref())
    };
    let mut clusters: Vec<(usize, Value)> =
        documents.iter().filter(|(_, v)| kind(v)).cloned().collect();
    match (clusters.len(), documents.len()) {
        (1, _) => Ok(clusters.remove(0)),
        (0, 1) => Ok(documents.remove(0)),
        (0, 0) => Err(ManifestError::Documents(
            "the file holds no document".into(),
        )),
        (0, _) => Err(ManifestError::Documents(
            "none of the file's documents is a PresenceCluster".into(),
        )),
        (n, _) => Err(ManifestError::Documents(format!(
            "the file holds {n} PresenceClusters; give one at a time"
        ))),
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
                parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                read += 1;
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
    fn values_beyond_the_schemas_bounds_are_refused() {
        for (spec, message) in [
            (
                "center: {}\n  dataplane: {replicas: -1}",
                "spec.dataplane.replicas: -1 is below the minimum 0",
            ),
            (
                "center: {}\n  dataplane: {streams: {keepAliveSeconds: 0}}",
                "spec.dataplane.streams.keepAliveSeconds: 0 is below the minimum 1",
            ),
            (
                "center: {}\n  kv: {bucket: a.b}",
                "spec.kv.bucket: \"a.b\" does not match",
            ),
            (
                "center: {}\n  leaves: [{name: eu, nats: {replicas: 9}}]",
                "spec.leaves[0].nats.replicas: 9 is above the maximum 5",
            ),
        ] {
            let text = format!("{HEAD}spec:\n  {spec}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(message), "{spec}: {err}");
        }
    }

    #[test]
    fn the_presence_cluster_of_a_file_with_other_objects_is_read() {
        let cluster = format!("{HEAD}spec: {{center: {{}}}}\n");
        let other = "apiVersion: v1\nkind: Namespace\nmetadata: {name: presence}\n";
        let file = format!("{other}---\n{cluster}---\n");
        assert_eq!(
            parse(&file).expect("reads").metadata.name.as_deref(),
            Some("a")
        );
        let refusal = |file: String| parse(&file).unwrap_err().to_string();
        assert!(refusal(format!("{cluster}---\n{cluster}")).contains("2 PresenceClusters"));
        assert!(refusal(format!("{other}---\n{other}")).contains("none of the file's documents"));
        for empty in ["", "---\n", "# only a comment\n---\n---\n"] {
            assert_eq!(refusal(empty.to_owned()), "the file holds no document");
        }
    }

    /// A field of the wrong type is named by serde, with its place in the
    /// file, as `Invalid`; broken YAML is `Yaml`.
    #[test]
    fn a_value_of_the_wrong_type_or_broken_yaml_is_refused() {
        // After another object, so the line is the file's, not the document's.
        let other = "apiVersion: v1\nkind: Namespace\nmetadata: {name: presence}\n---\n";
        let text = format!(
            "{other}{HEAD}spec:\n  center: {{}}\n  leaves:\n  - name: eu\n    nats: {{replicas: two}}\n"
        );
        let err = parse(&text).unwrap_err();
        assert!(matches!(err, ManifestError::Invalid(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "spec.leaves[0].nats.replicas: invalid type: string \"two\", expected i32 at line 12 column 22"
        );
        let err = parse(&format!("{HEAD}spec: {{center: [}}\n")).unwrap_err();
        assert!(matches!(err, ManifestError::Yaml(_)), "{err:?}");
        // A number where a string belongs is refused, as the API server
        // refuses it (read from the text, YAML would let it pass).
        let err = parse(&format!(
            "{HEAD}spec:\n  center: {{}}\n  leaves: [{{name: 123}}]\n"
        ))
        .unwrap_err();
        assert!(matches!(err, ManifestError::Invalid(_)), "{err:?}");
        // With a second error after it, the message is the first's: the
        // text's read, which lets the number pass, would name the second.
        let text = format!(
            "{HEAD}spec:\n  center: {{}}\n  leaves: [{{name: 123}}, {{name: eu, nats: {{replicas: two}}}}]\n"
        );
        let message = parse(&text).unwrap_err().to_string();
        assert!(
            message.contains("123") && !message.contains("two"),
            "{message}"
        );
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
