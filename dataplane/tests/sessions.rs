//! Heartbeat sessions, the effective-status fold and the change stream,
//! against a real hub and two leaves.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

fn session_url(service: &Service, user: &str, session: &str) -> String {
    service.url(&format!(
        "/api/v2/presence/{}/sessions/{}",
        encode_path(user),
        encode_path(session)
    ))
}

/// A bodiless heartbeat for `user`'s session `s`, sent as `caller`.
async fn bare_heartbeat(
    client: &reqwest::Client,
    service: &Service,
    user: &str,
    caller: &str,
) -> reqwest::Response {
    client
        .put(session_url(service, user, "s"))
        .header("Authorization", bearer(caller, ""))
        .send()
        .await
        .expect("request completes")
}

/// A heartbeat sent by the user itself: (status code, body).
async fn heartbeat(
    client: &reqwest::Client,
    service: &Service,
    user: &str,
    session: &str,
    body: Value,
) -> (u16, Value) {
    let response = client
        .put(session_url(service, user, session))
        .header("Authorization", bearer(user, ""))
        .json(&body)
        .send()
        .await
        .expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn end_session(
    client: &reqwest::Client,
    service: &Service,
    user: &str,
    session: &str,
) -> (u16, Value) {
    let response = client
        .delete(session_url(service, user, session))
        .header("Authorization", bearer(user, ""))
        .send()
        .await
        .expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn wait_for_status(client: &reqwest::Client, service: &Service, user: &str, status: &str) {
    wait_until(
        &format!("{user} to be {status} at {}", service.node_id),
        Duration::from_secs(30),
        || async { get(client, service, user).await.1["status"] == status },
    )
    .await;
}

fn rfc3339(value: &Value) -> time::OffsetDateTime {
    let text = value.as_str().unwrap_or_default();
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{value} is not RFC 3339: {e}"))
}

fn stream_url(service: &Service, users: &[&str]) -> String {
    service.url(&format!(
        "/api/v2/presence/stream?users={}",
        users.join(",")
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_expires_after_its_heartbeats_stop_even_when_its_node_is_gone() {
    let mut c = Cluster::start().await;
    let client = http();
    let mut stream = EventStream::open(&client, &stream_url(&c.us, &["ann"]), None).await;
    let opening = stream.until_snapshot_end().await;
    assert_eq!(opening[0].data["status"], "offline");
    assert_eq!(opening[0].data["lastSeen"], Value::Null);

    let mut last = Value::Null;
    for _ in 0..3 {
        let body = json!({"status": "online", "device": "phone", "ttlSeconds": 5});
        let (status, view) = heartbeat(&client, &c.eu, "ann", "phone-1", body).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["status"], "online");
        last = view;
    }
    let last_heartbeat = last["sessions"][0]["lastSeen"].clone();
    assert_eq!(last["lastSeen"], last_heartbeat);
    assert_eq!(last["sessions"][0]["device"], "phone");
    assert_eq!(last["sessions"][0]["id"], "phone-1");

    let online = stream.next().await;
    assert_eq!(
        (online.event.as_str(), &online.data["status"]),
        ("presence", &json!("online"))
    );

    // The node that took the heartbeats dies; the bucket still expires them.
    c.eu.kill();
    let offline = stream.next().await;
    assert_eq!(offline.data["status"], "offline", "{:?}", offline.data);
    assert_eq!(offline.data["sessions"], json!([]));
    assert_eq!(offline.data["lastSeen"], last_heartbeat);
    assert!(offline.id > online.id);

    for service in [&c.us, &c.center] {
        let (code, view) = get(&client, service, "ann").await;
        assert_eq!(code, 200);
        assert_eq!(view["status"], "offline");
        assert_eq!(view["lastSeen"], last_heartbeat, "at {}", service.node_id);
    }
    // A fresh node (empty cache, full replay) knows only the durable
    // key, written by the first heartbeat: at most one lease (5 s) early.
    let replacement = c.start_eu_node("eu-2").await;
    let (_, view) = get(&client, &replacement, "ann").await;
    assert_eq!(view["status"], "offline");
    let (fresh, exact) = (rfc3339(&view["lastSeen"]), rfc3339(&last_heartbeat));
    assert!(
        fresh <= exact && exact - fresh <= time::Duration::seconds(5),
        "{fresh} vs {exact}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_fold_into_one_status_and_a_manual_status_expires() {
    let c = Cluster::start().await;
    let client = http();
    let phone = json!({"status": "away", "device": "phone", "ttlSeconds": 300});
    let laptop = json!({"status": "online", "device": "laptop", "ttlSeconds": 300});
    assert_eq!(
        heartbeat(&client, &c.us, "bob", "phone", phone).await.0,
        200
    );
    let (_, view) = heartbeat(&client, &c.eu, "bob", "laptop", laptop).await;
    assert_eq!(view["status"], "online");
    assert_eq!(view["sessions"].as_array().map(Vec::len), Some(2));

    // Ending the online device leaves the away one.
    let (code, view) = end_session(&client, &c.center, "bob", "laptop").await;
    assert_eq!((code, &view["status"]), (200, &json!("away")), "{view}");
    wait_for_status(&client, &c.us, "bob", "away").await;
    let (code, err) = end_session(&client, &c.center, "bob", "laptop").await;
    assert_eq!(
        (code, &err["error"]["code"]),
        (404, &json!("session_not_found"))
    );

    // A manual busy wins while it lasts, then the sessions decide again.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let expires = expires
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let response = client
        .post(c.eu.presence_url("bob"))
        .header("Authorization", bearer("bob", ""))
        .json(&json!({"status": "busy", "message": "focus", "expiresAt": expires}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(
        (&view["status"], &view["message"]),
        (&json!("busy"), &json!("focus"))
    );
    assert!(view["expiresAt"].is_string(), "{view}");
    wait_for_status(&client, &c.us, "bob", "busy").await;
    wait_for_status(&client, &c.us, "bob", "away").await;
    let (_, view) = get(&client, &c.center, "bob").await;
    assert_eq!(
        (&view["status"], &view["message"]),
        (&json!("away"), &json!(""))
    );
    assert!(view.get("expiresAt").is_none(), "{view}");
}

/// `DELETE` of a presence clears its manual status: the sessions decide
/// again at every node, `lastSeen` stays, and a Go-style user (no
/// sessions) is offline.
#[tokio::test(flavor = "multi_thread")]
async fn clearing_a_manual_status_hands_the_status_back_to_the_sessions() {
    let c = Cluster::start().await;
    let client = http();
    let session = json!({"status": "away", "device": "phone", "ttlSeconds": 300});
    assert_eq!(
        heartbeat(&client, &c.us, "cid", "phone", session).await.0,
        200
    );
    let clear = |service: &Service, user: &str, caller: &str| {
        client
            .delete(service.presence_url(user))
            .header("Authorization", bearer(caller, ""))
            .send()
    };
    // Nothing to clear yet: nothing changes.
    let response = clear(&c.eu, "cid", "cid").await.unwrap();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "away");
    let set = client
        .post(c.eu.presence_url("cid"))
        .header("Authorization", bearer("cid", ""))
        .json(&json!({"status": "busy", "message": "focus"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    wait_for_status(&client, &c.us, "cid", "busy").await;
    // Only the user, or a writer for anyone, may clear it.
    let response = clear(&c.eu, "cid", "someone-else").await.unwrap();
    assert_eq!(response.status(), 403);
    let response = clear(&c.eu, "cid", "cid").await.unwrap();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(
        (&view["status"], &view["message"]),
        (&json!("away"), &json!(""))
    );
    assert!(view.get("expiresAt").is_none(), "{view}");
    wait_for_status(&client, &c.us, "cid", "away").await;

    // A user with a manual status only goes offline, seen when it was set.
    let set = client
        .post(c.center.presence_url("dee"))
        .header("Authorization", bearer("dee", ""))
        .json(&json!({"status": "online"}))
        .send()
        .await
        .unwrap();
    let set: Value = set.json().await.unwrap();
    let response = clear(&c.center, "dee", "dee").await.unwrap();
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "offline");
    assert_eq!(view["lastSeen"], set["lastSeen"]);
    wait_for_status(&client, &c.eu, "dee", "offline").await;
    // A fresh node, with only the bucket to go by, says the same.
    let fresh = c.start_eu_node("eu-2").await;
    let (_, view) = get(&client, &fresh, "dee").await;
    assert_eq!(
        (&view["status"], &view["lastSeen"]),
        (&json!("offline"), &set["lastSeen"])
    );
    // A user the bucket never heard of.
    let response = clear(&c.eu, "nobody", "nobody").await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn session_requests_are_checked() {
    let c = Cluster::start().await;
    let client = http();
    let cases = [
        (json!({"ttlSeconds": 2}), "invalid_ttl"),
        (json!({"ttlSeconds": 301}), "invalid_ttl"),
        (json!({"status": "busy"}), "invalid_status"),
        (json!({"device": "d".repeat(200)}), "device_too_long"),
    ];
    for (body, code) in cases {
        let (status, err) = heartbeat(&client, &c.center, "dan", "s", body).await;
        assert_eq!((status, &err["error"]["code"]), (400, &json!(code)));
    }
    // Someone else's session needs scope presence:write.
    let response = bare_heartbeat(&client, &c.center, "dan", "eve").await;
    assert_eq!(response.status(), 403);
    // No body at all is a default heartbeat: online for 30 s.
    let response = bare_heartbeat(&client, &c.center, "dan", "dan").await;
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "online");
    // A flood of heartbeats is throttled like any write.
    let mut limited = None;
    for _ in 0..40 {
        let response = bare_heartbeat(&client, &c.center, "dan", "dan").await;
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("a flood of heartbeats is throttled");
    assert!(limited.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_at_one_leaf_sees_another_leaf_and_resumes_exactly() {
    let c = Cluster::start().await;
    let client = http();
    set(&client, &c.center, "a", "online", "before").await;
    // The snapshot is us's view: let the center's write reach it first.
    wait_for_status(&client, &c.us, "a", "online").await;
    let url = stream_url(&c.us, &["a", "b", "c"]);
    let mut stream = EventStream::open(&client, &url, None).await;
    let opening = stream.until_snapshot_end().await;
    let users: Vec<&Value> = opening[..3].iter().map(|e| &e.data["userID"]).collect();
    assert_eq!(users, [&json!("a"), &json!("b"), &json!("c")]);
    assert_eq!(opening[0].data["message"], "before");
    let snapshot_end = opening[3].id.expect("snapshot-end has an id");

    set(&client, &c.eu, "a", "busy", "from eu").await;
    let change = stream.next().await;
    assert_eq!(
        (&change.data["userID"], &change.data["status"]),
        (&json!("a"), &json!("busy"))
    );
    let last_seen_id = change.id.expect("live events have ids");
    assert!(last_seen_id > snapshot_end);
    drop(stream);

    // Missed while disconnected: b changes twice, c once, a not at all;
    // a heartbeat that only moves c's lastSeen is no change to show.
    set(&client, &c.eu, "b", "away", "missed 1").await;
    let body = json!({"status": "online", "ttlSeconds": 60});
    assert_eq!(
        heartbeat(&client, &c.center, "c", "tab", body.clone())
            .await
            .0,
        200
    );
    assert_eq!(heartbeat(&client, &c.center, "c", "tab", body).await.0, 200);
    set(&client, &c.us, "b", "busy", "missed 2").await;

    let mut resumed = EventStream::open(&client, &url, Some(last_seen_id)).await;
    let catch_up = resumed.until_snapshot_end().await;
    let got: Vec<(&str, &Value)> = catch_up
        .iter()
        .map(|e| (e.event.as_str(), &e.data["userID"]))
        .collect();
    assert_eq!(
        got,
        [
            ("presence", &json!("b")),
            ("presence", &json!("c")),
            ("presence", &json!("b")),
            ("snapshot-end", &Value::Null)
        ]
    );
    assert_eq!(catch_up[0].data["message"], "missed 1");
    assert_eq!(catch_up[1].data["status"], "online");
    assert_eq!(catch_up[2].data["message"], "missed 2");
    let ids: Vec<u64> = catch_up.iter().filter_map(|e| e.id).collect();
    // Event IDs grow; the end of the catch-up covers the last of them.
    assert!(ids[..3].windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(ids[3] >= ids[2], "{ids:?}");
    assert!(ids[0] > last_seen_id);

    // Resuming from the middle of that catch-up sends the rest of it.
    let mut middle = EventStream::open(&client, &url, catch_up[1].id).await;
    let rest = middle.until_snapshot_end().await;
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[0].data["message"], "missed 2");
    drop(middle);

    // Resuming from the end of that catch-up sends nothing old.
    let end = catch_up[3].id.expect("id");
    let mut again = EventStream::open(&client, &url, Some(end)).await;
    let nothing_new = again.until_snapshot_end().await;
    assert_eq!(nothing_new.len(), 1, "{nothing_new:?}");
    set(&client, &c.eu, "c", "busy", "live again").await;
    let live = again.next().await;
    assert_eq!(
        (&live.data["userID"], &live.data["status"]),
        (&json!("c"), &json!("busy"))
    );
    let live = resumed.next().await;
    assert_eq!(live.data["message"], "live again");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_are_capped_per_node_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(
        dir.path(),
        ServiceSpec {
            node_id: "solo",
            node_type: "center",
            nats_url: "nats://127.0.0.1:1".into(),
            extra_env: vec![
                ("STORE", "memory".into()),
                ("STREAM_MAX_CONNECTIONS", "1".into()),
            ],
        },
    )
    .await;
    let client = http();
    let url = stream_url(&service, &["x"]);
    let mut first = EventStream::open(&client, &url, None).await;
    first.until_snapshot_end().await;
    let refused = client
        .get(&url)
        .header("Authorization", bearer("r", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");
    drop(first);
    // The place is given back once the client is gone.
    wait_until(
        "the stream's place to be released",
        Duration::from_secs(10),
        || async {
            client
                .get(&url)
                .header("Authorization", bearer("r", ""))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let response = client
        .get(service.url(&format!(
            "/api/v2/presence/stream?users={}",
            too_many.join(",")
        )))
        .header("Authorization", bearer("r", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = client
        .get(&url)
        .header("Authorization", bearer("r", ""))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_cache_evicts_reads_whole_users_from_the_bucket() {
    let c = Cluster::start().await;
    let client = http();
    for i in 0..40 {
        set(&client, &c.center, &format!("filler-{i}"), "away", "x").await;
    }
    let laptop = json!({"status": "away", "device": "laptop", "ttlSeconds": 300});
    let phone = json!({"status": "online", "device": "phone", "ttlSeconds": 300});
    assert_eq!(
        heartbeat(&client, &c.center, "zoe", "laptop", laptop)
            .await
            .0,
        200
    );
    assert_eq!(
        heartbeat(&client, &c.center, "zoe", "phone", phone).await.0,
        200
    );
    assert_eq!(end_session(&client, &c.center, "zoe", "phone").await.0, 200);
    // A leaf node (on the leaf with its own JetStream domain) whose cache
    // holds a handful of users: it can't be a full replica, so reads load
    // each user's keys from the hub's bucket.
    let small = Service::start(
        c.dir.path(),
        ServiceSpec {
            node_id: "us-small",
            node_type: "leaf",
            nats_url: c.us_nats.url(),
            extra_env: vec![("CACHE_MAX_COST", "2048".into())],
        },
    )
    .await;
    let expected = get(&client, &c.center, "zoe").await.1;
    assert_eq!(expected["sessions"].as_array().map(Vec::len), Some(1));
    for _ in 0..2 {
        for i in 0..40 {
            let (code, view) = get(&client, &small, &format!("filler-{i}")).await;
            assert_eq!((code, &view["message"]), (200, &json!("x")));
        }
        let (code, view) = get(&client, &small, "zoe").await;
        assert_eq!(code, 200);
        assert_eq!(view, expected);
        assert_eq!(get(&client, &small, "nobody").await.0, 404);
    }
    let stats = get_json(&client, &small.url("/api/v2/cache/metrics"), true).await;
    assert!(stats["keys_evicted"].as_u64() > Some(0), "{stats}");
    // Changes still reach it.
    let body = json!({"status": "online", "device": "tablet", "ttlSeconds": 300});
    heartbeat(&client, &c.eu, "zoe", "tablet", body).await;
    wait_for_status(&client, &small, "zoe", "online").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_a_node_closes_its_streams_instead_of_waiting_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Nats::hub(dir.path()).await;
    let mut center = Service::start(
        dir.path(),
        ServiceSpec::new("center-1", "center", hub.url()),
    )
    .await;
    let client = http();
    let mut stream = EventStream::open(&client, &stream_url(&center, &["a"]), None).await;
    stream.until_snapshot_end().await;
    let status = tokio::task::spawn_blocking(move || center.terminate())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(stream.ended().await, "the stream is closed by the server");
    let log = std::fs::read_to_string(dir.path().join("center-1.log")).unwrap_or_default();
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("did not finish in time"), "{log}");
}
