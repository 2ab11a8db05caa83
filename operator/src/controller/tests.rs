//! Controller scenarios against the mocked API server; the hub's KV
//! bucket and leafnode state come from real nats-server processes.
#![allow(clippy::too_many_lines)] // test scenarios and the mocked API server

use super::secrets::digest_of;
use super::*;
use crate::crd::PresenceClusterStatus;
use crate::fixtures::{FakeApi, Recorded};
use crate::kv::{self, DesiredBucket};
use crate::render::{Child, secrets};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

const NS: &str = "ns";

fn pc_path(name: &str) -> String {
    format!("/apis/presencecluster.io/v1alpha1/namespaces/{NS}/presenceclusters/{name}")
}

fn child_path(child: &Child) -> String {
    let name = child.metadata().name.clone().unwrap_or_default();
    match child {
        Child::ConfigMap(_) => format!("/api/v1/namespaces/{NS}/configmaps/{name}"),
        Child::Service(_) => format!("/api/v1/namespaces/{NS}/services/{name}"),
        Child::Secret(_) => format!("/api/v1/namespaces/{NS}/secrets/{name}"),
        Child::StatefulSet(_) => format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"),
        Child::Deployment(_) => format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}"),
        Child::PodDisruptionBudget(_) => {
            format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{name}")
        }
        Child::HorizontalPodAutoscaler(_) => {
            format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{name}")
        }
        Child::NetworkPolicy(_) => {
            format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/{name}")
        }
        Child::PodMonitor(_) => {
            format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/podmonitors/{name}")
        }
    }
}

fn cluster(spec: Value) -> Value {
    json!({"apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
           "metadata": {"name": "p", "namespace": NS, "uid": "uid-p", "generation": 1},
           "spec": spec})
}

fn unreachable() -> HubAccess {
    HubAccess::Fixed {
        nats_url: "nats://127.0.0.1:1".into(),
        monitors: vec![("127.0.0.1".into(), 1)],
    }
}

fn real(hub: &testkit::Nats) -> HubAccess {
    HubAccess::Fixed {
        nats_url: hub.url(),
        monitors: vec![("127.0.0.1".into(), hub.monitor_port)],
    }
}

fn context(fake: &FakeApi, hub: HubAccess) -> Arc<Context> {
    Arc::new(Context::new(
        fake.client(),
        "test",
        Metrics::new().unwrap(),
        hub,
    ))
}

fn load(fake: &FakeApi) -> Arc<PresenceCluster> {
    Arc::new(
        serde_json::from_value(fake.get(&pc_path("p")).expect("stored"))
            .expect("a PresenceCluster"),
    )
}

/// Reconciles the stored object once (first adding the finalizer if needed).
async fn reconcile_stored(fake: &FakeApi, ctx: &Arc<Context>) -> Result<Action, Error> {
    if !load(fake).finalizers().iter().any(|f| f == FINALIZER) {
        reconcile(load(fake), ctx.clone()).await?;
    }
    reconcile(load(fake), ctx.clone()).await
}

fn status(fake: &FakeApi) -> PresenceClusterStatus {
    serde_json::from_value(fake.get(&pc_path("p")).unwrap()["status"].clone()).unwrap()
}

fn find_condition<'a>(status: &'a PresenceClusterStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .expect(type_)
}

fn condition(status: &PresenceClusterStatus, type_: &str) -> (String, String) {
    let c = find_condition(status, type_);
    (c.status.clone(), c.reason.clone())
}

fn applies(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.content_type.starts_with("application/apply-patch"))
        .collect()
}

/// What the controller should have applied: the rendered objects, with
/// the digest of the JWT secret the fake holds.
fn rendered(fake: &FakeApi) -> Vec<Child> {
    let pc = load(fake);
    let rctx = render::Scope::new(&pc, NS).unwrap();
    let secret: Secret = serde_json::from_value(
        fake.get(&format!(
            "/api/v1/namespaces/{NS}/secrets/{}",
            rctx.names.jwt_secret()
        ))
        .expect("generated secret"),
    )
    .unwrap();
    let inputs = render::Inputs {
        jwt_secret_digest: digest_of(&secret, secrets::JWT_KEY),
        nats: Some(nats_identities(fake, &pc, &rctx)),
        ..Default::default()
    };
    render::render(&pc, &rctx, &inputs).unwrap()
}

/// The NATS identities from the Secrets the controller made in the fake.
fn nats_identities(
    fake: &FakeApi,
    pc: &PresenceCluster,
    rctx: &render::Scope,
) -> render::NatsIdentities {
    let mut data = crate::credentials::SecretData::new();
    for (name, _) in crate::credentials::generated(rctx, &pc.spec, None) {
        let secret: Secret = serde_json::from_value(
            fake.get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))
                .unwrap_or_else(|| panic!("Secret {name} generated")),
        )
        .unwrap();
        data.insert(name, nats_secrets::contents(&secret));
    }
    crate::credentials::identities(rctx, &pc.spec, &data, None).unwrap()
}

