//! Renderer tests: golden files, CRD drift, properties that hold for every
//! valid PresenceCluster, rendered nats.conf accepted by a real nats-server,
//! and the CRD's CEL rules evaluated as an API server would.
//!
//! `UPDATE_GOLDEN=1 cargo test -p presence-operator --test render` rewrites
//! the golden files; review the diff like any code change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResourceExt;
use presence_operator::crd::{CenterSpec, LeafSpec, PresenceCluster, PresenceClusterSpec};
use presence_operator::render::{self, Child, Inputs, Scope, nats};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with a golden file, or rewrites it under UPDATE_GOLDEN.
fn assert_golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the rendered output; if the change is intended, rerun with UPDATE_GOLDEN=1 and review the diff",
        path.display()
    );
}

fn load(name: &str) -> PresenceCluster {
    let text = std::fs::read_to_string(repo().join("examples").join(name)).expect("example");
    serde_yaml::from_str(&text).expect("example parses as a PresenceCluster")
}

/// Fixed test nkeys (throwaway: made for these tests, used nowhere else).
const PRESENCE_PUBLIC: &str = "UDQFCTB5FC5X3TBVAGKGERVFR5DVJ7PJH5ZDU47SY5HGKBNNXFRAMC4U";
const OPERATOR_PUBLIC: &str = "UBFZSM5BBNT5IZD2JSH4E7GIY6DCOKVDTK6F4GR4POXQZLAOA6J5YBKY";
const LEAF_PUBLICS: [&str; 3] = [
    "UCSUOECDYSFQNTQR3DDVQWHKUJGP4MQXG4YTUE46573ROBEHRGZKTFFQ",
    "UD7RYGBCBSV7C7LKJGUW6Q2VCNE3LYYDWSQGUEY5K2R7SEJQ7U3LDHJL",
    "UDATNYHYMKUBSMO6NUEK3G7TNSAPJB3DCBZP57KSKLFZBIA5JRLRLRH3",
];
const LEAF_SEED: &str = "SUACI4PG3JVGJGEWS6O7HKTTWXZ6TKZTSFMTLVJZIEU26IL6KKPRGG7GTI";

/// The identities an operator would read from the Secrets: fixed keys, so
/// renders are reproducible.
fn identities(cluster: &PresenceCluster) -> render::NatsIdentities {
    render::NatsIdentities {
        presence: PRESENCE_PUBLIC.into(),
        operator: OPERATOR_PUBLIC.into(),
        leaves: cluster
            .spec
            .leaves
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    l.name.clone(),
                    LEAF_PUBLICS[i % LEAF_PUBLICS.len()].to_owned(),
                )
            })
            .collect(),
        digests: Default::default(),
    }
}

/// Inputs with identities and nothing else.
fn inputs_for(cluster: &PresenceCluster) -> Inputs {
    Inputs {
        nats: Some(identities(cluster)),
        ..Default::default()
    }
}

fn render_fixed(cluster: &PresenceCluster) -> Vec<Child> {
    let mut cluster = cluster.clone();
    cluster.metadata.uid = Some("00000000-0000-4000-8000-000000000001".into());
    let ctx = Scope::new(&cluster, "default").expect("context");
    let inputs = Inputs {
        nats: Some(identities(&cluster)),
        generated_jwt_secret: Some("golden-secret".into()),
        jwt_secret_digest: Some("golden-digest".into()),
        hub_volume_size: None,
        hub_volume_capacity: None,
        operator_namespace: None,
        cluster: None,
    };
    render::render(&cluster, &ctx, &inputs).expect("renders")
}

#[test]
fn crd_file_matches_the_code() {
    let generated = serde_yaml::to_string(&presence_operator::crd::definition()).unwrap();
    assert_golden(&repo().join("crds/presencecluster.yaml"), &generated);
}

/// One rendering per Kubernetes cluster of a multi-cluster manifest.
#[test]
fn golden_multi_cluster_renderings() {
    let cluster = load("multi-cluster.yaml");
    for name in ["hub-cluster", "eu-cluster", "us-cluster"] {
        let mut cr = cluster.clone();
        cr.metadata.uid = Some("00000000-0000-4000-8000-000000000001".into());
        let ctx = Scope::new(&cr, "default").expect("context");
        let inputs = Inputs {
            nats: Some(identities(&cr)),
            jwt_secret_digest: Some("golden-digest".into()),
            cluster: Some(name.into()),
            ..Default::default()
        };
        let objects = render::render(&cr, &ctx, &inputs).expect("renders");
        // Only this cluster's regions, and the bucket's hub only in one.
        let regions: std::collections::BTreeSet<String> = objects
            .iter()
            .filter_map(|o| {
                o.metadata()
                    .labels
                    .as_ref()?
                    .get("presencecluster.io/region")
                    .cloned()
            })
            .collect();
        let expected: &[&str] = match name {
            "hub-cluster" => &["center"],
            "eu-cluster" => &["eu"],
            _ => &["us"],
        };
        assert_eq!(
            regions.iter().map(String::as_str).collect::<Vec<_>>(),
            expected,
            "{name}"
        );
        let yaml = render::to_yaml(&objects).unwrap();
        assert_golden(
            &golden_dir().join(format!("multi-cluster.{name}.yaml")),
            &yaml,
        );
        if name != "hub-cluster" {
            // Remote leaves dial the hub's advertised address, with TLS.
            assert!(
                yaml.contains("nats-leaf://hub.presence.example.com:7422"),
                "{name}"
            );
        } else {
            assert!(yaml.contains("no_advertise: true"));
            assert!(yaml.contains("type: LoadBalancer"));
        }
    }
}

