//! Multi-region behaviour on real NATS: a hub with JetStream domain `hub`,
//! leaf `eu` (no JetStream of its own), leaf `us` (its own domain), and one
//! `presence-service` per region.

mod common;

use common::*;
use serde_json::{Value, json};

/// Waits until `service` serves `user` with `message`.
async fn wait_for_message(client: &reqwest::Client, service: &Service, user: &str, message: &str) {
    wait_until(
        &format!("{user}={message} at {}", service.node_id),
        READY_TIMEOUT,
        || async {
            let (status, body) = get(client, service, user).await;
            status == 200 && body["message"] == message
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_at_one_leaf_shows_everywhere() {
    let c = Cluster::start().await;
    let client = http();
    // Warm every cache with "not found" first: the watch must replace it.
    for svc in c.services() {
        assert_eq!(get(&client, svc, "ann@example.com").await.0, 404);
    }
    let response = set(&client, &c.eu, "ann@example.com", "busy", "from eu").await;
    assert_eq!(response.status(), 200);
    let written: Value = response.json().await.unwrap();
    assert_eq!(written["nodeID"], "eu-1");
    // Read-your-writes at the writer: no waiting at all.
    let (status, body) = get(&client, &c.eu, "ann@example.com").await;
    assert_eq!((status, &body), (200, &written));
    for svc in [&c.us, &c.center] {
        wait_for_message(&client, svc, "ann@example.com", "from eu").await;
        assert_eq!(get(&client, svc, "ann@example.com").await.1, written);
    }
    // And back the other way, through the leaf with its own JetStream domain.
    set(&client, &c.us, "ann@example.com", "online", "from us").await;
    wait_for_message(&client, &c.eu, "ann@example.com", "from us").await;
    wait_for_message(&client, &c.center, "ann@example.com", "from us").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_and_multi_gets_work_through_leaves() {
    let c = Cluster::start().await;
    let client = http();
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"userID": format!("u{i}"), "status": "online", "message": format!("m{i}")}))
        .collect();
    let response = client
        .post(c.us.url("/api/v2/presence/batch"))
        .header("Authorization", bearer("svc", "presence:write"))
        .json(&json!({"presences": items}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["succeeded"], 300, "{result}");
    wait_for_message(&client, &c.eu, "u299", "m299").await;
    let ids: Vec<String> = (250..300)
        .map(|i| format!("u{i}"))
        .chain(["ghost".into()])
        .collect();
    let body: Value = get_json(
        &client,
        &format!("{}?users={}", c.eu.url("/api/v2/presence"), ids.join(",")),
        true,
    )
    .await;
    assert_eq!(body["presences"].as_array().unwrap().len(), 50);
    assert_eq!(body["notFound"], json!(["ghost"]));
    // The writer's watch passes over the echoes of the batch it applied
    // already (no stream follows those users) without decoding them;
    // another node's watch has no own writes to pass over.
    let undecoded = |svc: &Service| {
        let client = client.clone();
        let url = svc.url("/metrics");
        async move {
            let text = client.get(url).send().await.unwrap().text().await.unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("presence_watch_echoes_undecoded_total "))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("the counter is exported")
        }
    };
    wait_until("us passes over its own echoes", READY_TIMEOUT, || async {
        undecoded(&c.us).await > 0
    })
    .await;
    assert!(undecoded(&c.us).await <= 300);
    assert_eq!(undecoded(&c.eu).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_node_warms_its_cache_from_the_bucket() {
    let c = Cluster::start().await;
    let client = http();
    for i in 0..20 {
        set(&client, &c.center, &format!("w{i}"), "away", "warm").await;
    }
    let late = c.start_eu_node("eu-2").await;
    wait_until("eu-2 to replay the bucket", READY_TIMEOUT, || async {
        let health: Value = get_json(&client, &late.url("/health"), false).await;
        health["cache"]["entries"].as_u64().unwrap_or(0) >= 20
    })
    .await;
    let stats: Value = get_json(&client, &late.url("/api/v2/cache/metrics"), true).await;
    let misses_before = stats["misses"].as_u64().unwrap();
    assert_eq!(get(&client, &late, "w7").await.1["message"], "warm");
    let stats: Value = get_json(&client, &late.url("/api/v2/cache/metrics"), true).await;
    assert_eq!(
        stats["misses"].as_u64().unwrap(),
        misses_before,
        "served from the warmed cache"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leaf_that_starts_before_the_bucket_exists_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Nats::hub(dir.path()).await;
    let eu_nats = Nats::leaf(dir.path(), "eu", &hub, None).await;
    let eu = Service::spawn(dir.path(), ServiceSpec::new("eu-1", "leaf", eu_nats.url()));
    let client = http();
    // Live, but not ready: leaves never create the bucket.
    wait_until("eu-1 liveness", READY_TIMEOUT, || async {
        matches!(client.get(eu.url("/health/liveness")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let ready = client
        .get(eu.url("/health/readiness"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let response = set(&client, &eu, "early", "online", "").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
    let _center = Service::start(
        dir.path(),
        ServiceSpec::new("center-1", "center", hub.url()),
    )
    .await;
    eu.wait_ready().await;
    assert_eq!(
        set(&client, &eu, "early", "online", "made it")
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn propagation_keeps_up_with_a_stream_of_writes() {
    let c = Cluster::start().await;
    let client = http();
    for i in 0..200 {
        let response = set(
            &client,
            &c.eu,
            &format!("p{}", i % 20),
            "online",
            &format!("v{i}"),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    // The last write of each user wins everywhere, whatever the interleaving.
    for u in 0..20 {
        let expected = format!("v{}", 180 + u);
        wait_for_message(&client, &c.us, &format!("p{u}"), &expected).await;
        wait_for_message(&client, &c.center, &format!("p{u}"), &expected).await;
    }
}