#[tokio::test]
async fn a_fresh_cluster_gets_a_finalizer_then_every_object() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "us"}]})),
    );
    let ctx = context(&fake, unreachable());

    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let first = fake.requests_without_events();
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(
        (first[0].method.as_str(), first[0].path.as_str()),
        ("PATCH", pc_path("p").as_str())
    );
    assert!(first[0].content_type.starts_with("application/json-patch"));
    assert_eq!(
        first[0].body[1],
        json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
    );

    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let requests = fake.requests_without_events();
    let calls: Vec<(String, String)> = requests
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    let secret = format!("/api/v1/namespaces/{NS}/secrets/p-jwt");
    let mut expected = vec![
        // Its neighbours, whose object names it must not share.
        (
            "GET".to_owned(),
            format!("/apis/presencecluster.io/v1alpha1/namespaces/{NS}/presenceclusters"),
        ),
        ("GET".to_owned(), secret.clone()),
        (
            "POST".to_owned(),
            format!("/api/v1/namespaces/{NS}/secrets"),
        ),
    ];
    // Every NATS Secret: looked for, then generated.
    for (name, _) in crate::credentials::generated(
        &render::Scope::new(&load(&fake), NS).unwrap(),
        &load(&fake).spec,
        None,
    ) {
        expected.push((
            "GET".to_owned(),
            format!("/api/v1/namespaces/{NS}/secrets/{name}"),
        ));
        expected.push((
            "POST".to_owned(),
            format!("/api/v1/namespaces/{NS}/secrets"),
        ));
    }
    expected.extend([
        // The hub's volume template, before anything is applied (no hub
        // yet, so no volumes to list either).
        (
            "GET".to_owned(),
            format!("/apis/apps/v1/namespaces/{NS}/statefulsets/p-center-nats"),
        ),
    ]);
    let children: Vec<Child> = rendered(&fake)
        .into_iter()
        .filter(|c| !matches!(c, Child::Secret(_)))
        .collect();
    expected.extend(children.iter().map(|c| ("PATCH".to_owned(), child_path(c))));
    for kind in [
        "apis/apps/v1/namespaces/ns/deployments",
        "apis/apps/v1/namespaces/ns/statefulsets",
        "api/v1/namespaces/ns/services",
        "api/v1/namespaces/ns/configmaps",
        "apis/policy/v1/namespaces/ns/poddisruptionbudgets",
        "apis/autoscaling/v2/namespaces/ns/horizontalpodautoscalers",
        "apis/networking.k8s.io/v1/namespaces/ns/networkpolicies",
        "apis/monitoring.coreos.com/v1/namespaces/ns/podmonitors",
    ] {
        expected.push(("GET".to_owned(), format!("/{kind}")));
    }
    expected.push(("PATCH".to_owned(), format!("{}/status", pc_path("p"))));
    assert_eq!(calls, expected);

    // The generated secret: 64 hex characters, owned by the cluster.
    let created = &requests[2].body;
    let value = created["stringData"]["jwt-secret"].as_str().unwrap();
    assert_eq!(value.len(), 64);
    assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "uid-p");
    // Every apply is server-side apply with our field manager, forced, and
    // carries exactly the rendered object.
    for (request, child) in applies(&requests).into_iter().zip(&children) {
        let params: BTreeSet<&str> = request.query.split('&').filter(|p| !p.is_empty()).collect();
        assert_eq!(
            params,
            BTreeSet::from(["fieldManager=presence-operator", "force=true"])
        );
        assert_eq!(
            request.body,
            serde_json::to_value(child).unwrap(),
            "{}",
            child.id()
        );
    }
    let list = requests
        .iter()
        .find(|r| r.method == "GET" && r.path.ends_with("/deployments"))
        .unwrap();
    assert!(
        list.query
            .contains("labelSelector=app.kubernetes.io%2Finstance%3Dp"),
        "{}",
        list.query
    );

    let s = status(&fake);
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(
        condition(&s, "Ready"),
        ("False".into(), "HubNotReady".into())
    );
    assert_eq!(
        condition(&s, "Progressing"),
        ("True".into(), "HubNotReady".into())
    );
    assert_eq!(
        condition(&s, "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    let names: Vec<&str> = s.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["center", "eu", "us"]);

    // A second reconcile finds the Secret and never writes it again.
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let again = fake.requests_without_events();
    assert!(
        again
            .iter()
            .all(|r| !r.path.contains("/secrets") || r.method == "GET"),
        "{again:#?}"
    );
    assert_eq!(
        fake.get(&secret).unwrap()["stringData"]["jwt-secret"],
        value
    );
    // Nothing changed, so status is not written again.
    assert!(
        !again.iter().any(|r| r.path.ends_with("/status")),
        "{again:#?}"
    );
    assert_rbac_allows(&fake.requests());
}

/// A PresenceCluster `name` created at `created`, with a center and the
/// leaf `leaf`, its finalizer in place.
fn named_cluster(name: &str, created: &str, leaf: &str) -> Value {
    json!({"apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
           "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                        "generation": 1, "creationTimestamp": created,
                        "finalizers": [FINALIZER]},
           "spec": {"center": {}, "leaves": [{"name": leaf}]}})
}

fn stored_cluster(fake: &FakeApi, name: &str) -> Arc<PresenceCluster> {
    Arc::new(serde_json::from_value(fake.get(&pc_path(name)).expect("stored")).unwrap())
}

fn status_named(fake: &FakeApi, name: &str) -> PresenceClusterStatus {
    serde_json::from_value(fake.get(&pc_path(name)).unwrap()["status"].clone()).unwrap()
}

/// Two PresenceClusters whose names and regions render the same object
/// names (`a` with leaf `b-eu`, `a-b` with leaf `eu`: both `a-b-eu-*`):
/// the one created second applies nothing and says why, and the first
/// goes on; deleting the first lets the second go ahead.
#[tokio::test]
async fn a_cluster_whose_object_names_an_older_one_holds_applies_nothing() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("a"),
        named_cluster("a", "2026-01-01T00:00:00Z", "b-eu"),
    );
    fake.insert(
        &pc_path("a-b"),
        named_cluster("a-b", "2026-01-02T00:00:00Z", "eu"),
    );
    let stored = |name: &str| stored_cluster(&fake, name);
    let status_of = |name: &str| status_named(&fake, name);
    let ctx = context(&fake, unreachable());

    let action = reconcile(stored("a-b"), ctx.clone()).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(status::REQUEUE_NAME_CONFLICT),
        "deleting or renaming the other is no change to this one"
    );
    let requests = fake.requests_without_events();
    assert!(applies(&requests).is_empty(), "{requests:#?}");
    assert!(
        requests
            .iter()
            .all(|r| r.method == "GET" || r.path.ends_with("/status")),
        "nothing created: {requests:#?}"
    );
    let s = status_of("a-b");
    for (type_, expected) in [
        ("Ready", "False"),
        ("Progressing", "False"),
        ("Degraded", "True"),
    ] {
        assert_eq!(
            condition(&s, type_),
            (expected.into(), "NameConflict".into())
        );
    }
    let message = &find_condition(&s, "Degraded").message;
    assert!(
        message.contains("a-b-eu-") && message.contains("\"b-eu\"") && message.contains("\"a\""),
        "{message}"
    );

    fake.clear_requests();
    reconcile(stored("a"), ctx.clone()).await.unwrap();
    assert!(
        !applies(&fake.requests()).is_empty(),
        "the older one goes on"
    );
    assert_ne!(
        condition(&status_of("a"), "Degraded"),
        ("True".into(), "NameConflict".into())
    );

    // Once the older one is gone, the younger one is applied.
    fake.delete(&pc_path("a"));
    fake.clear_requests();
    reconcile(stored("a-b"), ctx.clone()).await.unwrap();
    assert!(!applies(&fake.requests()).is_empty());
    assert_rbac_allows(&fake.requests());
}

/// A younger PresenceCluster that holds its objects keeps them when an
/// older one's spec change would take them: the older one is refused
/// (nothing of it applied until the clash is gone), and says who holds
/// them.
#[tokio::test]
async fn a_spec_change_that_would_take_anothers_objects_is_refused() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("a"),
        named_cluster("a", "2026-01-01T00:00:00Z", "us"),
    );
    fake.insert(
        &pc_path("a-b"),
        named_cluster("a-b", "2026-01-02T00:00:00Z", "eu"),
    );
    let ctx = context(&fake, unreachable());
    reconcile(stored_cluster(&fake, "a-b"), ctx.clone())
        .await
        .unwrap();
    let held = format!("/api/v1/namespaces/{NS}/configmaps/a-b-eu-nats-config");
    assert_eq!(
        fake.get(&held).unwrap()["metadata"]["ownerReferences"][0]["uid"],
        "uid-a-b"
    );

    let mut changed = fake.get(&pc_path("a")).unwrap();
    changed["spec"]["leaves"] = json!([{"name": "us"}, {"name": "b-eu"}]);
    changed["metadata"]["generation"] = json!(2);
    fake.insert(&pc_path("a"), changed);
    fake.clear_requests();
    reconcile(stored_cluster(&fake, "a"), ctx.clone())
        .await
        .unwrap();
    assert!(applies(&fake.requests()).is_empty());
    let s = status_named(&fake, "a");
    assert_eq!(
        condition(&s, "Degraded"),
        ("True".into(), "NameConflict".into())
    );
    let message = &find_condition(&s, "Degraded").message;
    assert!(
        message.contains("\"a-b\" in this namespace, which holds them"),
        "{message}"
    );

    // The younger one, though second by age, goes on holding them.
    fake.clear_requests();
    reconcile(stored_cluster(&fake, "a-b"), ctx.clone())
        .await
        .unwrap();
    assert!(!applies(&fake.requests()).is_empty());
    assert_eq!(
        fake.get(&held).unwrap()["metadata"]["ownerReferences"][0]["uid"],
        "uid-a-b"
    );
    assert_rbac_allows(&fake.requests());
}