/// The pod template and labels of every workload (StatefulSets and
/// Deployments) of `region`, by component.
fn pod_templates(
    objects: &[Child],
    region: &str,
) -> Vec<(String, k8s_openapi::api::core::v1::PodTemplateSpec)> {
    objects
        .iter()
        .filter(|o| {
            o.metadata()
                .labels
                .as_ref()
                .and_then(|l| l.get("presencecluster.io/region"))
                .is_some_and(|r| r == region)
        })
        .filter_map(|o| match o {
            Child::StatefulSet(s) => Some(("nats".to_owned(), s.spec.template.clone())),
            Child::Deployment(d) => Some(("dataplane".to_owned(), d.spec.template.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_manifest_naming_no_cluster_is_rendered_whole_under_any_cluster_name() {
    let cluster = load("multi-region.yaml");
    let ctx = Scope::new(&cluster, "default").unwrap();
    let all = render::render(&cluster, &ctx, &inputs_for(&cluster)).unwrap();
    let inputs = Inputs {
        cluster: Some("prod-eu-1".into()),
        ..inputs_for(&cluster)
    };
    let named = render::render(&cluster, &ctx, &inputs).unwrap();
    assert_eq!(
        render::to_yaml(&all).unwrap(),
        render::to_yaml(&named).unwrap()
    );
}

#[test]
fn placement_reaches_both_workloads_of_a_region_and_never_the_others() {
    let mut cluster = load("multi-region.yaml");
    let placement: presence_operator::crd::PlacementSpec = serde_json::from_value(serde_json::json!({
        "nodeSelector": {"topology.kubernetes.io/region": "europe-west4"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "presence", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}],
        "priorityClassName": "presence-critical",
        "podLabels": {"mesh": "on", "app.kubernetes.io/name": "hijack"},
        "podAnnotations": {"sidecar.istio.io/inject": "false"},
        "imagePullSecrets": [{"name": "registry"}]
    }))
    .unwrap();
    let eu = cluster.spec.leaves[0].name.clone();
    cluster.spec.leaves[0].placement = Some(placement);
    let ctx = Scope::new(&cluster, "default").unwrap();
    let objects = render::render(&cluster, &ctx, &inputs_for(&cluster)).unwrap();
    let placed = pod_templates(&objects, &eu);
    assert_eq!(
        placed.len(),
        2,
        "the leaf's NATS StatefulSet and its Deployment"
    );
    for (component, template) in &placed {
        let pod = template.spec.as_ref().unwrap();
        let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(
            pod.node_selector.as_ref().unwrap()["topology.kubernetes.io/region"],
            "europe-west4",
            "{component}"
        );
        assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1, "{component}");
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("presence-critical")
        );
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "registry");
        assert_eq!(labels["mesh"], "on");
        assert_ne!(
            labels["app.kubernetes.io/name"], "hijack",
            "the operator's labels win"
        );
        let annotations = template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations["sidecar.istio.io/inject"], "false");
        // A constraint without a selector selects the pods it spreads.
        let spread = &pod.topology_spread_constraints.as_ref().unwrap()[0];
        let selector = spread
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{component}: {selector:?} vs {labels:?}"
        );
        assert_eq!(selector["presencecluster.io/region"], eu);
    }
    // Other regions keep the defaults: hub servers spread over zones and hosts.
    for (component, template) in pod_templates(&objects, "center") {
        let pod = template.spec.unwrap();
        assert!(
            pod.node_selector.is_none() && pod.tolerations.is_none(),
            "{component}"
        );
        if component == "nats" {
            let keys: Vec<String> = pod
                .topology_spread_constraints
                .unwrap()
                .into_iter()
                .map(|c| c.topology_key)
                .collect();
            assert_eq!(
                keys,
                ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
            );
        }
    }
}

#[test]
fn golden_manifests() {
    for example in ["minimal", "multi-region"] {
        let objects = render_fixed(&load(&format!("{example}.yaml")));
        let yaml = render::to_yaml(&objects).unwrap();
        assert_golden(&golden_dir().join(format!("{example}.yaml")), &yaml);
    }
}

fn conf_of(objects: &[Child], region: &str) -> String {
    objects
        .iter()
        .find_map(|o| match o {
            Child::ConfigMap(cm)
                if cm
                    .metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.ends_with(&format!("-{region}-nats-config"))) =>
            {
                cm.data.as_ref().and_then(|d| d.get("nats.conf")).cloned()
            }
            _ => None,
        })
        .expect("region has a nats.conf")
}

#[test]
fn golden_nats_configs() {
    let objects = render_fixed(&load("multi-region.yaml"));
    assert_golden(
        &golden_dir().join("multi-region.center.nats.conf"),
        &conf_of(&objects, "center"),
    );
    assert_golden(
        &golden_dir().join("multi-region.eu.nats.conf"),
        &conf_of(&objects, "eu"),
    );
    let minimal = render_fixed(&load("minimal.yaml"));
    assert_golden(
        &golden_dir().join("minimal.center.nats.conf"),
        &conf_of(&minimal, "center"),
    );
}

fn nats_server() -> PathBuf {
    testkit::nats_server_bin()
}

