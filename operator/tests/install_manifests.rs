//! The install manifests under `config/`: what the kustomizations put
//! together, checked without kustomize (which CI does not have). Schema
//! validation of every object is `scripts/validate-manifests.sh`'s job.

use serde_yaml::Value;
use std::path::{Path, PathBuf};

fn config(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(path)
}

fn yaml(path: &str) -> Value {
    let file = config(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_sequence()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The kustomization's patches, each parsed from its inline text.
fn patches(kustomization: &Value) -> Vec<(Value, Value)> {
    kustomization["patches"]
        .as_sequence()
        .expect("patches")
        .iter()
        .map(|entry| {
            let text = entry["patch"].as_str().expect("an inline patch");
            let patch: Value = serde_yaml::from_str(text).expect("a YAML patch");
            (entry["target"].clone(), patch)
        })
        .collect()
}

#[test]
fn the_namespaced_role_grants_exactly_what_the_cluster_role_grants() {
    let cluster_role = yaml("rbac/cluster_role.yaml");
    let role = yaml("namespaced/role.yaml");
    assert_eq!(role["kind"], "Role");
    assert_eq!(
        role["rules"], cluster_role["rules"],
        "config/namespaced/role.yaml's rules must be config/rbac/cluster_role.yaml's"
    );
    assert_eq!(role["metadata"]["name"], cluster_role["metadata"]["name"]);
}

#[test]
fn the_namespaced_role_is_bound_to_the_operators_service_account() {
    let binding = yaml("namespaced/role_binding.yaml");
    let account = yaml("rbac/service_account.yaml");
    let role = yaml("namespaced/role.yaml");
    assert_eq!(binding["kind"], "RoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"], "ServiceAccount");
    assert_eq!(subject["name"], account["metadata"]["name"]);
    let deployment = yaml("manager/deployment.yaml");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
}

#[test]
fn the_namespaced_install_has_no_cluster_rights_and_watches_its_own_namespace() {
    let kustomization = yaml("namespaced/kustomization.yaml");
    let resources = strings(&kustomization["resources"]);
    for resource in ["../manager", "../rbac", "role.yaml", "role_binding.yaml"] {
        assert!(resources.contains(&resource), "{resource} in {resources:?}");
    }
    assert!(
        !resources.iter().any(|r| r.contains("crds")),
        "the CRD is cluster-scoped: an administrator installs it, not this variant"
    );
    let patches = patches(&kustomization);
    // Whatever cluster-scoped object the included kustomizations bring
    // (the Namespace from ../manager, the ClusterRole and its binding from
    // ../rbac) is deleted, however those directories change later.
    let brought: Vec<Value> = resources
        .iter()
        .filter_map(|r| r.strip_prefix("../"))
        .flat_map(|dir| {
            let included = yaml(&format!("{dir}/kustomization.yaml"));
            strings(&included["resources"])
                .into_iter()
                .map(|file| yaml(&format!("{dir}/{file}")))
                .collect::<Vec<_>>()
        })
        .collect();
    let cluster_scoped: Vec<&Value> = brought
        .iter()
        .filter(|object| {
            matches!(
                object["kind"].as_str(),
                Some(
                    "Namespace"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "CustomResourceDefinition"
                        | "ValidatingWebhookConfiguration"
                        | "MutatingWebhookConfiguration"
                )
            )
        })
        .collect();
    assert!(
        cluster_scoped.len() >= 3,
        "the Namespace, ClusterRole and ClusterRoleBinding: {cluster_scoped:?}"
    );
    for object in cluster_scoped {
        let deleted = patches.iter().any(|(_, patch)| {
            patch["$patch"] == "delete"
                && patch["kind"] == object["kind"]
                && patch["apiVersion"] == object["apiVersion"]
                && patch["metadata"]["name"] == object["metadata"]["name"]
        });
        assert!(
            deleted,
            "no patch deletes the {:?} {:?}",
            object["kind"], object["metadata"]["name"]
        );
    }
    // As shipped, it installs into the namespace config/default creates.
    let namespace = kustomization["namespace"].as_str().expect("a namespace");
    assert_eq!(
        Some(namespace),
        yaml("manager/namespace.yaml")["metadata"]["name"].as_str()
    );
    // The operator's Deployment gets WATCH_NAMESPACE from its own namespace.
    let deployment = yaml("manager/deployment.yaml");
    let watch = patches
        .iter()
        .find(|(target, _)| {
            target["kind"] == "Deployment" && target["name"] == deployment["metadata"]["name"]
        })
        .map(|(_, patch)| patch)
        .expect("a patch of the operator's Deployment");
    let op = &watch[0];
    assert_eq!(op["op"], "add");
    assert_eq!(op["path"], "/spec/template/spec/containers/0/env/-");
    assert_eq!(op["value"]["name"], "WATCH_NAMESPACE");
    assert_eq!(
        op["value"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    // The first container is the operator, and it has an env list to add to.
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "operator");
    assert!(container["env"].as_sequence().is_some());
}

#[test]
fn both_installs_pin_the_same_operator_image() {
    let default = yaml("default/kustomization.yaml");
    let namespaced = yaml("namespaced/kustomization.yaml");
    assert_eq!(default["images"], namespaced["images"]);
}

/// What dies with all data when deleted, the CRD (every PresenceCluster)
/// and the namespace (the hub's volume claims), Argo CD must never prune
/// or delete: uninstalling is a deliberate step (docs/operator.md).
#[test]
fn argo_cd_never_deletes_the_crd_or_the_namespace() {
    let namespace = yaml("manager/namespace.yaml");
    let crd_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/presencecluster.yaml");
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(crd_file).unwrap()).unwrap();
    for object in [namespace, crd] {
        let options = object["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
            .as_str()
            .unwrap_or_default();
        let options: Vec<&str> = options.split(',').map(str::trim).collect();
        assert!(options.contains(&"Delete=false"), "{:?}", object["kind"]);
        assert!(options.contains(&"Prune=false"), "{:?}", object["kind"]);
    }
}