#[tokio::test]
async fn status_follows_readiness_and_the_bucket_is_provisioned_at_the_real_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = testkit::Nats::hub(dir.path()).await;
    // A real leaf whose server name is what the StatefulSet's pod would have.
    let _leaf = testkit::Nats::named_leaf(dir.path(), "eu", "p-eu-nats-0", &hub, None).await;
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}], "dataplane": {"replicas": 2}})),
    );
    let ctx = context(&fake, real(&hub));
    let sts = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{n}");
    let dep = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/deployments/{n}");
    fake.set_pods(&sts("p-center-nats"), 1, 1);
    fake.set_pods(&sts("p-eu-nats"), 1, 1);
    fake.set_pods(&dep("p-center-presence"), 2, 2);
    fake.set_pods(&dep("p-eu-presence"), 1, 2);

    reconcile_stored(&fake, &ctx).await.unwrap();
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Ready"),
        ("False".into(), "RegionsNotReady".into())
    );
    let ready = find_condition(&s, "Ready");
    assert!(
        ready
            .message
            .contains("eu (NATS 1/1, presence-service 1/2)"),
        "{}",
        ready.message
    );
    let eu = &s.regions[1];
    assert_eq!(
        (
            eu.nats_ready_replicas,
            eu.dataplane_ready_replicas,
            eu.leafnode_connected
        ),
        (1, 1, Some(true))
    );

    // The bucket now exists at the hub, as the spec says.
    let js = kv::connect(&hub.url(), "hub", &kv::ClientAuth::default())
        .await
        .unwrap();
    let stream = js.get_stream("KV_PRESENCE").await.expect("bucket created");
    assert_eq!(stream.cached_info().config.num_replicas, 1);
    assert!(stream.cached_info().config.allow_message_ttl);

    let metrics = ctx.metrics.render().unwrap();
    for line in [
        r#"presence_operator_cluster_ready{name="p",namespace="ns"} 0"#,
        r#"presence_operator_cluster_regions_ready{name="p",namespace="ns"} 1"#,
        r#"presence_operator_cluster_regions{name="p",namespace="ns"} 2"#,
        r#"presence_operator_leafnode_connected{name="p",namespace="ns",region="eu"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }

    fake.set_pods(&dep("p-eu-presence"), 2, 2);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Ready"),
        ("True".into(), "AllRegionsReady".into())
    );
    assert_eq!(
        condition(&s, "Progressing"),
        ("False".into(), "ReconcileComplete".into())
    );
    assert_eq!(
        condition(&s, "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    let metrics = ctx.metrics.render().unwrap();
    assert!(metrics.contains(r#"presence_operator_cluster_ready{name="p",namespace="ns"} 1"#));
    assert!(
        metrics.contains(r#"presence_operator_cluster_regions_ready{name="p",namespace="ns"} 2"#)
    );

    // An edit rolls eu's pods: its two old pods are still ready, but the
    // status waits for the new ones.
    fake.set_status(
        &dep("p-eu-presence"),
        json!({"replicas": 3, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2}),
    );
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Ready"),
        ("False".into(), "RollingOut".into())
    );
    let ready = find_condition(&s, "Ready");
    assert!(
        ready.message.contains("rolling out presence-service"),
        "{}",
        ready.message
    );
    fake.set_pods(&dep("p-eu-presence"), 2, 2);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert_eq!(
        condition(&status(&fake), "Ready"),
        ("True".into(), "AllRegionsReady".into())
    );
}

#[tokio::test]
async fn a_spec_change_rolls_only_the_affected_workloads() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "us"}]})),
    );
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let templates = |requests: &[Recorded]| -> BTreeMap<String, Value> {
        applies(requests)
            .into_iter()
            .filter(|r| r.path.contains("/statefulsets/") || r.path.contains("/deployments/"))
            .map(|r| (r.path.clone(), r.body["spec"]["template"].clone()))
            .collect()
    };
    let before = templates(&fake.requests());

    let mut changed = fake.get(&pc_path("p")).unwrap();
    changed["metadata"]["generation"] = json!(2);
    changed["spec"]["center"]["replicas"] = json!(3);
    changed["spec"]["leaves"][0]["dataplane"] = json!({"cacheMaxCost": 1048576});
    fake.insert(&pc_path("p"), changed);
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let after = templates(&fake.requests());
    let changed: Vec<&str> = before
        .iter()
        .filter(|(path, template)| after.get(*path) != Some(template))
        .map(|(path, _)| path.rsplit('/').next().unwrap_or_default())
        .collect();
    // The hub's routes changed (center NATS), the center's bucket replicas
    // (center presence-service) and eu's cache size; us is untouched.
    assert_eq!(
        changed,
        ["p-center-presence", "p-eu-presence", "p-center-nats"]
    );
    assert_eq!(status(&fake).observed_generation, Some(2));
}

#[tokio::test]
async fn removing_a_leaf_deletes_its_objects() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}, {"name": "us"}]})),
    );
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let mut shrunk = fake.get(&pc_path("p")).unwrap();
    shrunk["spec"]["leaves"] = json!([{"name": "eu"}]);
    fake.insert(&pc_path("p"), shrunk);
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let mut deleted: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            "/api/v1/namespaces/ns/configmaps/p-us-nats-config",
            "/api/v1/namespaces/ns/services/p-us-nats",
            "/api/v1/namespaces/ns/services/p-us-nats-headless",
            "/api/v1/namespaces/ns/services/p-us-presence",
            "/apis/apps/v1/namespaces/ns/deployments/p-us-presence",
            "/apis/apps/v1/namespaces/ns/statefulsets/p-us-nats",
            "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/p-us-nats",
            "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/p-us-presence",
            "/apis/policy/v1/namespaces/ns/poddisruptionbudgets/p-us-presence",
        ]
    );
    assert!(
        fake.get("/apis/apps/v1/namespaces/ns/statefulsets/p-eu-nats")
            .is_some()
    );
    assert!(
        fake.get("/api/v1/namespaces/ns/secrets/p-jwt").is_some(),
        "secrets are never pruned"
    );
    assert_rbac_allows(&fake.requests());
}