#[test]
fn nats_server_accepts_every_rendered_config() {
    let dir = tempfile::tempdir().unwrap();
    for example in [
        "minimal.yaml",
        "multi-region.yaml",
        "multi-cluster.yaml",
        "dev.yaml",
        "dev-ha.yaml",
    ] {
        let objects = render_fixed(&load(example));
        // The files and variables the pods get from their Secrets.
        let pki = testkit::pki::generate(dir.path());
        std::fs::copy(&pki.ca, dir.path().join("ca.crt")).unwrap();
        std::fs::copy(&pki.cert, dir.path().join("tls.crt")).unwrap();
        std::fs::copy(&pki.key, dir.path().join("tls.key")).unwrap();
        for object in &objects {
            let Child::ConfigMap(cm) = object else {
                continue;
            };
            let conf = cm.data.as_ref().unwrap()["nats.conf"]
                .replace("/etc/nats-tls", &dir.path().display().to_string());
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, &conf).unwrap();
            let mut command = std::process::Command::new(nats_server());
            command
                .arg("-t")
                .arg("-c")
                .arg(&path)
                .env("POD_NAME", "presence-center-nats-0")
                .env("LEAF_NKEY_SEED", LEAF_SEED)
                .env("ROUTE_PASSWORD", "route-password");
            for i in 0..5 {
                command.env(
                    format!("ROUTE_{i}"),
                    format!("nats://route:route-password@127.0.0.1:{}", 16220 + i),
                );
            }
            let output = command
                .output()
                .expect("run nats-server -t (run `make test` to install it)");
            assert!(
                output.status.success(),
                "{example} {:?}: nats-server rejected the config:\n{}\n{conf}",
                cm.metadata.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn referenced_jwt_secret_is_never_rendered_and_generated_one_is() {
    let multi = render_fixed(&load("multi-region.yaml"));
    assert!(!multi.iter().any(|o| matches!(o, Child::Secret(_))));
    let yaml = render::to_yaml(&multi).unwrap();
    assert!(
        yaml.contains("name: presence-jwt-secret"),
        "deployments read the referenced Secret"
    );
    let minimal = render_fixed(&load("minimal.yaml"));
    let secrets: Vec<_> = minimal
        .iter()
        .filter(|o| matches!(o, Child::Secret(_)))
        .collect();
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].id(), "Secret/presence-jwt");
}

#[test]
fn config_change_changes_only_the_affected_hash() {
    let base = load("multi-region.yaml");
    let mut changed = base.clone();
    changed.spec.center.replicas = Some(5);
    changed.spec.kv.as_mut().unwrap().replicas = Some(5);
    let hashes = |objects: &[Child]| -> Vec<(String, String)> {
        objects
            .iter()
            .filter_map(|o| match o {
                Child::StatefulSet(s) => Some((
                    o.id(),
                    s.spec.template.metadata.as_ref()?.annotations.as_ref()?["presencecluster.io/config-hash"].clone(),
                )),
                _ => None,
            })
            .collect()
    };
    let before = hashes(&render_fixed(&base));
    let after = hashes(&render_fixed(&changed));
    for ((id, a), (_, b)) in before.iter().zip(&after) {
        if id.contains("-center-") {
            assert_ne!(a, b, "{id}: the hub's routes changed");
        } else {
            assert_eq!(a, b, "{id}: leaves are unaffected");
        }
    }
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn cluster(
    name: &str,
    center: Option<String>,
    replicas: i32,
    leaves: Vec<String>,
) -> PresenceCluster {
    PresenceCluster {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some("uid-1".into()),
            labels: Some([("team".to_owned(), "presence".to_owned())].into()),
            ..Default::default()
        },
        spec: PresenceClusterSpec {
            center: CenterSpec {
                name: center,
                replicas: Some(replicas),
                ..Default::default()
            },
            leaves: leaves
                .into_iter()
                .map(|name| LeafSpec {
                    name,
                    nats: None,
                    dataplane: None,
                    placement: None,
                    cluster: None,
                })
                .collect(),
            dataplane: None,
            auth: None,
            kv: None,
            images: None,
            monitoring: None,
            network_policy: None,
            tls: None,
        },
        status: None,
    }
}

fn label_name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-z]([-a-z0-9]{{0,{}}}[a-z0-9])?", max - 2)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn every_valid_cluster_renders_well_formed_owned_objects(
        name in label_name(24),
        center in proptest::option::of(label_name(16)),
        replicas in prop_oneof![Just(1), Just(3), Just(5)],
        leaves in proptest::collection::btree_set(label_name(16), 0..6),
    ) {
        let center_name = center.clone().unwrap_or_else(|| "center".into());
        let leaves: Vec<String> = leaves.into_iter().filter(|l| *l != center_name).collect();
        let cr = cluster(&name, center, replicas, leaves.clone());
        let ctx = Scope::new(&cr, "default").unwrap();
        let objects = render::render(&cr, &ctx, &inputs_for(&cr)).unwrap();
                        // The JWT Secret; per region a ConfigMap, two NATS Services, the
        // StatefulSet, two NetworkPolicies, the Deployment, its Service and
        // its budget (2 pods by default); the hub's budget.
        prop_assert_eq!(objects.len(), 1 + 9 * (1 + leaves.len()) + 1);
        prop_assert_eq!(&objects, &render::render(&cr, &ctx, &inputs_for(&cr)).unwrap(), "deterministic");
        let mut ids = std::collections::BTreeSet::new();
        for object in &objects {
            let meta = object.metadata();
            let object_name = meta.name.as_deref().unwrap();
            prop_assert!(ids.insert(object.id()), "{} rendered twice", object.id());
            prop_assert!(is_dns_label(object_name), "{object_name} is not a DNS label");
            if matches!(object, Child::StatefulSet(_)) {
                // Pods get "-<ordinal>" and revisions "-<hash>" appended.
                prop_assert!(object_name.len() <= 52, "{object_name} too long for a StatefulSet");
            }
            prop_assert_eq!(meta.namespace.as_deref(), Some("ns"));
            let owners = meta.owner_references.as_ref().unwrap();
            prop_assert_eq!(owners.len(), 1);
            prop_assert_eq!(&owners[0].name, &name);
            prop_assert_eq!(owners[0].controller, Some(true));
            let labels = meta.labels.as_ref().unwrap();
            prop_assert_eq!(&labels["app.kubernetes.io/instance"], &name);
            prop_assert_eq!(&labels["app.kubernetes.io/managed-by"], "presence-operator");
            prop_assert_eq!(&labels["app.kubernetes.io/part-of"], "presencecluster");
            prop_assert!(labels.contains_key("app.kubernetes.io/component"));
            prop_assert!(!labels.contains_key("team"), "CR labels are never copied");
        }
                // Every disruption budget selects the pods of one workload.
        let pod_labels: Vec<_> = objects.iter().filter_map(|o| match o {
            Child::StatefulSet(s) => s.spec.template.metadata.as_ref()?.labels.clone(),
            Child::Deployment(d) => d.spec.template.metadata.as_ref()?.labels.clone(),
            _ => None,
        }).collect();
        for object in &objects {
            if let Child::PodDisruptionBudget(pdb) = object {
                let selector = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()).and_then(|s| s.match_labels.clone()).unwrap();
                let matching = pod_labels.iter().filter(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v))).count();
                prop_assert_eq!(matching, 1, "{} selects {} workloads", object.id(), matching);
            }
        }
        let hub = objects.iter().find_map(|o| match o {
            Child::ConfigMap(cm) if cm.metadata.name.as_deref() == Some(&ctx.names.nats_config(&center_name)) => cm.data.clone(),
            _ => None,
        }).unwrap();
        let conf = &hub["nats.conf"];
        prop_assert_eq!(conf.contains("cluster {"), replicas > 1);
        // Routes come from the environment ($ROUTE_<i>, with the password).
        let routes = conf.lines().filter(|l| l.trim_start().starts_with("$ROUTE_")).count();
        prop_assert_eq!(routes, if replicas > 1 { replicas as usize } else { 0 });
        prop_assert_eq!(conf.contains("password: $ROUTE_PASSWORD"), replicas > 1);
    }
}

