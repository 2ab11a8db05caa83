//! Faults on real NATS: the hub killed and restarted (file store), a leaf's
//! NATS server restarted. No acknowledged write may be lost, reads keep
//! working where they can, writes fail fast, and everything recovers alone.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Writes a fresh user per request through `targets` in turn until `stop`,
/// recording every acknowledged write (user -> message).
async fn write_stream(
    targets: Vec<String>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
) -> (u64, u64) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    let (mut ok, mut failed) = (0, 0);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let base = &targets[(i as usize) % targets.len()];
        let user = format!("stream-{i}");
        let message = format!("msg-{i}");
        let response = client
            .post(format!("{base}/api/v2/presence/{user}"))
            .header("Authorization", bearer("svc", "presence:write"))
            .json(&serde_json::json!({"status": "online", "message": message}))
            .send()
            .await;
        match response {
            Ok(r) if r.status() == 200 => {
                ok += 1;
                acked.lock().await.insert(user, message);
            }
            Ok(r) => {
                assert_eq!(
                    r.status(),
                    503,
                    "a failed write is a 503, never anything else"
                );
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("a write hung or the connection broke: {e}"),
        }
        i += 1;
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_killed_and_restarted_loses_no_acknowledged_write() {
    let mut c = Cluster::start().await;
    let client = http();
    for svc in c.services() {
        let user = format!("before-{}", svc.node_id);
        assert_eq!(
            set(&client, svc, &user, "busy", "before").await.status(),
            200
        );
    }
    // Warm eu's cache with every user so it can serve them during the outage.
    for svc in c.services() {
        let user = format!("before-{}", svc.node_id);
        wait_until("eu to see the early writes", READY_TIMEOUT, || async {
            get(&client, &c.eu, &user).await.0 == 200
        })
        .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let writer = tokio::spawn(write_stream(
        vec![c.eu.base.clone(), c.center.base.clone(), c.us.base.clone()],
        stop.clone(),
        acked.clone(),
    ));
    wait_until("some streamed writes", READY_TIMEOUT, || async {
        acked.lock().await.len() >= 30
    })
    .await;

    c.hub.kill();

    // The leaf keeps serving cached reads and stays ready.
    let (status, body) = get(&client, &c.eu, "before-center-1").await;
    assert_eq!((status, body["message"].as_str()), (200, Some("before")));
    let ready = client
        .get(c.eu.url("/health/readiness"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a leaf cut off from the hub still serves reads"
    );
    // Writes at the leaf fail fast with a JSON 503, never hang.
    let bounded = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let response = bounded
        .post(c.eu.presence_url("during-outage"))
        .header("Authorization", bearer("svc", "presence:write"))
        .json(&serde_json::json!({"status": "online"}))
        .send()
        .await
        .expect("a write during the outage answers within 5 s");
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(
        ["store_unavailable", "store_timeout"]
            .contains(&body["error"]["code"].as_str().unwrap_or("")),
        "{body}"
    );
    eprintln!(
        "write during outage answered 503 in {:?}",
        started.elapsed()
    );
    // The center's regional NATS is the hub: it is not ready.
    wait_until("center to report not ready", READY_TIMEOUT, || async {
        matches!(client.get(c.center.url("/health/readiness")).send().await, Ok(r) if r.status() == 503)
    })
    .await;
    let health: Value = get_json(&client, &c.eu.url("/health"), false).await;
    assert_eq!(health["kv"]["reachable"], false, "{health}");

    c.hub.restart().await;
    c.eu_nats.wait_for_hub_link().await;
    c.us_nats.wait_for_hub_link().await;
    c.center.wait_ready().await;
    let after_restart = acked.lock().await.len();
    wait_until(
        "writes to succeed again through every node",
        Duration::from_secs(30),
        || async { acked.lock().await.len() >= after_restart + 30 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = writer.await.unwrap();
    eprintln!("stream: {ok} acknowledged, {failed} refused with 503");

    // Every acknowledged write is in the bucket: a brand-new node, whose
    // cache starts empty, serves each one, and so does every old node.
    let fresh = Service::start(
        c.dir.path(),
        ServiceSpec::new("fresh", "center", c.hub.url()),
    )
    .await;
    let acked = acked.lock().await.clone();
    assert!(acked.len() >= 60);
    let ids: Vec<&String> = acked.keys().collect();
    for svc in [&fresh, &c.center, &c.eu, &c.us] {
        for chunk in ids.chunks(100) {
            let users: Vec<String> = chunk.iter().map(|u| u.to_string()).collect();
            let url = format!("{}?users={}", svc.url("/api/v2/presence"), users.join(","));
            wait_until(
                &format!("{} to serve every acknowledged write", svc.node_id),
                READY_TIMEOUT,
                || async {
                    let body: Value = get_json(&client, &url, true).await;
                    body["notFound"].as_array().is_some_and(|m| m.is_empty())
                        && body["presences"].as_array().is_some_and(|ps| {
                            ps.iter().all(|p| {
                                acked
                                    .get(p["userID"].as_str().unwrap_or(""))
                                    .map(String::as_str)
                                    == p["message"].as_str()
                            })
                        })
                },
            )
            .await;
        }
    }
    // The watches resumed: a new write at one leaf reaches the other.
    set(&client, &c.us, "after", "online", "after restart").await;
    wait_until(
        "eu to see a write made at us after the restart",
        READY_TIMEOUT,
        || async { get(&client, &c.eu, "after").await.1["message"] == "after restart" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leaf_that_was_cut_off_catches_up_on_what_it_missed() {
    let mut c = Cluster::start().await;
    let client = http();
    set(&client, &c.eu, "seen", "online", "v1").await;
    wait_until("us to see v1", READY_TIMEOUT, || async {
        get(&client, &c.us, "seen").await.1["message"] == "v1"
    })
    .await;

    c.us_nats.kill();
    for i in 0..25 {
        assert_eq!(
            set(&client, &c.eu, &format!("missed-{i}"), "away", "while away")
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        set(&client, &c.eu, "seen", "busy", "v2").await.status(),
        200
    );
    // Without its NATS server the us node is not ready, but it stays alive.
    wait_until("us to report not ready", READY_TIMEOUT, || async {
        matches!(client.get(c.us.url("/health/readiness")).send().await, Ok(r) if r.status() == 503)
    })
    .await;
    assert_eq!(
        client
            .get(c.us.url("/health/liveness"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    c.us_nats.restart().await;
    c.us.wait_ready().await;
    // The cached v1 is replaced by v2 through the resumed watch, not by a miss.
    wait_until("us to catch up on seen=v2", READY_TIMEOUT, || async {
        get(&client, &c.us, "seen").await.1["message"] == "v2"
    })
    .await;
    for i in 0..25 {
        let (status, body) = get(&client, &c.us, &format!("missed-{i}")).await;
        assert_eq!(
            (status, body["message"].as_str()),
            (200, Some("while away"))
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Nats::hub(dir.path()).await;
    let mut center = Service::start(
        dir.path(),
        ServiceSpec {
            extra_env: vec![("WRITE_TIMEOUT_MS", "3000".into())],
            ..ServiceSpec::new("center-1", "center", hub.url())
        },
    )
    .await;
    // With the hub gone a write waits out its whole write timeout, so it is
    // certainly in flight when SIGTERM arrives.
    hub.kill();
    let url = center.presence_url("slow");
    let in_flight = tokio::spawn(async move {
        http()
            .post(url)
            .header("Authorization", bearer("svc", "presence:write"))
            .json(&serde_json::json!({"status": "online"}))
            .send()
            .await
    });
    // Give the request time to be accepted (a readiness signal for "the
    // server has read this request" does not exist from outside).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = center.terminate();
        (status, center)
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0), "exit status {:?}", status.0);
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request got its answer");
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_timeout");
}

/// A drained pod leaves its Services' endpoints only as SIGTERM arrives,
/// and proxies learn of it seconds later: with `SHUTDOWN_DELAY_SECS` the
/// node fails readiness at once but still answers new connections, until
/// the delay ends or a second signal cuts it short.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_node_serves_on_not_ready_for_its_shutdown_delay() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Nats::hub(dir.path()).await;
    let mut center = Service::start(
        dir.path(),
        ServiceSpec {
            // Far longer than the test: only the second signal ends it.
            extra_env: vec![("SHUTDOWN_DELAY_SECS", "300".into())],
            ..ServiceSpec::new("center-1", "center", hub.url())
        },
    )
    .await;
    let client = http();
    assert_eq!(
        set(&client, &center, "ann", "busy", "before")
            .await
            .status(),
        200
    );

    center.signal_term();
    let readiness = center.url("/health/readiness");
    wait_until("readiness to fail", READY_TIMEOUT, || async {
        matches!(client.get(&readiness).send().await, Ok(r) if r.status() == 503)
    })
    .await;
    let body: Value = get_json(&client, &readiness, false).await;
    assert_eq!(body["status"], "not_ready", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("shutting down"),
        "{body}"
    );
    // New connections are still accepted and served, reads and writes.
    let fresh = http();
    let (status, presence) = get(&fresh, &center, "ann").await;
    assert_eq!(
        (status, presence["message"].as_str()),
        (200, Some("before"))
    );
    assert_eq!(
        set(&fresh, &center, "ann", "online", "during")
            .await
            .status(),
        200
    );
    let liveness = fresh
        .get(center.url("/health/liveness"))
        .send()
        .await
        .unwrap();
    assert_eq!(liveness.status(), 200, "stopping is not dead");

    let (status, log) = center.terminate_logged();
    assert_eq!(status.code(), Some(0), "exit status {status:?}\n{log}");
    assert!(log.contains("second signal"), "{log}");

    // Without a second signal the node stops when the delay ends.
    let mut brief = Service::start(
        dir.path(),
        ServiceSpec {
            extra_env: vec![("SHUTDOWN_DELAY_SECS", "1".into())],
            ..ServiceSpec::new("center-2", "center", hub.url())
        },
    )
    .await;
    brief.signal_term();
    let status = tokio::task::spawn_blocking(move || brief.wait_exit())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// At the center, "no responders" means the bucket's stream has no leader
/// for the moment (a hub election, the bucket being created again): a
/// write waits for one, within `WRITE_TIMEOUT_MS`, instead of failing at
/// once. (A leaf still fails at once: see the hub-kill test.)
#[tokio::test(flavor = "multi_thread")]
async fn a_center_write_waits_out_a_moment_without_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Nats::hub(dir.path()).await;
    let center = Service::start(
        dir.path(),
        ServiceSpec {
            extra_env: vec![("WRITE_TIMEOUT_MS", "10000".into())],
            ..ServiceSpec::new("center-1", "center", hub.url())
        },
    )
    .await;
    let nats = async_nats::connect(hub.url())
        .await
        .expect("connect to the hub");
    let js = async_nats::jetstream::with_domain(nats, "hub");
    js.delete_stream("KV_PRESENCE")
        .await
        .expect("delete the bucket");
    let url = center.presence_url("waited");
    let write = tokio::spawn(async move {
        http()
            .post(url)
            .header("Authorization", bearer("waited", ""))
            .json(&serde_json::json!({"status": "busy", "message": "kept"}))
            .send()
            .await
    });
    // Let the write meet the missing stream first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The bucket is back (the center would create it again by itself; it
    // may have already, which is as good).
    let _ = js
        .create_key_value(presence_contract::bucket::config("PRESENCE", 1))
        .await;
    let response = write.await.unwrap().expect("the write is answered");
    assert_eq!(response.status(), 200);
    // It is in the bucket: a node that starts now reads it from there.
    let fresh = Service::start(dir.path(), ServiceSpec::new("fresh", "center", hub.url())).await;
    let client = http();
    wait_until(
        "the fresh node to serve the write",
        READY_TIMEOUT,
        || async { get(&client, &fresh, "waited").await.1["message"] == "kept" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_that_lost_its_disk_gets_a_new_bucket_and_no_node_serves_stale_data() {
    let mut c = Cluster::start().await;
    let client = http();
    for i in 0..5 {
        assert_eq!(
            set(&client, &c.eu, &format!("old-{i}"), "busy", "before")
                .await
                .status(),
            200
        );
    }
    for svc in c.services() {
        wait_until("every node to cache old-4", READY_TIMEOUT, || async {
            get(&client, svc, "old-4").await.0 == 200
        })
        .await;
    }

    // An R1 hub restarted on an empty disk: the bucket and its data are gone.
    c.hub.kill();
    std::fs::remove_dir_all(c.dir.path().join("hub").join("js")).expect("wipe the hub's store");
    c.hub.restart().await;
    c.eu_nats.wait_for_hub_link().await;
    c.us_nats.wait_for_hub_link().await;

    // The center recreates the bucket by itself; writes work again.
    wait_until(
        "a write through the center",
        Duration::from_secs(30),
        || async {
            set(&client, &c.center, "new", "online", "after")
                .await
                .status()
                == 200
        },
    )
    .await;
    // Every node follows the new bucket: a fresh write shows everywhere, and
    // nothing cached from the lost bucket is served any more.
    for svc in c.services() {
        wait_until(
            &format!("{} on the new bucket", svc.node_id),
            Duration::from_secs(30),
            || async {
                get(&client, svc, "new").await.0 == 200 && get(&client, svc, "old-4").await.0 == 404
            },
        )
        .await;
    }
    // A user rewritten in the new bucket has a lower revision than the one
    // cached before the loss; it must still win everywhere.
    let response = set(&client, &c.us, "old-0", "online", "rewritten").await;
    assert_eq!(response.status(), 200);
    for svc in c.services() {
        wait_until(
            &format!("{} to see the rewrite", svc.node_id),
            READY_TIMEOUT,
            || async { get(&client, svc, "old-0").await.1["message"] == "rewritten" },
        )
        .await;
    }
}