#[tokio::test]
async fn a_missing_referenced_secret_degrades_and_applies_nothing() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "auth": {"jwtSecretRef": {"name": "mine", "key": "k"}}})),
    );
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let requests = fake.requests_without_events();
    assert!(applies(&requests).is_empty(), "{requests:#?}");
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("/secrets")),
        "a referenced Secret is never written"
    );
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Degraded"),
        ("True".into(), "SecretNotFound".into())
    );
    assert_eq!(
        condition(&s, "Ready"),
        ("False".into(), "SecretNotFound".into())
    );
    let message = &find_condition(&s, "Degraded").message;
    assert!(
        message.contains("ns/mine") && message.contains("\"k\""),
        "{message}"
    );

    // A secret presence-service would refuse at start (11 bytes) is
    // reported on the resource instead of as pods that crash.
    fake.insert("/api/v1/namespaces/ns/secrets/mine", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": NS}, "data": {"k": "c2gwcnQtdjRsdWU="}}));
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert!(applies(&fake.requests()).is_empty());
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Degraded"),
        ("True".into(), "InvalidSecret".into())
    );
    let message = &find_condition(&s, "Degraded").message;
    assert!(
        message.contains("ns/mine")
            && message.contains("11 bytes")
            && !message.contains("sh0rt-v4lue"),
        "{message}"
    );

    fake.insert("/api/v1/namespaces/ns/secrets/mine", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": NS}, "data": {"k": "YS1zZWNyZXQtb2YtMzItYnl0ZXMtZm9yLXRva2VucyE="}}));
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert!(!applies(&fake.requests()).is_empty());
    assert_eq!(
        condition(&status(&fake), "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    let deployment = fake
        .get("/apis/apps/v1/namespaces/ns/deployments/p-center-presence")
        .unwrap();
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let jwt = env.iter().find(|e| e["name"] == "JWT_SECRET").unwrap();
    assert_eq!(jwt["valueFrom"]["secretKeyRef"]["name"], "mine");

    // Rotating the referenced secret rolls the presence-service pods
    // (their config-hash changes) and nothing else.
    let hashes = |fake: &FakeApi| -> BTreeMap<String, Value> {
        applies(&fake.requests())
            .into_iter()
            .map(|r| {
                (
                    r.path.clone(),
                    r.body["spec"]["template"]["metadata"]["annotations"].clone(),
                )
            })
            .filter(|(_, a)| !a.is_null())
            .collect()
    };
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let before = hashes(&fake);
    fake.insert("/api/v1/namespaces/ns/secrets/mine", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": NS}, "data": {"k": "YS1yb3RhdGVkLXNlY3JldC1vZi0zMi1ieXRlcy1ub3c="}}));
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let after = hashes(&fake);
    let rolled: Vec<&str> = before
        .iter()
        .filter(|(path, hash)| after.get(*path) != Some(hash))
        .map(|(path, _)| path.rsplit('/').next().unwrap_or_default())
        .collect();
    assert_eq!(rolled, ["p-center-presence"]);
}

#[tokio::test]
async fn an_api_error_shows_in_status_and_is_retried() {
    let fake = FakeApi::default();
    fake.insert(&pc_path("p"), cluster(json!({"center": {}})));
    let ctx = context(&fake, unreachable());
    fake.fail(
        "PATCH",
        "/apis/apps/v1/namespaces/ns/statefulsets/p-center-nats",
        500,
    );
    let err = reconcile_stored(&fake, &ctx).await.unwrap_err();
    assert_eq!(err.reason(), Reason::KubernetesApiError);
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Degraded"),
        ("True".into(), "KubernetesApiError".into())
    );
    let message = &find_condition(&s, "Degraded").message;
    assert!(message.contains("injected failure"), "{message}");
    assert_eq!(
        error_policy(load(&fake), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
}

fn deleting(policy: &str, since_secs: i64) -> Value {
    let when = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(since_secs);
    let mut pc = cluster(json!({"center": {}, "kv": {"deletionPolicy": policy}}));
    pc["metadata"]["finalizers"] = json!([FINALIZER]);
    pc["metadata"]["deletionTimestamp"] = json!(when.to_string());
    pc
}

/// A fake API holding `p` in deletion (see [`deleting`]).
fn fake_deleting(policy: &str, since_secs: i64) -> FakeApi {
    let fake = FakeApi::default();
    fake.insert(&pc_path("p"), deleting(policy, since_secs));
    fake
}

/// Seconds in deletion just past the grace period.
const PAST_GRACE: i64 = DELETION_GRACE.as_secs() as i64 + 1;

/// Reconciles the stored `p` once, reaching the hub through `hub`.
async fn reconcile_p(fake: &FakeApi, hub: HubAccess) -> Result<Action, Error> {
    reconcile(load(fake), context(fake, hub)).await
}

fn finalizer_removed(fake: &FakeApi) -> bool {
    fake.get(&pc_path("p")).unwrap()["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.is_empty())
}

/// A real hub in `dir` holding the bucket `PRESENCE` (stream
/// `KV_PRESENCE`), and a JetStream client of it.
async fn hub_with_bucket(dir: &std::path::Path) -> (testkit::Nats, async_nats::jetstream::Context) {
    let hub = testkit::Nats::hub(dir).await;
    let js = kv::connect(&hub.url(), "hub", &kv::ClientAuth::default())
        .await
        .unwrap();
    let bucket = DesiredBucket {
        name: "PRESENCE".into(),
        replicas: 1,
    };
    kv::ensure_bucket(&js, &bucket).await.unwrap();
    (hub, js)
}

#[tokio::test]
async fn deletion_retains_or_deletes_the_bucket_and_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, js) = hub_with_bucket(dir.path()).await;

    // Retain (the default): the bucket and its data stay.
    let fake = fake_deleting("Retain", 0);
    reconcile_p(&fake, real(&hub)).await.unwrap();
    assert!(finalizer_removed(&fake));
    assert!(
        js.get_stream("KV_PRESENCE").await.is_ok(),
        "Retain keeps the bucket"
    );

    // Delete: the bucket goes, then the finalizer (the hub is its own).
    let fake = fake_deleting("Delete", 0);
    fake.insert(&hub_path("p-center-nats"), hub_controlled_by("p"));
    reconcile_p(&fake, real(&hub)).await.unwrap();
    assert!(finalizer_removed(&fake));
    assert!(
        js.get_stream("KV_PRESENCE").await.is_err(),
        "Delete removes the bucket"
    );

    // Delete with the hub unreachable: retried and reported...
    let fake = fake_deleting("Delete", 0);
    let err = reconcile_p(&fake, unreachable()).await.unwrap_err();
    assert_eq!(err.reason(), Reason::BucketDeletionFailed);
    assert!(!finalizer_removed(&fake));
    assert_eq!(
        condition(&status(&fake), "Degraded"),
        ("True".into(), "BucketDeletionFailed".into())
    );
    // ...but only for a bounded time.
    let fake = fake_deleting("Delete", PAST_GRACE);
    reconcile_p(&fake, unreachable()).await.unwrap();
    assert!(finalizer_removed(&fake));
}

/// A PresenceCluster refused for names another one holds never ran a hub
/// of its own: deleting it, even with `deletionPolicy: Delete`, leaves the
/// bucket behind the hub its names point at, whose StatefulSet the other
/// one controls (here the real hub stands for the other one's).
#[tokio::test]
async fn deleting_a_cluster_refused_for_its_names_keeps_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, js) = hub_with_bucket(dir.path()).await;
    let fake = FakeApi::default();
    let mut younger = deleting("Delete", 0);
    younger["spec"]["center"] = json!({"name": "x-eu"});
    younger["metadata"]["creationTimestamp"] = json!("2026-01-02T00:00:00Z");
    fake.insert(&pc_path("p"), younger);
    fake.insert(
        &pc_path("p-x"),
        json!({"apiVersion": "presencecluster.io/v1alpha1", "kind": "PresenceCluster",
               "metadata": {"name": "p-x", "namespace": NS, "uid": "uid-p-x",
                            "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"center": {}, "leaves": [{"name": "eu"}]}}),
    );
    fake.insert(&hub_path("p-x-eu-nats"), hub_controlled_by("p-x"));
    reconcile_p(&fake, real(&hub)).await.unwrap();
    assert!(finalizer_removed(&fake));
    assert!(
        js.get_stream("KV_PRESENCE").await.is_ok(),
        "the older PresenceCluster's bucket stays"
    );

    // Whose hub it is can't be told: retried and reported within the
    // grace period, the bucket left in place after it.
    let fake = fake_deleting("Delete", 0);
    fake.fail("GET", &hub_path("p-center-nats"), 500);
    let err = reconcile_p(&fake, real(&hub)).await.unwrap_err();
    assert_eq!(err.reason(), Reason::BucketDeletionFailed);
    assert!(err.to_string().contains("cannot tell whose hub"), "{err}");
    assert!(!finalizer_removed(&fake));
    let fake = fake_deleting("Delete", PAST_GRACE);
    fake.fail("GET", &hub_path("p-center-nats"), 500);
    reconcile_p(&fake, real(&hub)).await.unwrap();
    assert!(finalizer_removed(&fake));
    assert!(js.get_stream("KV_PRESENCE").await.is_ok());
}

fn hub_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}")
}

/// A hub StatefulSet controlled by the PresenceCluster `owner`.
fn hub_controlled_by(owner: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
           "metadata": {"ownerReferences": [{"apiVersion": "presencecluster.io/v1alpha1",
                                             "kind": "PresenceCluster", "name": owner,
                                             "uid": format!("uid-{owner}"), "controller": true}]}})
}