#[test]
fn invalid_specs_are_refused_with_a_reason() {
    for (cr, needle) in [
        (
            cluster("x", None, 1, vec!["center".into()]),
            "center's name",
        ),
        (
            cluster("x", None, 1, vec!["eu".into(), "eu".into()]),
            "twice",
        ),
        (cluster("x", None, 2, vec![]), "center.replicas"),
        (cluster("x", None, 1, vec!["EU".into()]), "DNS label"),
        (cluster(&"x".repeat(25), None, 1, vec![]), "longer than 24"),
    ] {
        let ctx = Scope::new(&cr, "default").unwrap();
        let err = render::render(&cr, &ctx, &inputs_for(&cr))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}

/// `center.leafnodes.sourceRanges` reaches a LoadBalancer (never a
/// NodePort, which can't filter by source), and a range that isn't a CIDR
/// is refused naming the field.
#[test]
fn leafnode_source_ranges_reach_only_a_load_balancer() {
    let mut cluster = load("multi-cluster.yaml");
    let service = |cluster: &PresenceCluster| {
        let objects = render_fixed(cluster);
        objects
            .into_iter()
            .find_map(|o| match o {
                Child::Service(s)
                    if s.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.ends_with("-leafnodes")) =>
                {
                    Some(s)
                }
                _ => None,
            })
            .expect("the exposed leafnode Service")
    };
    let ranges = service(&cluster)
        .spec
        .and_then(|s| s.load_balancer_source_ranges);
    assert_eq!(
        ranges,
        Some(vec![
            "198.51.100.0/24".to_owned(),
            "203.0.113.0/24".to_owned()
        ])
    );
    let exposure = cluster.spec.center.leafnodes.as_mut().expect("exposed");
    exposure.service_type = Some(presence_operator::crd::ExposureType::NodePort);
    let node_port = service(&cluster).spec.expect("spec");
    assert_eq!(node_port.load_balancer_source_ranges, None);
    for bad in [
        "203.0.113.0",
        "203.0.113.0/33",
        "hub.example.com/24",
        "2001:db8::/129",
    ] {
        let mut cluster = load("multi-cluster.yaml");
        let exposure = cluster.spec.center.leafnodes.as_mut().expect("exposed");
        exposure.source_ranges = Some(vec![bad.to_owned()]);
        let err = render::check_spec(&cluster.spec).unwrap_err().to_string();
        assert!(
            err.contains("center.leafnodes.sourceRanges"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn loopback_layout_renders_through_the_same_function() {
    // The local runner passes loopback addresses; the text format is shared.
    let params = nats::NatsParams {
        cluster_name: "dev".into(),
        region: "eu".into(),
        server_name: "dev-eu-0".into(),
        client_listen: "127.0.0.1:14223".into(),
        monitor_listen: "127.0.0.1:18223".into(),
        pid_file: None,
        role: nats::NatsRole::Leaf(nats::LeafParams {
            hub_urls: vec!["nats-leaf://127.0.0.1:17422".into()],
            cluster: None,
        }),
        security: render::nats_auth::SecurityParams {
            bucket: "PRESENCE".into(),
            domain: "hub".into(),
            presence_user: PRESENCE_PUBLIC.into(),
            operator_user: None,
            leaf_users: Vec::new(),
            tls: render::nats_auth::TlsFiles {
                cert: "/d/tls.crt".into(),
                key: "/d/tls.key".into(),
                ca: "/d/ca.crt".into(),
            },
            client_tls: false,
            route_tls: false,
        },
    };
    let conf = nats::nats_conf(&params);
    assert!(conf.contains("server_name: \"dev-eu-0\""));
    assert!(conf.contains("urls: [\"nats-leaf://127.0.0.1:17422\"]"));
    // The leaf logs in with its seed from the environment and checks the
    // hub's certificate; the config itself holds no secret.
    assert!(conf.contains("nkey: $LEAF_NKEY_SEED"));
    assert!(conf.contains("tls { ca_file: \"/d/ca.crt\" }"));
    assert!(conf.contains(&format!("nkey: {PRESENCE_PUBLIC}")));
}

mod cel {
    //! The CRD's CEL rules, evaluated by kube's client-side CEL engine on the
    //! generated schema, as the API server would on create and update.

    use super::*;
    use kube::core::cel::Validator;
    use serde_json::{Value, json};

    fn schema() -> Value {
        let crd = PresenceCluster::crd();
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap()
    }

    fn object(spec: Value) -> Value {
        json!({"apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
               "metadata": {"name": "presence", "namespace": "ns"}, "spec": spec})
    }

    fn check(spec: Value, old: Option<Value>) -> Result<(), String> {
        let old = old.map(object);
        Validator::new()
            .validate(&schema(), &object(spec), old.as_ref())
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn examples_pass_every_rule() {
        for example in [
            "minimal.yaml",
            "multi-region.yaml",
            "dev.yaml",
            "dev-ha.yaml",
        ] {
            let text = std::fs::read_to_string(repo().join("examples").join(example)).unwrap();
            let value: Value = serde_yaml::from_str(&text).unwrap();
            Validator::new()
                .validate(&schema(), &value, None)
                .unwrap_or_else(|e| panic!("{example}: {e:?}"));
            Validator::new()
                .validate(&schema(), &value, Some(&value))
                .unwrap_or_else(|e| panic!("{example} update: {e:?}"));
        }
    }

    #[test]
    fn creation_rules() {
        for (spec, needle) in [
            (
                json!({"center": {}, "leaves": [{"name": "center"}]}),
                "center's name",
            ),
            (
                json!({"center": {"name": "hub"}, "leaves": [{"name": "hub"}]}),
                "center's name",
            ),
            (
                json!({"center": {}, "dataplane": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}}),
                "minReplicas cannot exceed",
            ),
            (json!({"center": {"replicas": 2}}), "1, 3 or 5"),
            (
                json!({"center": {"replicas": 1}, "kv": {"replicas": 3}}),
                "cannot exceed",
            ),
            (
                json!({"center": {}, "dataplane": {"cors": {"allowCredentials": true}}}),
                "allowCredentials",
            ),
            (
                json!({"center": {}, "dataplane": {"cors": {"allowCredentials": true, "allowedOrigins": ["*"]}}}),
                "allowCredentials",
            ),
        ] {
            let err = check(spec.clone(), None).expect_err(&format!("{spec} must be refused"));
            assert!(err.contains(needle), "{spec}: {err}");
        }
        check(
            json!({"center": {"replicas": 3}, "kv": {"replicas": 3}, "leaves": [{"name": "eu"}]}),
            None,
        )
        .unwrap();
        check(json!({"center": {}, "dataplane": {"cors": {"allowCredentials": true, "allowedOrigins": ["https://a.example"]}}}), None).unwrap();
        let err = check(
            json!({"center": {}, "leaves": [{"name": "eu", "cluster": "eu-1"}]}),
            None,
        )
        .expect_err("a leaf naming a cluster needs the center to name one");
        assert!(err.contains("center.cluster too"), "{err}");
        check(
            json!({"center": {"cluster": "hub-1"}, "leaves": [{"name": "eu"}]}),
            None,
        )
        .unwrap();
    }

    #[test]
    fn long_names_are_refused() {
        let mut obj = object(json!({"center": {}}));
        obj["metadata"]["name"] = json!("x".repeat(25));
        let err = Validator::new()
            .validate(&schema(), &obj, None)
            .expect_err("too long");
        assert!(format!("{err:?}").contains("24 characters"));
    }

    #[test]
    fn immutable_fields() {
        let base = json!({"center": {"jetstream": {"domain": "hub", "storageClassName": "fast", "storageSize": "10Gi"}}, "kv": {"bucket": "PRESENCE"}});
        for (new, needle) in [
            (
                json!({"center": {"jetstream": {"domain": "other", "storageClassName": "fast", "storageSize": "10Gi"}}, "kv": {"bucket": "PRESENCE"}}),
                "domain is immutable",
            ),
            (
                json!({"center": {"jetstream": {"domain": "hub", "storageClassName": "slow", "storageSize": "10Gi"}}, "kv": {"bucket": "PRESENCE"}}),
                "storageClassName is immutable",
            ),
            (
                json!({"center": {"jetstream": {"domain": "hub", "storageClassName": "fast", "storageSize": "10Gi"}}, "kv": {"bucket": "OTHER"}}),
                "bucket is immutable",
            ),
            (json!({"center": {}}), "immutable"),
            (
                json!({"center": {"cluster": "elsewhere", "jetstream": {"domain": "hub", "storageClassName": "fast", "storageSize": "10Gi"}}, "kv": {"bucket": "PRESENCE"}}),
                "center.cluster is immutable",
            ),
        ] {
            let err = check(new.clone(), Some(base.clone()))
                .expect_err(&format!("{new} must be refused"));
            assert!(err.contains(needle), "{new}: {err}");
        }
        // Spelling out a default is no change.
        check(
            json!({"center": {"jetstream": {"domain": "hub"}}}),
            Some(json!({"center": {}})),
        )
        .unwrap();
        // Other fields can change freely, and storage can grow (the
        // operator refuses a shrink: it compares with the live volumes).
        let mut scaled = base.clone();
        scaled["leaves"] = json!([{"name": "eu"}]);
        scaled["center"]["jetstream"]["storageSize"] = json!("20Gi");
        check(scaled, Some(base)).unwrap();
    }

    #[test]
    fn the_hub_only_changes_size_in_ways_jetstream_survives() {
        let hub = |replicas: Option<i64>| match replicas {
            Some(r) => json!({"center": {"replicas": r}}),
            None => json!({"center": {}}),
        };
        for (old, new) in [
            (None, Some(3)),
            (Some(1), Some(3)),
            (Some(3), Some(1)),
            (Some(5), Some(3)),
            (Some(3), None),
        ] {
            let err = check(hub(new), Some(hub(old))).expect_err(&format!("{old:?} -> {new:?}"));
            assert!(
                err.contains("standalone hub can't become clustered"),
                "{err}"
            );
        }
        for (old, new) in [
            (None, Some(1)),
            (Some(3), Some(3)),
            (Some(3), Some(5)),
            (Some(5), Some(5)),
        ] {
            check(hub(new), Some(hub(old))).unwrap_or_else(|e| panic!("{old:?} -> {new:?}: {e}"));
        }
    }

    /// What presence-service itself says of the CORS variables the
    /// operator renders for `cors`: `Err` when it would refuse to start.
    fn service_accepts(cors: &presence_operator::crd::CorsSpec) -> Result<(), String> {
        let mut args = vec![
            "presence-service".to_owned(),
            "--store=memory".to_owned(),
            "--jwt-secret=0123456789abcdef".to_owned(),
        ];
        let mut flag = |name: &str, list: &Option<Vec<String>>| {
            if let Some(items) = list {
                args.push(format!("--{name}={}", items.join(",")));
            }
        };
        flag("cors-allowed-origins", &cors.allowed_origins);
        flag("cors-allowed-methods", &cors.allowed_methods);
        flag("cors-allowed-headers", &cors.allowed_headers);
        if let Some(credentials) = cors.allow_credentials {
            args.push(format!("--cors-allow-credentials={credentials}"));
        }
        let cli = <presence_dataplane::config::Cli as clap::Parser>::try_parse_from(&args)
            .map_err(|e| e.to_string())?;
        cli.serve.validate().map(drop).map_err(|e| e.to_string())
    }

    fn cors_items() -> impl Strategy<Value = Option<Vec<String>>> {
        let item =
            proptest::string::string_regex("(\\*|https?://|GET|X-Id|ftp://)?[a-zA-Z.:*, \t-]{0,6}")
                .unwrap();
        proptest::option::of(proptest::collection::vec(item, 0..3))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The operator refuses exactly the CORS policies presence-service
        /// would refuse at start (the rules are the contract's, applied to
        /// what the service reads: the lists joined with commas, split,
        /// trimmed), so a bad value is reported on the resource instead of
        /// crashing every region's pods, and no value the service takes is
        /// refused.
        #[test]
        fn the_operator_refuses_the_cors_policies_the_service_refuses(
            origins in cors_items(),
            methods in cors_items(),
            headers in cors_items(),
            credentials in proptest::option::of(any::<bool>()),
        ) {
            let cors = presence_operator::crd::CorsSpec {
                allowed_origins: origins,
                allowed_methods: methods,
                allowed_headers: headers,
                allow_credentials: credentials,
                ..Default::default()
            };
            let spec: PresenceClusterSpec = serde_json::from_value(
                json!({"center": {}, "dataplane": {"cors": cors}}),
            )
            .unwrap();
            let operator = render::check_spec(&spec).map_err(|e| e.to_string());
            let service = service_accepts(&cors);
            prop_assert_eq!(operator.is_ok(), service.is_ok(), "operator {:?}, service {:?}", operator, service);
        }
    }

    #[test]
    fn cors_values_the_service_refuses_are_refused_by_the_operator_too() {
        // For every manifest: the CRD only bounds sizes, the operator
        // checks the values (the API server never sees what a list becomes
        // once joined, split and trimmed).
        for (cors, field) in [
            (
                json!({"allowedOrigins": ["app.example.com"]}),
                "allowedOrigins",
            ),
            (json!({"allowedOrigins": [" "]}), "allowedOrigins"),
            (json!({"allowedMethods": ["GE T"]}), "allowedMethods"),
            (json!({"allowedHeaders": ["X Y"]}), "allowedHeaders"),
        ] {
            let spec: PresenceClusterSpec =
                serde_json::from_value(json!({"center": {}, "dataplane": {"cors": cors}})).unwrap();
            let err = render::check_spec(&spec).unwrap_err().to_string();
            assert!(err.contains(&format!("dataplane.cors.{field}")), "{err}");
        }
        // Items the service reads as several are taken as the service
        // takes them.
        let several: PresenceClusterSpec = serde_json::from_value(json!({"center": {},
            "dataplane": {"cors": {"allowedOrigins": ["https://a.example, https://b.example"],
                                   "allowedMethods": ["GET,POST"]}}}))
        .unwrap();
        render::check_spec(&several).unwrap();
        // A disabled policy is not read by the service, so not checked.
        let off: PresenceClusterSpec = serde_json::from_value(json!({"center": {},
            "dataplane": {"cors": {"enabled": false, "allowedMethods": ["GE T"]}}}))
        .unwrap();
        render::check_spec(&off).unwrap();
    }

    #[test]
    fn leaf_names_are_unique_by_list_type_and_by_the_operator() {
        // The API server enforces unique keys of a list-type map itself
        // (kube's client-side engine doesn't); the operator's own check
        // refuses duplicates in manifests that never met an API server.
        let spec: PresenceClusterSpec = serde_json::from_value(
            json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "eu"}]}),
        )
        .unwrap();
        let err = render::check_spec(&spec).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
    }
}

