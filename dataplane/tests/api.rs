//! HTTP-level tests of every endpoint and error, against a center
//! `presence-service` on a real `nats-server` hub.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

struct Single {
    _dir: tempfile::TempDir,
    _hub: Nats,
    svc: Service,
    client: reqwest::Client,
}

async fn single_with(env: Vec<(&'static str, String)>) -> Single {
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = Nats::hub(dir.path()).await;
    let svc = Service::start(
        dir.path(),
        ServiceSpec {
            node_id: "center-1",
            node_type: "center",
            nats_url: hub.url(),
            extra_env: env,
        },
    )
    .await;
    Single {
        _dir: dir,
        _hub: hub,
        svc,
        client: http(),
    }
}

async fn single() -> Single {
    single_with(vec![]).await
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("error bodies are JSON");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or("<none>")
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, code)
}

#[tokio::test(flavor = "multi_thread")]
async fn set_and_get_own_presence() {
    let s = single().await;
    let response = s
        .client
        .post(s.svc.presence_url("ann"))
        .header("Authorization", bearer("ann", ""))
        .json(&json!({"status": "away", "message": "In a meeting"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let written: Value = response.json().await.unwrap();
    assert_eq!(written["userID"], "ann");
    assert_eq!(written["status"], "away");
    assert_eq!(written["message"], "In a meeting");
    assert_eq!(written["nodeID"], "center-1");
    assert!(written["revision"].as_u64().unwrap() >= 1);
    for field in ["lastSeen", "updatedAt"] {
        let ts = written[field].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{field} = {ts}"
        );
        assert!(ts.ends_with('Z'), "UTC: {ts}");
    }
    let (status, read) = get(&s.client, &s.svc, "ann").await;
    assert_eq!(status, 200);
    assert_eq!(read, written);

    // Status is optional-message: message defaults to empty.
    let response = s
        .client
        .post(s.svc.presence_url("ann"))
        .header("Authorization", bearer("ann", ""))
        .header("Content-Type", "application/json")
        .body(r#"{"status":"online"}"#)
        .send()
        .await
        .unwrap();
    let second: Value = response.json().await.unwrap();
    assert_eq!(second["message"], "");
    assert!(second["revision"].as_u64() > written["revision"].as_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_status_value_round_trips_and_others_are_refused() {
    let s = single().await;
    for status in ["online", "away", "busy", "offline"] {
        let response = set(&s.client, &s.svc, "u1", status, "").await;
        assert_eq!(response.status(), 200, "{status}");
        assert_eq!(get(&s.client, &s.svc, "u1").await.1["status"], status);
    }
    for bad in [
        json!({"status": "ONLINE"}),
        json!({"status": "dnd"}),
        json!({}),
        json!({"status": 1}),
    ] {
        let response = s
            .client
            .post(s.svc.presence_url("u1"))
            .header("Authorization", bearer("u1", ""))
            .json(&bad)
            .send()
            .await
            .unwrap();
        let (status, code) = error_code(response).await;
        assert_eq!(status, 400, "{bad}");
        let expected = if bad["status"].is_number() {
            "invalid_json"
        } else {
            "invalid_status"
        };
        assert_eq!(code, expected, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn user_ids_with_any_characters_are_stored_and_kept_apart() {
    let s = single().await;
    let ids = [
        "ann@example.com",
        "ann+tag@example.com",
        "urn:user:42",
        "a.b",
        "a=2Eb",
        "dir/sub",
        "spaced name",
        "Zoë-日本",
        "100%",
    ];
    for (i, id) in ids.iter().enumerate() {
        let response = set(&s.client, &s.svc, id, "busy", &format!("m{i}")).await;
        assert_eq!(response.status(), 200, "{id}");
    }
    // A fresh node reads them from the bucket, not from the writer's cache.
    let other = Service::start(
        s._dir.path(),
        ServiceSpec::new("center-2", "center", s._hub.url()),
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        let (status, body) = get(&s.client, &other, id).await;
        assert_eq!(status, 200, "{id}");
        assert_eq!(body["userID"], *id);
        assert_eq!(body["message"], format!("m{i}"));
    }
    // `POST /api/v2/presence/batch` is the batch endpoint, so a user named
    // "batch" is set through it and still read with a plain GET.
    let response = s
        .client
        .post(s.svc.url("/api/v2/presence/batch"))
        .header("Authorization", bearer("svc", "presence:write"))
        .json(&json!({"presences": [{"userID": "batch", "status": "away"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(get(&s.client, &other, "batch").await.1["status"], "away");
    // Users named `batch` and `stream` hold sessions through the normal
    // session paths: no literal route shares them (the spec says so too).
    for id in ["batch", "stream"] {
        let url = s.svc.url(&format!("/api/v2/presence/{id}/sessions/tab"));
        let as_the_user = |request: reqwest::RequestBuilder| {
            request.header("Authorization", bearer(id, "")).send()
        };
        let response = as_the_user(s.client.put(&url)).await.unwrap();
        assert_eq!(response.status(), 200, "{id}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["userID"], id);
        assert_eq!(body["sessions"][0]["id"], "tab", "{id}");
        let response = as_the_user(s.client.delete(&url)).await.unwrap();
        assert_eq!(response.status(), 200, "{id}");
        // ...and clear a manual status through the literal path.
        let response = s
            .client
            .post(s.svc.url("/api/v2/presence/batch"))
            .header("Authorization", bearer("svc", "presence:write"))
            .json(&json!({"presences": [{"userID": id, "status": "busy"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let literal = s.svc.url(&format!("/api/v2/presence/{id}"));
        let response = as_the_user(s.client.delete(&literal)).await.unwrap();
        assert_eq!(response.status(), 200, "{id}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            (&body["userID"], &body["status"]),
            (&json!(id), &json!("offline"))
        );
        let response = s
            .client
            .delete(&literal)
            .header("Authorization", bearer("someone-else", ""))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(response).await, (403, "forbidden".into()));
    }
    let long = "x".repeat(256);
    assert_eq!(
        set(&s.client, &s.svc, &long, "online", "").await.status(),
        200
    );
    let response = set(&s.client, &s.svc, &"x".repeat(257), "online", "").await;
    assert_eq!(error_code(response).await, (400, "invalid_user_id".into()));
    let response = set(&s.client, &s.svc, "line\nbreak", "online", "").await;
    assert_eq!(error_code(response).await, (400, "invalid_user_id".into()));
    // Invalid UTF-8 in the path.
    let response = s
        .client
        .get(s.svc.url("/api/v2/presence/%FF%FE"))
        .header("Authorization", bearer("r", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (400, "invalid_user_id".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_user_is_404_even_when_asked_twice() {
    let s = single().await;
    for _ in 0..2 {
        let response = s
            .client
            .get(s.svc.presence_url("nobody"))
            .header("Authorization", bearer("r", ""))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (404, "presence_not_found".into())
        );
    }
    // A negative cache entry must not hide a later write.
    assert_eq!(
        set(&s.client, &s.svc, "nobody", "online", "")
            .await
            .status(),
        200
    );
    assert_eq!(get(&s.client, &s.svc, "nobody").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn message_limit_is_256_characters() {
    let s = single().await;
    let ok = "é".repeat(256);
    assert_eq!(
        set(&s.client, &s.svc, "m", "online", &ok).await.status(),
        200
    );
    let response = set(&s.client, &s.svc, "m", "online", &"é".repeat(257)).await;
    assert_eq!(error_code(response).await, (400, "message_too_long".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_bodies() {
    let s = single().await;
    let post = |body: Vec<u8>| {
        s.client
            .post(s.svc.presence_url("ann"))
            .header("Authorization", bearer("ann", ""))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    for body in [&b"{not json"[..], b"", b"[]", b"\"online\"", b"\xff\xfe"] {
        let (status, code) = error_code(post(body.to_vec()).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (400, "invalid_json"), "{body:?}");
    }
    let mut huge = br#"{"status":"online","message":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1024 * 1024 + 10));
    huge.extend(br#""}"#);
    // Each time, the whole body is written before the answer is read, as
    // most HTTP clients do: the 413 must arrive, not a connection closed
    // under the rest of the body (which failed here now and then).
    for _ in 0..20 {
        let (status, code) = error_code(post(huge.clone()).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    }
}

fn sign(claims: &Value, secret: &str, alg: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn far_future() -> u64 {
    4_000_000_000
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_attacks_are_refused() {
    let s = single().await;
    set(&s.client, &s.svc, "ann", "online", "").await;
    let b64 = |v: &Value| {
        use std::fmt::Write;
        // base64url without padding, written out to avoid another crate.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = write!(
                    out,
                    "{}",
                    char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize])
                );
            }
        }
        out
    };
    let claims = json!({"sub": "ann", "exp": far_future()});
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims)
    );
    let forged_hs512 = sign(&claims, SECRET, Algorithm::HS512);
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "missing_token"),
        ("basic auth", Some("Basic YW5uOnB3".into()), "invalid_token"),
        (
            "alg none",
            Some(format!("Bearer {alg_none}")),
            "invalid_token",
        ),
        (
            "HS512 with the right key",
            Some(format!("Bearer {forged_hs512}")),
            "invalid_token",
        ),
        (
            "wrong key",
            Some(format!(
                "Bearer {}",
                sign(&claims, "another-secret-0123456789", Algorithm::HS256)
            )),
            "invalid_token",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "ann", "exp": 1_000_000}),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "token_expired",
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                sign(&json!({"sub": "ann"}), SECRET, Algorithm::HS256)
            )),
            "invalid_token",
        ),
        (
            "no sub",
            Some(format!(
                "Bearer {}",
                sign(&json!({"exp": far_future()}), SECRET, Algorithm::HS256)
            )),
            "invalid_token",
        ),
        (
            "empty sub",
            Some(format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "", "exp": far_future()}),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "invalid_token",
        ),
        ("garbage", Some("Bearer a.b.c".into()), "invalid_token"),
    ];
    for (what, header, expected) in cases {
        for request in [
            s.client.get(s.svc.presence_url("ann")),
            s.client
                .post(s.svc.presence_url("ann"))
                .json(&json!({"status": "busy"})),
            s.client.get(s.svc.url("/api/v2/cache/metrics")),
        ] {
            let request = match &header {
                Some(h) => request.header("Authorization", h),
                None => request,
            };
            let response = request.send().await.unwrap();
            assert!(
                response.headers().contains_key("www-authenticate"),
                "{what}"
            );
            assert_eq!(
                error_code(response).await,
                (401, expected.to_owned()),
                "{what}"
            );
        }
    }
    // Nothing above changed ann's presence.
    assert_eq!(get(&s.client, &s.svc, "ann").await.1["status"], "online");
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_set_only_their_own_presence_unless_scoped() {
    let s = single().await;
    let post = |user: &str, auth: String| {
        s.client
            .post(s.svc.presence_url(user))
            .header("Authorization", auth)
            .json(&json!({"status": "busy"}))
            .send()
    };
    let response = post("bob", bearer("ann", "presence:read")).await.unwrap();
    assert_eq!(error_code(response).await, (403, "forbidden".into()));
    assert_eq!(get(&s.client, &s.svc, "bob").await.0, 404);
    assert_eq!(post("bob", bearer("bob", "")).await.unwrap().status(), 200);
    assert_eq!(
        post("carol", bearer("svc", "presence:write"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_get_lists_found_and_missing() {
    let s = single().await;
    for user in ["a", "b@x", "c"] {
        set(&s.client, &s.svc, user, "online", user).await;
    }
    let url = format!("{}?users=a,b%40x,zz,,a", s.svc.url("/api/v2/presence"));
    let response = s
        .client
        .get(&url)
        .header("Authorization", bearer("r", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let found: Vec<&str> = body["presences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["userID"].as_str().unwrap())
        .collect();
    assert_eq!(found, ["a", "b@x"]);
    assert_eq!(body["notFound"], json!(["zz"]));

    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    for (query, expected) in [
        (format!("users={}", many.join(",")), "too_many_users"),
        (String::new(), "missing_users"),
        ("users=".to_owned(), "missing_users"),
        // Not read as U+FFFD: that would look up a user nobody named.
        ("users=a,%FF".to_owned(), "invalid_query"),
        ("users=a&users=b".to_owned(), "invalid_query"),
    ] {
        let response = s
            .client
            .get(format!("{}?{query}", s.svc.url("/api/v2/presence")))
            .header("Authorization", bearer("r", ""))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(response).await, (400, expected.to_owned()));
    }
    let hundred = many[..100].join(",");
    let response = s
        .client
        .get(format!("{}?users={hundred}", s.svc.url("/api/v2/presence")))
        .header("Authorization", bearer("r", ""))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["notFound"].as_array().unwrap().len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_set_reports_each_item() {
    let s = single().await;
    let batch_url = s.svc.url("/api/v2/presence/batch");
    // A batch sent by a writer for anyone.
    let send = |body: Value| {
        s.client
            .post(&batch_url)
            .header("Authorization", bearer("svc", "presence:write"))
            .json(&body)
            .send()
    };
    let body = json!({"presences": [
        {"userID": "user1", "status": "online", "message": "Available"},
        {"userID": "user2", "status": "busy", "message": "Focus time"},
        {"userID": "user3", "status": "sleeping"},
        {"status": "online"},
        {"userID": "user1", "status": "away", "message": "later wins"},
    ]});
    let response = s
        .client
        .post(&batch_url)
        .header("Authorization", bearer("ann", ""))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (403, "forbidden".into()));

    let response = send(body).await.unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["succeeded"], 2);
    assert_eq!(result["failed"], 3);
    let items = result["results"].as_array().unwrap();
    let codes: Vec<&str> = items
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or("ok"))
        .collect();
    assert_eq!(
        codes,
        [
            "superseded",
            "ok",
            "invalid_status",
            "invalid_user_id",
            "ok"
        ]
    );
    assert_eq!(items[4]["presence"]["message"], "later wins");
    assert_eq!(get(&s.client, &s.svc, "user1").await.1["status"], "away");
    assert_eq!(get(&s.client, &s.svc, "user2").await.1["status"], "busy");
    assert_eq!(get(&s.client, &s.svc, "user3").await.0, 404);

    // An invalid later item replaces nothing: as if written one by one,
    // the user's last valid item stays. A malformed item fails alone.
    let body = json!({"presences": [
        {"userID": "dup", "status": "online", "message": "first"},
        {"userID": "dup", "status": "busy", "message": "last valid"},
        {"userID": "dup", "status": "asleep"},
        {"userID": "typed", "status": 1},
        5,
        {"userID": "fine", "status": "away"},
    ]});
    let response = send(body).await.unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    let outcome: Vec<(&str, &str)> = result["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["userID"].as_str().unwrap_or("?"),
                r["error"]["code"].as_str().unwrap_or("ok"),
            )
        })
        .collect();
    assert_eq!(
        outcome,
        [
            ("dup", "superseded"),
            ("dup", "ok"),
            ("dup", "invalid_status"),
            ("typed", "invalid_json"),
            ("", "invalid_json"),
            ("fine", "ok"),
        ]
    );
    let (status, dup) = get(&s.client, &s.svc, "dup").await;
    assert_eq!((status, dup["message"].as_str()), (200, Some("last valid")));
    assert_eq!(get(&s.client, &s.svc, "fine").await.0, 200);
    assert_eq!(get(&s.client, &s.svc, "typed").await.0, 404);

    // 1000 items are written; 1001 are refused whole.
    let thousand: Vec<Value> = (0..1000)
        .map(|i| json!({"userID": format!("bulk-{i}"), "status": "online"}))
        .collect();
    let response = send(json!({"presences": thousand})).await.unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["succeeded"], 1000);
    assert_eq!(get(&s.client, &s.svc, "bulk-999").await.0, 200);
    let mut too_many = thousand.clone();
    too_many.push(json!({"userID": "one-more", "status": "online"}));
    let response = send(json!({"presences": too_many})).await.unwrap();
    assert_eq!(error_code(response).await, (413, "batch_too_large".into()));
    for bad in [json!({}), json!({"presences": "x"}), json!([1])] {
        let response = send(bad.clone()).await.unwrap();
        assert_eq!(
            error_code(response).await,
            (400, "invalid_json".into()),
            "{bad}"
        );
    }
}

/// A node that starts on a filled bucket says it is ready only once its
/// watch has replayed the bucket into its cache: before, each read of a
/// user not yet replayed would go to the hub (a rolling restart would send
/// clients to a node at a fraction of its speed).
#[tokio::test(flavor = "multi_thread")]
async fn a_starting_node_is_ready_once_its_cache_holds_the_bucket() {
    let s = single().await;
    const USERS: usize = 20_000;
    for first in (0..USERS).step_by(1000) {
        let presences: Vec<Value> = (first..first + 1000)
            .map(|i| json!({"userID": format!("warm-{i}"), "status": "away"}))
            .collect();
        let response = s
            .client
            .post(s.svc.url("/api/v2/presence/batch"))
            .header("Authorization", bearer("svc", "presence:write"))
            .json(&json!({ "presences": presences }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let fresh = Service::start(
        s._dir.path(),
        ServiceSpec::new("center-2", "center", s._hub.url()),
    )
    .await;
    // The first time it says ready, it holds every user.
    let health: Value = get_json(&s.client, &fresh.url("/health"), false).await;
    let entries = health["cache"]["entries"].as_u64().unwrap_or(0);
    assert!(entries >= USERS as u64, "ready with {entries} cached");
    assert_eq!(health["watch"]["warmedUp"], true);
    let replayed = health["watch"]["replayedEntries"].as_u64().unwrap_or(0);
    assert!(replayed >= USERS as u64, "{replayed} replayed");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_metrics_and_unknown_routes() {
    let s = single().await;
    set(&s.client, &s.svc, "ann", "online", "").await;
    get(&s.client, &s.svc, "ann").await;
    get(&s.client, &s.svc, "nobody").await;
    let live = s
        .client
        .get(s.svc.url("/health/liveness"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let ready = s
        .client
        .get(s.svc.url("/health/readiness"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let health_url = s.svc.url("/health");
    wait_until("the watch to apply the write", READY_TIMEOUT, || async {
        let health: Value = get_json(&s.client, &health_url, false).await;
        health["watch"]["appliedRevision"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let health: Value = get_json(&s.client, &health_url, false).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["nats"]["connected"], true);
    assert_eq!(health["kv"]["reachable"], true);
    assert_eq!(health["nodeType"], "center");
    assert!(health["watch"]["appliedRevision"].as_u64().unwrap() >= 1);
    assert_eq!(health["watch"]["replaying"], false);
    assert_eq!(health["watch"]["warmedUp"], true);
    assert!(health["cache"]["entries"].as_u64().unwrap() >= 1);

    let response = s
        .client
        .get(s.svc.url("/api/v2/cache/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let stats: Value = get_json(&s.client, &s.svc.url("/api/v2/cache/metrics"), true).await;
    for key in [
        "hits",
        "misses",
        "keys_added",
        "keys_evicted",
        "cost_added",
        "cost_evicted",
        "entries",
        "hit_ratio",
    ] {
        assert!(stats[key].is_number(), "{key} in {stats}");
    }
    assert!(stats["hits"].as_u64().unwrap() >= 1);
    assert!(stats["misses"].as_u64().unwrap() >= 1);

    let text = s
        .client
        .get(s.svc.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "presence_http_requests_total{method=\"POST\",route=\"/api/v2/presence/{user_id}\",status=\"200\"}",
        "presence_http_request_duration_seconds_bucket",
        "presence_cache_hits_total",
        "presence_cache_misses_total",
        "presence_kv_operation_duration_seconds_bucket{op=\"put\",outcome=\"ok\"",
        "presence_watch_lag_seconds_bucket",
        "presence_watch_applied_revision",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }

    let response = s
        .client
        .get(s.svc.url("/api/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (404, "route_not_found".into()));
    let response = s
        .client
        .put(s.svc.presence_url("ann"))
        .header("Authorization", bearer("ann", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (405, "method_not_allowed".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_follows_the_go_variables() {
    let s = single().await;
    let preflight = s
        .client
        .request(reqwest::Method::OPTIONS, s.svc.presence_url("ann"))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-max-age"], "600");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );

    let strict = single_with(vec![
        ("CORS_ALLOWED_ORIGINS", "https://app.example.com".into()),
        ("CORS_ALLOW_CREDENTIALS", "true".into()),
        ("CORS_MAX_AGE", "60".into()),
    ])
    .await;
    let allowed = strict
        .client
        .get(strict.svc.url("/health"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let denied = strict
        .client
        .get(strict.svc.url("/health"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!denied.headers().contains_key("access-control-allow-origin"));
    // No Origin: not a browser's cross-origin request, so no CORS headers,
    // but the answer still tells caches it depends on Origin.
    let server_to_server = strict
        .client
        .get(strict.svc.url("/health"))
        .send()
        .await
        .unwrap();
    let h = server_to_server.headers();
    assert!(!h.contains_key("access-control-allow-origin"));
    assert!(!h.contains_key("access-control-expose-headers"));
    assert_eq!(h["vary"], "origin");

    let anonymous = s.client.get(s.svc.url("/health")).send().await.unwrap();
    let h = anonymous.headers();
    assert!(!h.contains_key("access-control-allow-origin"));
    assert_eq!(h["vary"], "origin", "any origin: still varies on Origin");

    let off = single_with(vec![("CORS_ENABLED", "false".into())]).await;
    let response = off
        .client
        .get(off.svc.url("/health"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

fn run_binary(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_presence-service"));
    command.env_clear().args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run presence-service")
}

#[test]
fn bad_config_is_one_clear_line_and_exit_code_2() {
    for (env, needle) in [
        (vec![], "JWT_SECRET is required"),
        (
            vec![("JWT_SECRET", SECRET), ("NODE_TYPE", "hub")],
            "NODE_TYPE is invalid: 'hub' is not one of center, leaf",
        ),
        (
            vec![("JWT_SECRET", SECRET), ("SERVICE_PORT", "http")],
            "SERVICE_PORT is invalid",
        ),
        (
            vec![("JWT_SECRET", SECRET), ("SERVICE_PORT", "70000")],
            "SERVICE_PORT is invalid: '70000': 70000 is not in 1..=65535",
        ),
        (
            vec![("JWT_SECRET", SECRET), ("CACHE_NUM_COUNTERS", "1e7")],
            "CACHE_NUM_COUNTERS is invalid",
        ),
        (
            vec![("JWT_SECRET", SECRET), ("LOG_LEVEL", "chatty")],
            "LOG_LEVEL",
        ),
        (
            vec![("JWT_SECRET", SECRET), ("CORS_ALLOW_CREDENTIALS", "true")],
            "CORS_ALLOWED_ORIGINS",
        ),
    ] {
        let output = run_binary(&env, &[]);
        assert_eq!(output.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{env:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("presence-service: configuration error: "),
            "{stderr}"
        );
    }
}

#[test]
fn help_documents_every_variable() {
    let output = run_binary(&[], &["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for var in [
        "NODE_TYPE",
        "NODE_ID",
        "SERVICE_PORT",
        "JWT_SECRET",
        "CACHE_MAX_COST",
        "CACHE_NUM_COUNTERS",
        "LOG_LEVEL",
        "CORS_ENABLED",
        "CORS_ALLOWED_ORIGINS",
        "CORS_ALLOWED_METHODS",
        "CORS_ALLOWED_HEADERS",
        "CORS_ALLOW_CREDENTIALS",
        "CORS_MAX_AGE",
        "NATS_URL",
        "NATS_JS_DOMAIN",
        "KV_BUCKET",
        "NATS_CREDS",
    ] {
        assert!(help.contains(var), "--help lacks {var}");
    }
}

#[test]
fn token_subcommand_signs_a_usable_token() {
    let output = run_binary(
        &[("JWT_SECRET", SECRET)],
        &["token", "--sub", "svc", "--scope", "presence:write"],
    );
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let verifier = presence_dataplane::auth::Verifier::new(SECRET, None, None);
    let caller = verifier.verify(token.trim()).unwrap();
    assert_eq!(&*caller.user_id, "svc");
    assert!(caller.can_write_any);
    // A secret the service refuses signs nothing: no node would accept it.
    let output = run_binary(&[("JWT_SECRET", "your-secret-key")], &["token"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 16 bytes"), "{stderr}");
}

/// The token a node's settings print is one that node accepts: with their
/// issuer and audience, within their longest lifetime.
#[test]
fn token_subcommand_follows_the_nodes_token_rules() {
    let node = [
        ("JWT_SECRET", SECRET),
        ("JWT_ISSUER", "https://idp.example"),
        ("JWT_AUDIENCE", "presence"),
        ("JWT_MAX_LIFETIME", "600"),
    ];
    let output = run_binary(&node, &["token", "--sub", "ann"]);
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap();
    let verifier = presence_dataplane::auth::Verifier::new(
        SECRET,
        Some("https://idp.example"),
        Some("presence"),
    )
    .with_max_lifetime(Some(600));
    let caller = verifier.verify(token.trim()).unwrap();
    assert_eq!(&*caller.user_id, "ann");
    for (args, needle) in [
        (
            &["token", "--ttl-secs", "601"][..],
            "longer than JWT_MAX_LIFETIME (600 s)",
        ),
        (&["token", "--sub", ""][..], "--sub is empty"),
        (&["token", "--sub", "  "][..], "--sub is empty"),
    ] {
        let output = run_binary(&node, args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // A lifetime limit the node refuses mints nothing (not an expired token).
    let output = run_binary(
        &[("JWT_SECRET", SECRET), ("JWT_MAX_LIFETIME", "0")],
        &["token"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWT_MAX_LIFETIME"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_cleanly_with_exit_0() {
    // A keep-alive longer than the grace period: only the stop itself can
    // close the idle connection in time.
    let mut s = single_with(vec![
        ("HTTP_HEADER_READ_TIMEOUT_SECS", "120".into()),
        ("HTTP_KEEPALIVE_TIMEOUT_SECS", "120".into()),
        ("SHUTDOWN_TIMEOUT_SECS", "3".into()),
    ])
    .await;
    // The client keeps its connection open, idle, after this answer: the
    // stop closes it at once instead of waiting out the grace period.
    set(&s.client, &s.svc, "ann", "online", "").await;
    let (status, log) = s.svc.terminate_logged();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("did not finish in time"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_beyond_the_per_user_limit_get_429_with_retry_after() {
    let s = single_with(vec![
        ("RATE_LIMIT_WRITES_PER_SECOND", "1".into()),
        ("RATE_LIMIT_BURST", "3".into()),
    ])
    .await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let response = set(&s.client, &s.svc, "flood", "online", "").await;
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").cloned();
            let (_, code) = error_code(response).await;
            assert_eq!(code, "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    assert_eq!(&statuses[..3], [200, 200, 200], "the burst is allowed");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    let seconds: u64 = retry_after
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&seconds), "{seconds}");
    // Other users are not affected, and neither are reads.
    assert_eq!(
        set(&s.client, &s.svc, "calm", "online", "").await.status(),
        200
    );
    assert_eq!(get(&s.client, &s.svc, "flood").await.0, 200);
    // In a batch, the limited user's item fails alone.
    let response = s
        .client
        .post(s.svc.url("/api/v2/presence/batch"))
        .header("Authorization", bearer("svc", "presence:write"))
        .json(&json!({"presences": [{"userID": "flood", "status": "busy"}, {"userID": "other", "status": "busy"}]}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"][0]["error"]["code"], "rate_limited");
    assert_eq!(body["results"][1]["ok"], true);
}

/// Browsers' `EventSource` can't send headers: the stream (and only the
/// stream) takes the token as `access_token`, which no log line shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_browser_opens_the_stream_with_the_token_in_the_url() {
    let s = single_with(vec![("LOG_LEVEL", "debug".into())]).await;
    let writer = token("ann", "");
    let reader = token("watcher", "");
    let url = s.svc.url(&format!(
        "/api/v2/presence/stream?users=ann&access_token={reader}"
    ));
    let mut stream = EventStream::open_without_header(&s.client, &url).await;
    stream.until_snapshot_end().await;
    let response = s
        .client
        .post(s.svc.presence_url("ann"))
        .bearer_auth(&writer)
        .json(&json!({"status": "busy", "message": "in a call"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let event = stream.next().await;
    assert_eq!(event.event, "presence");
    assert_eq!(event.data["message"], "in a call", "{}", event.data);

    // Any other route ignores a token in the URL.
    let response = s
        .client
        .get(format!(
            "{}?access_token={reader}",
            s.svc.presence_url("ann")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (401, "missing_token".into()));
    // Both ways at once is ambiguous (RFC 6750: one method per request).
    let response = s
        .client
        .get(&url)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (400, "multiple_tokens".into()));
    // An escape that is no UTF-8 names no user (nor token) the client sent.
    for query in [
        format!("users=ann,%FF&access_token={reader}"),
        format!("users=ann&access_token=%FF{reader}"),
    ] {
        let response = s
            .client
            .get(s.svc.url(&format!("/api/v2/presence/stream?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(response).await, (400, "invalid_query".into()));
    }
    for bad in ["", "not-a-jwt"] {
        let response = s
            .client
            .get(
                s.svc
                    .url(&format!("/api/v2/presence/stream?access_token={bad}")),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(response).await, (401, "invalid_token".into()));
    }
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "watcher", "exp": 1_000_000_000u64}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let response = s
        .client
        .get(
            s.svc
                .url(&format!("/api/v2/presence/stream?access_token={expired}")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (401, "token_expired".into()));

    drop(stream);
    let log = s.svc.log();
    assert!(
        log.contains("access_token=REDACTED"),
        "the access log names the request:\n{log}"
    );
    for secret in [&reader, &expired] {
        let signature = secret.rsplit('.').next().unwrap_or_default();
        assert!(!log.contains(signature), "a token reached the log:\n{log}");
    }
    let metrics = s.client.get(s.svc.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(!metrics.contains(reader.rsplit('.').next().unwrap_or_default()));
    // The one live change reached the one stream: one lag observation (the
    // opening snapshot is not a live change).
    assert!(
        metrics
            .lines()
            .any(|l| l == "presence_stream_event_lag_seconds_count 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_lets_a_browser_resume_and_read_retry_after() {
    let s = single().await;
    let preflight = s
        .client
        .request(
            reqwest::Method::OPTIONS,
            s.svc.url("/api/v2/presence/stream"),
        )
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("last-event-id"), "{allowed}");
    let response = s
        .client
        .get(s.svc.presence_url("ann"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");
}