#[tokio::test]
async fn a_paused_cluster_keeps_the_generation_it_last_applied() {
    let fake = FakeApi::default();
    fake.insert(&pc_path("p"), cluster(json!({"center": {}})));
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    assert_eq!(status(&fake).observed_generation, Some(1));

    // A new generation arrives while paused: nothing is applied, and the
    // status keeps saying it describes generation 1.
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["metadata"]["annotations"] = json!({PAUSED_ANNOTATION: "true"});
    pc["metadata"]["generation"] = json!(2);
    pc["spec"]["leaves"] = json!([{"name": "eu"}]);
    fake.insert(&pc_path("p"), pc);
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let requests = fake.requests_without_events();
    let calls: Vec<(&str, &str)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let status_path = format!("{}/status", pc_path("p"));
    assert_eq!(calls, [("PATCH", status_path.as_str())]);
    let s = status(&fake);
    assert_eq!(
        s.observed_generation,
        Some(1),
        "paused: generation 2 was never applied"
    );
    assert_eq!(condition(&s, "Ready"), ("Unknown".into(), "Paused".into()));
    assert_eq!(
        condition(&s, "Progressing"),
        ("False".into(), "Paused".into())
    );
    assert!(find_condition(&s, "Ready").message.contains("generation 1"));
    assert_rbac_allows(&fake.requests());

    // Resumed: generation 2 is applied and reported.
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["metadata"]["annotations"] = json!({});
    fake.insert(&pc_path("p"), pc);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let s = status(&fake);
    assert_eq!(s.observed_generation, Some(2));
    assert_eq!(
        condition(&s, "Ready"),
        ("False".into(), "HubNotReady".into())
    );
    assert!(
        fake.get("/apis/apps/v1/namespaces/ns/statefulsets/p-eu-nats")
            .is_some()
    );
}