/// Every workload's pod of `example`, rendered, named by component and
/// region.
fn every_pod(example: &str) -> Vec<(String, k8s_openapi::api::core::v1::PodSpec)> {
    let cluster = load(example);
    let objects = render_fixed(&cluster);
    let mut pods = Vec::new();
    for region in cluster.spec.regions() {
        for (component, template) in pod_templates(&objects, region.name) {
            let pod = template.spec.expect("pod spec");
            pods.push((format!("{component} of {}", region.name), pod));
        }
    }
    pods
}

/// Neither nats-server nor presence-service calls the Kubernetes API, so
/// no pod of theirs holds a service account token a compromise could use.
#[test]
fn no_workload_mounts_a_service_account_token() {
    let pods = every_pod("multi-region.yaml");
    assert!(pods.len() >= 6, "{} workloads", pods.len());
    for (workload, pod) in pods {
        assert_eq!(
            pod.automount_service_account_token,
            Some(false),
            "{workload}"
        );
    }
}

/// A manifest that names no resources still gets pods with CPU and memory
/// requests: BestEffort pods are the first a node under pressure evicts,
/// and an autoscaler needs CPU requests to measure utilization.
#[test]
fn no_workload_is_best_effort() {
    let pods = every_pod("minimal.yaml");
    assert!(pods.len() >= 2, "{} workloads", pods.len());
    for (workload, pod) in pods {
        for container in pod.containers {
            let requests = container
                .resources
                .and_then(|r| r.requests)
                .unwrap_or_default();
            for resource in ["cpu", "memory"] {
                assert!(
                    requests.contains_key(resource),
                    "{workload}, container {}: no {resource} request",
                    container.name
                );
            }
        }
    }
}