#[tokio::test]
async fn leaf_links_are_read_from_every_hub_server() {
    // Two hub servers; the eu leaf is linked to the second one only, as it
    // may be behind a client Service that answers from either.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hub_a = testkit::Nats::hub(dir_a.path()).await;
    let hub_b = testkit::Nats::hub(dir_b.path()).await;
    let _leaf = testkit::Nats::named_leaf(dir_b.path(), "eu", "p-eu-nats-0", &hub_b, None).await;
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}]})),
    );
    let sts = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{n}");
    let dep = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/deployments/{n}");
    for (path, ready) in [
        (sts("p-center-nats"), 1),
        (sts("p-eu-nats"), 1),
        (dep("p-center-presence"), 2),
        (dep("p-eu-presence"), 2),
    ] {
        fake.set_pods(&path, ready, ready);
    }
    let monitor = |hub: &testkit::Nats| ("127.0.0.1".to_owned(), hub.monitor_port);
    let with = |monitors: Vec<(String, u16)>| HubAccess::Fixed {
        nats_url: hub_a.url(),
        monitors,
    };
    let eu_link = |hub: HubAccess| {
        let fake = &fake;
        async move {
            reconcile_stored(fake, &context(fake, hub)).await.unwrap();
            let s = status(fake);
            (s.regions[1].leafnode_connected, condition(&s, "Ready").1)
        }
    };
    // Asking every server finds the link.
    assert_eq!(
        eu_link(with(vec![monitor(&hub_a), monitor(&hub_b)])).await,
        (Some(true), "AllRegionsReady".into())
    );
    assert_eq!(status(&fake).regions_ready.as_deref(), Some("2/2"));
    // Asking only the first would call a linked leaf disconnected.
    assert_eq!(
        eu_link(with(vec![monitor(&hub_a)])).await,
        (Some(false), "LeafnodeDisconnected".into())
    );
    assert_eq!(status(&fake).regions_ready.as_deref(), Some("1/2"));
    // A server that doesn't answer might hold the link: unknown, not false.
    assert_eq!(
        eu_link(with(vec![monitor(&hub_a), ("127.0.0.1".into(), 1)])).await,
        (None, "AllRegionsReady".into())
    );
    // Each change of a link was an Event (an unknown link is no change).
    let link_events: Vec<(String, String)> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/events"))
        .map(|r| {
            (
                r.body["reason"].as_str().unwrap_or_default().to_owned(),
                r.body["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .filter(|(reason, _)| reason.starts_with("Leafnode"))
        .collect();
    assert_eq!(
        link_events,
        [
            ("LeafnodeConnected".to_owned(), "Normal".to_owned()),
            ("LeafnodeDisconnected".to_owned(), "Warning".to_owned())
        ]
    );
    assert_rbac_allows(&fake.requests());
}

/// A spec that works but that a drain would cut off is pointed out once
/// per generation, as Warning Events naming the region.
#[tokio::test]
async fn a_new_generation_with_single_points_of_failure_gets_advice() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {"replicas": 3}, "leaves": [{"name": "eu"}]})),
    );
    let ctx = context(&fake, unreachable());
    let advice = |fake: &FakeApi| -> Vec<(String, String)> {
        fake.requests()
            .into_iter()
            .filter(|r| r.path.contains("/events") && r.body["reason"] == "SpecAdvice")
            .map(|r| {
                (
                    r.body["type"].as_str().unwrap_or_default().to_owned(),
                    r.body["note"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    reconcile_stored(&fake, &ctx).await.unwrap();
    let first = advice(&fake);
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0].0, "Warning");
    assert!(
        first[0]
            .1
            .starts_with("region eu: a single leaf NATS server"),
        "{first:#?}"
    );
    // The same generation again: nothing new to say.
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert_eq!(advice(&fake).len(), 1);
    // A new generation is advised on again.
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["metadata"]["generation"] = json!(2);
    fake.insert(&pc_path("p"), pc);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert_eq!(advice(&fake).len(), 2);
    assert_rbac_allows(&fake.requests());
}

#[tokio::test]
async fn autoscaling_hands_replicas_over_to_the_autoscaler() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "dataplane": {"autoscaling": {"maxReplicas": 6}}})),
    );
    // The Deployment as the operator applied it before autoscaling: its
    // field manager owns replicas, now 3.
    let deployment = "/apis/apps/v1/namespaces/ns/deployments/p-center-presence";
    fake.insert(
        deployment,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "p-center-presence", "namespace": NS,
                   "managedFields": [{"manager": "presence-operator", "operation": "Apply",
                       "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                       "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}}]},
               "spec": {"replicas": 3, "selector": {}, "template": {}}}),
    );
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let requests = fake.requests();
    let to_deployment: Vec<&Recorded> = requests.iter().filter(|r| r.path == deployment).collect();
    let steps: Vec<(&str, Option<&str>)> = to_deployment
        .iter()
        .map(|r| {
            let manager = r
                .query
                .split('&')
                .find_map(|p| p.strip_prefix("fieldManager="));
            (r.method.as_str(), manager)
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("GET", None),
            ("PATCH", Some(children::HANDOVER_MANAGER)),
            ("PATCH", Some("presence-operator")),
        ]
    );
    assert_eq!(to_deployment[1].body["spec"], json!({"replicas": 3}));
    assert!(
        to_deployment[2].body["spec"].get("replicas").is_none(),
        "the HPA owns replicas"
    );
    let hpa = fake
        .get("/apis/autoscaling/v2/namespaces/ns/horizontalpodautoscalers/p-center-presence")
        .expect("HPA applied");
    assert_eq!(
        (
            hpa["spec"]["minReplicas"].as_i64(),
            hpa["spec"]["maxReplicas"].as_i64()
        ),
        (Some(2), Some(6))
    );
    assert_rbac_allows(&requests);

    // Once the operator no longer owns replicas, no handover happens again.
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let again: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == deployment)
        .map(|r| r.query)
        .collect();
    assert!(
        again
            .iter()
            .all(|q| !q.contains(children::HANDOVER_MANAGER)),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_larger_storage_size_grows_each_volume_and_keeps_the_template() {
    let fake = FakeApi::default();
    let spec = |size: &str| json!({"center": {"jetstream": {"storageSize": size}}});
    fake.insert(&pc_path("p"), cluster(spec("20Gi")));
    // The hub as first created, with 10Gi volumes; one already grown.
    let sts = "/apis/apps/v1/namespaces/ns/statefulsets/p-center-nats";
    fake.insert(
        sts,
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": "p-center-nats", "namespace": NS},
               "spec": {"selector": {}, "serviceName": "x", "template": {},
                   "volumeClaimTemplates": [{"metadata": {"name": "data"},
                       "spec": {"resources": {"requests": {"storage": "10Gi"}}}}]}}),
    );
    let labels = json!({"app.kubernetes.io/instance": "p", "app.kubernetes.io/component": "nats",
                        "presencecluster.io/region": "center"});
    for (name, size) in [
        ("data-p-center-nats-0", "10Gi"),
        ("data-p-center-nats-1", "20Gi"),
    ] {
        fake.insert(
            &format!("/api/v1/namespaces/ns/persistentvolumeclaims/{name}"),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": name, "namespace": NS, "labels": labels},
                   "spec": {"resources": {"requests": {"storage": size}}}}),
        );
    }
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let requests = fake.requests();
    let applied_sts = applies(&requests)
        .into_iter()
        .find(|r| r.path == sts)
        .expect("applied");
    assert_eq!(
        applied_sts.body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "10Gi",
        "a StatefulSet's claim template never changes"
    );
    let claim_patches = |requests: &[Recorded], part: &str| -> Vec<(String, Value)> {
        requests
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.contains("/persistentvolumeclaims/"))
            .filter(|r| r.body.get(part).is_some())
            .map(|r| {
                (
                    r.path.rsplit('/').next().unwrap_or_default().to_owned(),
                    r.body.clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        claim_patches(&requests, "spec"),
        [(
            "data-p-center-nats-0".to_owned(),
            json!({"spec": {"resources": {"requests": {"storage": "20Gi"}}}})
        )]
    );
    // Each claim is marked once, so that Argo CD's label tracking neither
    // reports it extraneous nor prunes it.
    let keep = json!({"metadata": {"annotations": {
        "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        "argocd.argoproj.io/compare-options": "IgnoreExtraneous"}}});
    assert_eq!(
        claim_patches(&requests, "metadata"),
        [
            ("data-p-center-nats-0".to_owned(), keep.clone()),
            ("data-p-center-nats-1".to_owned(), keep)
        ]
    );
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let again = fake.requests();
    assert_eq!(
        claim_patches(&again, "metadata").len(),
        2,
        "marked claims are left alone"
    );
    assert_eq!(
        condition(&status(&fake), "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    assert_rbac_allows(&requests);

    // A StorageClass that can't expand: Degraded says which volume.
    fake.fail(
        "PATCH",
        "/api/v1/namespaces/ns/persistentvolumeclaims/data-p-center-nats-0",
        403,
    );
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["spec"] = spec("30Gi");
    fake.insert(&pc_path("p"), pc);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Degraded"),
        ("True".into(), "StorageExpansionFailed".into())
    );
    assert!(
        find_condition(&s, "Degraded")
            .message
            .contains("data-p-center-nats-0")
    );

    // Below what the volumes were created with: refused, nothing applied.
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["spec"] = spec("5Gi");
    fake.insert(&pc_path("p"), pc);
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert!(applies(&fake.requests()).is_empty());
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Degraded"),
        ("True".into(), "InvalidSpec".into())
    );
    assert!(
        find_condition(&s, "Degraded")
            .message
            .contains("can't shrink from 30Gi to 5Gi")
    );
}

#[tokio::test]
async fn monitoring_renders_pod_monitors_and_prunes_them_when_switched_off() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}],
                       "monitoring": {"enabled": true, "labels": {"release": "kps"}}})),
    );
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let monitors = "/apis/monitoring.coreos.com/v1/namespaces/ns/podmonitors";
    let presence = fake
        .get(&format!("{monitors}/p-eu-presence"))
        .expect("PodMonitor applied");
    assert_eq!(presence["kind"], "PodMonitor");
    assert_eq!(presence["metadata"]["labels"]["release"], "kps");
    assert_eq!(presence["spec"]["podMetricsEndpoints"][0]["port"], "http");
    assert!(fake.get(&format!("{monitors}/p-center-nats")).is_some());
    let sts = fake
        .get("/apis/apps/v1/namespaces/ns/statefulsets/p-center-nats")
        .unwrap();
    let containers: Vec<&str> = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["nats", "prom-exporter"]);
    assert_rbac_allows(&fake.requests());

    // Switched off: the PodMonitors go, the sidecar too.
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["spec"]["monitoring"] = json!({"enabled": false});
    fake.insert(&pc_path("p"), pc);
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let deleted: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(deleted.len(), 4, "{deleted:?}");
    assert!(
        deleted.iter().all(|p| p.starts_with(monitors)),
        "{deleted:?}"
    );

    // A cluster without the Prometheus Operator's CRDs answers 404: fine.
    fake.fail("GET", monitors, 404);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    assert_eq!(
        condition(&status(&fake), "Degraded"),
        ("False".into(), "AsExpected".into())
    );
}

#[tokio::test]
async fn nats_credentials_are_made_once_and_the_certificate_is_renewed_in_time() {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu"}]})),
    );
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let secret = |name: &str| {
        fake.get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))
            .expect(name)
    };
    let seed_before = secret("p-eu-nats-leaf")["stringData"]["seed"].clone();
    assert!(seed_before.as_str().is_some_and(|s| s.starts_with("SU")));
    // The hub's config names the public keys only, never a seed.
    let conf = fake
        .get("/api/v1/namespaces/ns/configmaps/p-center-nats-config")
        .unwrap()["data"]["nats.conf"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in ["p-eu-nats-leaf", "p-nats-presence", "p-nats-operator"] {
        let seed = secret(name)["stringData"]["seed"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!conf.contains(&seed), "{name}'s seed in a ConfigMap");
    }
    let leaf_public = crate::pki::public_of(seed_before.as_str().unwrap(), "eu").unwrap();
    assert!(conf.contains(&leaf_public));

    // A certificate 25 days from expiry is issued again; the hub rolls.
    let ca = secret("p-nats-ca");
    let ca_key = ca["stringData"]["ca.key"].as_str().unwrap();
    let old = time::OffsetDateTime::now_utc() - time::Duration::days(340);
    let scope = render::Scope::new(&load(&fake), NS).unwrap();
    let expiring = crate::pki::issue(
        "p",
        ca_key,
        &crate::pki::nats_sans(&scope, &load(&fake).spec),
        old,
    )
    .unwrap();
    let mut tls = secret("p-nats-tls");
    tls["stringData"]["tls.crt"] = json!(expiring.cert);
    fake.insert("/api/v1/namespaces/ns/secrets/p-nats-tls", tls);
    let hub_hash = |fake: &FakeApi| {
        fake.get("/apis/apps/v1/namespaces/ns/statefulsets/p-center-nats").unwrap()["spec"]["template"]["metadata"]
            ["annotations"]["presencecluster.io/config-hash"]
            .clone()
    };
    let before = hub_hash(&fake);
    fake.clear_requests();
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let patched: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/secrets/p-nats-tls"))
        .collect();
    assert_eq!(patched.len(), 1);
    let renewed = fake
        .get("/api/v1/namespaces/ns/secrets/p-nats-tls")
        .unwrap();
    let expiry = crate::pki::not_after(renewed["stringData"]["tls.crt"].as_str().unwrap()).unwrap();
    assert!(expiry > time::OffsetDateTime::now_utc() + time::Duration::days(300));
    assert_ne!(hub_hash(&fake), before, "a new certificate rolls the hub");
    assert_rbac_allows(&fake.requests());
    // A new leaf region's names get a new certificate at once.
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["spec"]["leaves"] = json!([{"name": "eu"}, {"name": "us"}]);
    fake.insert(&pc_path("p"), pc);
    reconcile(load(&fake), ctx.clone()).await.unwrap();
    let names = fake
        .get("/api/v1/namespaces/ns/secrets/p-nats-tls")
        .unwrap()["stringData"]["names"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(names.contains("p-us-nats.ns.svc"), "{names}");
    let s = status(&fake);
    let shown = s.nats_certificate_expiry.expect("expiry in status");
    assert!(
        shown.starts_with(&(time::OffsetDateTime::now_utc().year() + 1).to_string()),
        "{shown}"
    );
    // Seeds are never rewritten.
    assert_eq!(secret("p-eu-nats-leaf")["stringData"]["seed"], seed_before);
    let metrics = ctx.metrics.render().unwrap();
    assert!(metrics.contains(
        "presence_operator_certificate_expiry_timestamp_seconds{name=\"p\",namespace=\"ns\"}"
    ));
}

/// Every request the controller made is allowed by the ClusterRole that
/// `config/rbac` installs, so least privilege can't silently break it.
fn assert_rbac_allows(requests: &[Recorded]) {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rbac/cluster_role.yaml"),
    )
    .expect("cluster_role.yaml");
    let role: Value = serde_yaml::from_str(&text).expect("yaml");
    let rules = role["rules"].as_array().expect("rules").clone();
    for request in requests {
        let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match segments.first() {
            Some(&"api") => ("", &segments[2..]),
            _ => (segments.get(1).copied().unwrap_or_default(), &segments[3..]),
        };
        // namespaces/<ns>/<resource>[/<name>[/<subresource>]]
        let resource = match rest.get(4) {
            Some(sub) => format!("{}/{sub}", rest[2]),
            None => rest[2].to_owned(),
        };
        let named = rest.len() > 3;
        let verb = match (request.method.as_str(), named) {
            ("GET", true) => "get",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            (other, _) => panic!("unexpected method {other}"),
        };
        let allowed = rules.iter().any(|rule| {
            let has = |key: &str, value: &str| {
                rule[key]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x == value))
            };
            has("apiGroups", group) && has("resources", &resource) && has("verbs", verb)
        });
        assert!(
            allowed,
            "RBAC forbids {verb} {group}/{resource} ({} {})",
            request.method, request.path
        );
    }
}