#[test]
fn examples_have_no_unknown_fields() {
    // The spec has no defaults, so a parsed example serializes back to
    // exactly what was written; a field the CRD doesn't know (a typo the
    // API server would silently prune) shows up as a difference.
    for example in [
        "minimal.yaml",
        "multi-region.yaml",
        "dev.yaml",
        "dev-ha.yaml",
    ] {
        let text = std::fs::read_to_string(repo().join("examples").join(example)).unwrap();
        let written: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let parsed: PresenceCluster = serde_yaml::from_str(&text).unwrap();
        let back = serde_json::to_value(&parsed).unwrap();
        assert_eq!(back["spec"], written["spec"], "{example}");
    }
}

#[test]
fn a_regions_own_replicas_outrank_shared_autoscaling() {
    let cr: PresenceCluster = serde_yaml::from_str(
        "metadata: {name: p}\nspec:\n  center: {}\n  leaves: [{name: eu, dataplane: {replicas: 3}}, {name: us}]\n  dataplane: {autoscaling: {maxReplicas: 4}}\n",
    )
    .unwrap();
    let objects = render_fixed(&cr);
    let ids: Vec<String> = objects.iter().map(Child::id).collect();
    for autoscaled in ["p-center-presence", "p-us-presence"] {
        assert!(
            ids.contains(&format!("HorizontalPodAutoscaler/{autoscaled}")),
            "{ids:?}"
        );
    }
    assert!(
        !ids.contains(&"HorizontalPodAutoscaler/p-eu-presence".to_owned()),
        "{ids:?}"
    );
    let replicas = |name: &str| {
        objects.iter().find_map(|o| match o {
            Child::Deployment(d) if d.metadata.name.as_deref() == Some(name) => {
                Some(d.spec.replicas)
            }
            _ => None,
        })
    };
    assert_eq!(replicas("p-eu-presence"), Some(Some(3)));
    assert_eq!(
        replicas("p-us-presence"),
        Some(None),
        "the autoscaler owns replicas"
    );
}