#[tokio::test]
async fn errors_back_off_exponentially_and_are_reported_as_events() {
    let fake = FakeApi::default();
    fake.insert(&pc_path("p"), cluster(json!({"center": {}})));
    let ctx = context(&fake, unreachable());
    let pc = load(&fake);
    let err = Error::Random("no entropy".into());
    let delays: Vec<Action> = (0..8)
        .map(|_| error_policy(pc.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(delays[0], Action::requeue(Duration::from_secs(5)));
    assert_eq!(delays[1], Action::requeue(Duration::from_secs(10)));
    assert_eq!(delays[7], Action::requeue(Duration::from_secs(160)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/events"))
        .collect();
    assert!(!events.is_empty());
    assert_eq!(events[0].body["reason"], "SecretGenerationFailed");
    assert_eq!(events[0].body["type"], "Warning");
}

/// One spec across three clusters (hub, eu, us), with the Secrets a user
/// places in each cluster: the JWT secret, the shared certificate and the
/// leaves' seeds.
fn multi_cluster_fake() -> FakeApi {
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({
            "center": {"cluster": "hub", "leafnodes": {"serviceType": "LoadBalancer", "advertise": "hub.example.com:7422"}},
            "leaves": [
                {"name": "eu", "cluster": "eu",
                 "nats": {"credentialsSecretRef": {"name": "eu-seed", "key": "seed"}}},
                {"name": "us", "cluster": "us",
                 "nats": {"credentialsSecretRef": {"name": "us-seed", "key": "seed"}}}],
            "auth": {"jwtSecretRef": {"name": "jwt", "key": "secret"}},
            "tls": {"secretName": "nats-tls"}})),
    );
    let now = time::OffsetDateTime::now_utc();
    let ca = crate::pki::new_ca("p", now).unwrap();
    let cert = crate::pki::issue("p", &ca.key, &["hub.example.com".into()], now).unwrap();
    let secret = |name: &str, data: Value| {
        fake.insert(
            &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": name, "namespace": NS}, "stringData": data}),
        );
    };
    secret("jwt", json!({"secret": "a-secret-of-32-bytes-for-tokens!"}));
    secret(
        "nats-tls",
        json!({"tls.crt": cert.cert, "tls.key": cert.key, "ca.crt": ca.cert}),
    );
    for leaf in ["eu-seed", "us-seed"] {
        secret(leaf, json!({"seed": crate::pki::new_user().unwrap().seed}));
    }
    fake
}

fn context_for(fake: &FakeApi, hub: HubAccess, cluster: &str) -> Arc<Context> {
    let mut ctx = Context::new(fake.client(), "test", Metrics::new().unwrap(), hub);
    ctx.cluster_name = Some(cluster.to_owned());
    Arc::new(ctx)
}

/// The regions of the objects applied (by their region label).
fn applied_regions(requests: &[Recorded]) -> BTreeSet<String> {
    applies(requests)
        .iter()
        .filter_map(|r| {
            r.body["metadata"]["labels"]["presencecluster.io/region"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn an_operator_reconciles_only_its_clusters_regions_and_the_bucket_only_with_the_center() {
    let dir = tempfile::tempdir().unwrap();
    let hub = testkit::Nats::hub(dir.path()).await;
    let js = kv::connect(&hub.url(), "hub", &kv::ClientAuth::default())
        .await
        .unwrap();
    let sts = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{n}");
    let dep = |n: &str| format!("/apis/apps/v1/namespaces/{NS}/deployments/{n}");
    let ready_all = |fake: &FakeApi| {
        for region in ["center", "eu", "us"] {
            fake.set_pods(&sts(&format!("p-{region}-nats")), 1, 1);
            fake.set_pods(&dep(&format!("p-{region}-presence")), 2, 2);
        }
    };

    // The eu cluster's operator, though it could reach the hub.
    let fake = multi_cluster_fake();
    ready_all(&fake);
    let ctx = context_for(&fake, real(&hub), "eu");
    reconcile_stored(&fake, &ctx).await.unwrap();
    let requests = fake.requests_without_events();
    assert_eq!(
        applied_regions(&requests),
        BTreeSet::from(["eu".to_owned()])
    );
    let posted: BTreeSet<&str> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/secrets"))
        .filter_map(|r| r.body["metadata"]["name"].as_str())
        .collect();
    // Its own presence-service seed and route password; no operator seed
    // (the hub is elsewhere), nothing of us, and never a referenced Secret.
    assert_eq!(
        posted,
        BTreeSet::from(["p-nats-presence", "p-nats-routes"]),
        "{posted:?}"
    );
    assert!(
        js.get_stream("KV_PRESENCE").await.is_err(),
        "no bucket from a cluster without the center"
    );
    let s = status(&fake);
    let names: Vec<&str> = s.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["eu"], "status reports only this cluster's regions");
    // Fixed addresses don't reach a remote leaf's monitor: link unknown.
    assert_eq!(s.regions[0].leafnode_connected, None);
    assert_eq!(
        condition(&s, "Ready"),
        ("True".into(), "AllRegionsReady".into()),
        "{}",
        find_condition(&s, "Ready").message
    );
    assert_rbac_allows(&requests);

    // The hub cluster's operator: the center only, and the bucket.
    let fake = multi_cluster_fake();
    ready_all(&fake);
    let ctx = context_for(&fake, real(&hub), "hub");
    reconcile_stored(&fake, &ctx).await.unwrap();
    let requests = fake.requests_without_events();
    assert_eq!(
        applied_regions(&requests),
        BTreeSet::from(["center".to_owned()])
    );
    let leafnodes = fake
        .get(&format!(
            "/api/v1/namespaces/{NS}/services/p-center-nats-leafnodes"
        ))
        .expect("the hub's leafnode listener is exposed");
    assert_eq!(leafnodes["spec"]["type"], "LoadBalancer");
    js.get_stream("KV_PRESENCE")
        .await
        .expect("the center's cluster provisions the bucket");
    let s = status(&fake);
    let names: Vec<&str> = s.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["center"]);
}

#[tokio::test]
async fn a_manifest_over_clusters_needs_the_operator_to_know_its_own() {
    // Started without --cluster-name: it would run every region here.
    let fake = multi_cluster_fake();
    let ctx = context(&fake, unreachable());
    reconcile_stored(&fake, &ctx).await.unwrap();
    let requests = fake.requests_without_events();
    assert!(applies(&requests).is_empty(), "{requests:#?}");
    let s = status(&fake);
    assert_eq!(
        condition(&s, "Ready"),
        ("False".into(), "InvalidSpec".into())
    );
    let message = &find_condition(&s, "Degraded").message;
    assert!(message.contains("--cluster-name"), "{message}");

    // A cluster the manifest doesn't name (a typo): after the eu operator
    // made eu's objects, one misnamed deletes none of them.
    let fake = multi_cluster_fake();
    reconcile_stored(&fake, &context_for(&fake, unreachable(), "eu"))
        .await
        .unwrap();
    assert!(!applies(&fake.requests()).is_empty());
    fake.clear_requests();
    reconcile(load(&fake), context_for(&fake, unreachable(), "eu-clustr"))
        .await
        .unwrap();
    let requests = fake.requests_without_events();
    assert!(
        !requests.iter().any(|r| r.method == "DELETE") && applies(&requests).is_empty(),
        "{requests:#?}"
    );
    let message = find_condition(&status(&fake), "Degraded").message.clone();
    assert!(
        message.contains("no region of this manifest runs in cluster \"eu-clustr\""),
        "{message}"
    );

    // A leaf naming its cluster while the center names none: every
    // cluster would run a hub.
    let fake = FakeApi::default();
    fake.insert(
        &pc_path("p"),
        cluster(json!({"center": {}, "leaves": [{"name": "eu", "cluster": "eu"}]})),
    );
    reconcile_stored(&fake, &context_for(&fake, unreachable(), "eu"))
        .await
        .unwrap();
    assert!(applies(&fake.requests()).is_empty());
    let message = find_condition(&status(&fake), "Degraded").message.clone();
    assert!(message.contains("center.cluster too"), "{message}");
}

#[tokio::test]
async fn deleting_in_a_leaf_cluster_leaves_the_bucket_to_the_centers() {
    let fake = multi_cluster_fake();
    let mut pc = fake.get(&pc_path("p")).unwrap();
    pc["spec"]["kv"] = json!({"deletionPolicy": "Delete"});
    pc["metadata"]["finalizers"] = json!([FINALIZER]);
    pc["metadata"]["deletionTimestamp"] = json!(Timestamp::now().to_string());
    fake.insert(&pc_path("p"), pc);
    // The hub is unreachable from here; that must not hold deletion up.
    reconcile(load(&fake), context_for(&fake, unreachable(), "eu"))
        .await
        .unwrap();
    assert!(finalizer_removed(&fake));
    let reasons: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path.contains("/events"))
        .filter_map(|r| r.body["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().all(|r| !r.starts_with("Bucket")),
        "{reasons:?}"
    );
}