#[test]
fn jetstream_never_counts_on_more_disk_than_the_volumes_report() {
    let cr = load("minimal.yaml");
    let ctx = Scope::new(&cr, "default").unwrap();
    let limit = |capacity: Option<&str>| {
        let inputs = Inputs {
            hub_volume_capacity: capacity
                .map(|c| k8s_openapi::apimachinery::pkg::api::resource::Quantity(c.into())),
            ..inputs_for(&cr)
        };
        let objects = render::render(&cr, &ctx, &inputs).unwrap();
        let conf = conf_of(&objects, "center");
        conf.lines()
            .find(|l| l.contains("max_file_store"))
            .map(str::trim)
            .map(str::to_owned)
    };
    let gib = 1024u64 * 1024 * 1024;
    // minimal.yaml asks for the default 10Gi; JetStream gets 90% of it...
    assert_eq!(
        limit(None),
        Some(format!("max_file_store: {}", 10 * gib / 10 * 9))
    );
    // ...or of a smaller volume still growing.
    assert_eq!(
        limit(Some("5Gi")),
        Some(format!("max_file_store: {}", 5 * gib / 10 * 9))
    );
    assert_eq!(
        limit(Some("20Gi")),
        Some(format!("max_file_store: {}", 10 * gib / 10 * 9))
    );
}

/// Memory is bounded in every container of a monitored NATS pod: the
/// exporter sidecar by its own limit, and the Go runtime of a server with
/// a memory limit by `GOMEMLIMIT` at 90% of it.
#[test]
fn nats_pods_know_their_memory_limits() {
    let objects = render_fixed(&load("multi-region.yaml"));
    let containers = |region: &str| -> Vec<k8s_openapi::api::core::v1::Container> {
        objects
            .iter()
            .find_map(|o| match o {
                Child::StatefulSet(s)
                    if s.metadata.name.as_deref() == Some(&format!("presence-{region}-nats")) =>
                {
                    s.spec.template.spec.clone().map(|p| p.containers)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{region}'s NATS StatefulSet"))
    };
    let go_limit = |containers: &[k8s_openapi::api::core::v1::Container]| {
        containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "GOMEMLIMIT")
            .and_then(|e| e.value.clone())
    };
    // The hub asks for `limits: {memory: 2Gi}`.
    let hub = containers("center");
    assert_eq!(go_limit(&hub).as_deref(), Some("1932735276"));
    // ap's servers set requests only: no limit to stay under.
    assert_eq!(go_limit(&containers("ap")), None);
    for region in ["center", "eu", "us", "ap"] {
        let exporter = containers(region)
            .into_iter()
            .find(|c| c.name == "prom-exporter")
            .expect("the exporter sidecar (monitoring is on)");
        let resources = exporter.resources.expect("the exporter's resources");
        assert!(resources.requests.is_some_and(|r| r.contains_key("memory")));
        assert!(
            resources
                .limits
                .is_some_and(|l| l.contains_key("memory") && l.contains_key("cpu"))
        );
    }
}

#[test]
fn every_pod_monitor_scrapes_a_named_port_of_the_pods_it_selects() {
    let objects = render_fixed(&load("multi-region.yaml"));
    let pods: Vec<(std::collections::BTreeMap<String, String>, Vec<String>)> = objects
        .iter()
        .filter_map(|o| {
            let template = match o {
                Child::StatefulSet(s) => &s.spec.template,
                Child::Deployment(d) => &d.spec.template,
                _ => return None,
            };
            let labels = template.metadata.as_ref()?.labels.clone()?;
            let ports = template
                .spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| p.name.clone())
                .collect();
            Some((labels, ports))
        })
        .collect();
    let monitors: Vec<&kube::api::DynamicObject> = objects
        .iter()
        .filter_map(|o| match o {
            Child::PodMonitor(m) => Some(m),
            _ => None,
        })
        .collect();
    // Four regions, a presence-service and a NATS monitor each.
    assert_eq!(monitors.len(), 8);
    for monitor in monitors {
        let name = monitor.metadata.name.as_deref().unwrap();
        let spec = &monitor.data["spec"];
        let selector: std::collections::BTreeMap<String, String> =
            serde_json::from_value(spec["selector"]["matchLabels"].clone()).unwrap();
        let port = spec["podMetricsEndpoints"][0]["port"].as_str().unwrap();
        let selected: Vec<_> = pods
            .iter()
            .filter(|(labels, _)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "{name} selects {} workloads",
            selected.len()
        );
        assert!(
            selected[0].1.iter().any(|p| p == port),
            "{name}: no port {port}"
        );
        assert_eq!(
            monitor.metadata.labels.as_ref().unwrap()["release"],
            "kube-prometheus-stack"
        );
    }
}

mod network_policies {
    //! The rendered NetworkPolicies, evaluated the way Kubernetes does
    //! (ingress: a pod selected by a policy takes only what some rule of it
    //! admits), for the flows a PresenceCluster needs and those it must not
    //! allow.

    use super::*;
    use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use std::collections::BTreeMap;

    type Labels = BTreeMap<String, String>;

    /// A pod: its namespace and labels.
    struct Pod {
        namespace: String,
        labels: Labels,
    }

    fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
        selector
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v))
    }

    fn peer_admits(peer: &NetworkPolicyPeer, policy_ns: &str, src: &Pod) -> bool {
        let ns_labels = Labels::from([(
            "kubernetes.io/metadata.name".to_owned(),
            src.namespace.clone(),
        )]);
        let ns_ok = match &peer.namespace_selector {
            Some(s) => matches(s, &ns_labels),
            None => src.namespace == policy_ns,
        };
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|s| matches(s, &src.labels));
        ns_ok && pod_ok
    }

    fn allowed(policies: &[NetworkPolicy], src: &Pod, dst: &Pod, port: &str) -> bool {
        let selecting: Vec<&NetworkPolicy> = policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(dst.namespace.as_str()))
            .filter(|p| {
                let spec = p.spec.as_ref().unwrap();
                matches(spec.pod_selector.as_ref().unwrap(), &dst.labels)
            })
            .collect();
        if selecting.is_empty() {
            return true;
        }
        selecting.iter().any(|p| {
            let ns = p.metadata.namespace.as_deref().unwrap();
            p.spec
                .as_ref()
                .unwrap()
                .ingress
                .iter()
                .flatten()
                .any(|rule| {
                    let port_ok = rule.ports.iter().flatten().any(|pp| {
                        pp.port
                            == Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                                    port.into(),
                                ),
                            )
                    });
                    let from_ok = match &rule.from {
                        None => true,
                        Some(peers) => peers.iter().any(|peer| peer_admits(peer, ns, src)),
                    };
                    port_ok && from_ok
                })
        })
    }

    fn pod(ns: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn region_pod(component: &str, region: &str) -> Pod {
        pod(
            "presence-system",
            &[
                ("app.kubernetes.io/instance", "presence"),
                ("app.kubernetes.io/component", component),
                ("presencecluster.io/region", region),
                ("app.kubernetes.io/managed-by", "presence-operator"),
            ],
        )
    }

    fn policies(cr: &PresenceCluster) -> Vec<NetworkPolicy> {
        render_fixed(cr)
            .into_iter()
            .filter_map(|o| match o {
                Child::NetworkPolicy(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn each_region_is_fenced() {
        let p = policies(&load("multi-region.yaml"));
        assert_eq!(
            p.len(),
            8,
            "a NATS and a presence-service policy per region"
        );
        let (hub, eu_nats, us_nats) = (
            region_pod("nats", "center"),
            region_pod("nats", "eu"),
            region_pod("nats", "us"),
        );
        let (eu_presence, us_presence) =
            (region_pod("dataplane", "eu"), region_pod("dataplane", "us"));
        let operator = pod(
            "presence-system",
            &[("app.kubernetes.io/name", "presence-operator")],
        );
        let stranger = pod("default", &[("app", "curl")]);
        let prometheus = pod("monitoring", &[("app.kubernetes.io/name", "prometheus")]);
        for (src, dst, port, want, what) in [
            (
                &eu_presence,
                &eu_nats,
                "client",
                true,
                "a region's presence-service to its NATS",
            ),
            (
                &us_presence,
                &eu_nats,
                "client",
                false,
                "another region's presence-service",
            ),
            (&stranger, &eu_nats, "client", false, "any other pod"),
            (&stranger, &hub, "client", false, "any other pod to the hub"),
            (
                &operator,
                &hub,
                "client",
                true,
                "the operator to the hub (bucket)",
            ),
            (&operator, &hub, "monitor", true, "the operator to /leafz"),
            (
                &stranger,
                &hub,
                "monitor",
                false,
                "monitoring from elsewhere",
            ),
            (
                &eu_nats,
                &hub,
                "leafnodes",
                true,
                "a leaf server to the hub's leafnode port",
            ),
            (
                &eu_presence,
                &hub,
                "leafnodes",
                false,
                "presence-service to the leafnode port",
            ),
            (
                &stranger,
                &hub,
                "leafnodes",
                false,
                "anyone else to the leafnode port",
            ),
            (&hub, &hub, "cluster", true, "hub routes"),
            (
                &eu_nats,
                &hub,
                "cluster",
                false,
                "a leaf to the hub's routes",
            ),
            (
                &eu_nats,
                &eu_nats,
                "cluster",
                true,
                "a clustered leaf's routes",
            ),
            (
                &us_nats,
                &eu_nats,
                "cluster",
                false,
                "another leaf to eu's routes",
            ),
            (
                &stranger,
                &eu_presence,
                "http",
                true,
                "the presence API is open by default",
            ),
            (
                &prometheus,
                &hub,
                "monitor",
                true,
                "the example's metricsFrom admits its Prometheus",
            ),
            (
                &prometheus,
                &hub,
                "prom-metrics",
                true,
                "and to the NATS exporter",
            ),
            (
                &stranger,
                &hub,
                "monitor",
                false,
                "nobody else scrapes NATS",
            ),
        ] {
            assert_eq!(allowed(&p, src, dst, port), want, "{what}");
        }
    }

    #[test]
    fn the_api_and_metrics_can_be_restricted_or_policies_switched_off() {
        let mut cr = load("multi-region.yaml");
        let peer = |ns: &str| NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_owned(),
                    ns.to_owned(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        cr.spec.network_policy = Some(presence_operator::crd::NetworkPolicySpec {
            enabled: None,
            api_from: Some(vec![peer("apps")]),
            metrics_from: Some(vec![peer("monitoring")]),
        });
        let p = policies(&cr);
        let eu_presence = region_pod("dataplane", "eu");
        let hub = region_pod("nats", "center");
        let app = pod("apps", &[("app", "web")]);
        let stranger = pod("default", &[("app", "curl")]);
        let prometheus = pod("monitoring", &[("app.kubernetes.io/name", "prometheus")]);
        assert!(allowed(&p, &app, &eu_presence, "http"));
        assert!(!allowed(&p, &stranger, &eu_presence, "http"));
        assert!(
            allowed(&p, &prometheus, &eu_presence, "http"),
            "Prometheus scrapes /metrics"
        );
        assert!(allowed(&p, &prometheus, &hub, "monitor"));
        assert!(allowed(&p, &prometheus, &hub, "prom-metrics"));
        assert!(!allowed(&p, &prometheus, &hub, "client"));
        cr.spec.network_policy.as_mut().unwrap().enabled = Some(false);
        assert!(policies(&cr).is_empty());
    }
}
