//! Benchmark-only bare servers, never shipped, on the same runtime setup
//! as presence-service:
//!
//! - the cached-read ceiling: the same JSON bytes a cached presence read
//!   returns, from a bare axum handler with no auth and no cache;
//! - with a NATS server named, the bare front: `POST` a presence and get
//!   one conditional KV put (expecting the key's last revision, as every
//!   write of the service does), acknowledged before the answer. It keeps
//!   only a map of the revisions it wrote, and does none of the service's
//!   auth, validation, cache, change feed or watch. What separates it from
//!   raw KV puts is mostly the HTTP hop (it also reads the body into a
//!   `serde_json::Value` and keeps a locked map), so the service's `POST`
//!   can be read against both. It is a plain implementation, not a lower
//!   bound. `POST /api/v2/presence/batch` does the same for every
//!   item's `userID`, all of the puts in flight at once, as the service's
//!   batch keeps them.
//!
//! Usage: `bare-server PORT [NATS_URL JS_DOMAIN BUCKET]`

use async_nats::jetstream::{self, kv};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const BODY: &[u8] = br#"{"userID":"bench-user","status":"online","message":"benchmarking","lastSeen":"2026-01-01T00:00:00.000Z","updatedAt":"2026-01-01T00:00:00.000Z","nodeID":"center-1","revision":1}"#;

/// What the bare front stores: the bytes raw KV puts store, so the nodes
/// watching the bucket treat both alike.
const STORED: &[u8] = br#"{"userID":"raw","status":"online","message":"benchmarking","lastSeen":"2026-01-01T00:00:00.000Z","updatedAt":"2026-01-01T00:00:00.000Z","nodeID":"raw"}"#;

/// Conditional puts refused because the key moved meanwhile, then retried
/// with the key's fresh revision, before giving up.
const ATTEMPTS: u32 = 5;

/// The bare front's state: the bucket and the last revision it wrote (or
/// read) per key.
#[derive(Clone)]
struct Front {
    kv: kv::Store,
    revisions: Arc<Mutex<HashMap<String, u64>>>,
}

impl Front {
    fn known(&self, key: &str) -> Option<u64> {
        self.revisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(key)
            .copied()
    }

    fn remember(&self, key: &str, revision: u64) {
        self.revisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(key.to_owned())
            .and_modify(|known| *known = (*known).max(revision))
            .or_insert(revision);
    }

    async fn current(&self, key: &str) -> Result<u64, String> {
        let entry = self.kv.entry(key).await.map_err(|e| e.to_string())?;
        Ok(entry.map_or(0, |entry| entry.revision))
    }

    /// One conditional put of `key`, retried with a fresh revision when
    /// another writer moved the key.
    /// A key it never wrote is taken for a new one (as the service's
    /// cache, a replica of the bucket, knows a new user without asking).
    async fn put(&self, key: &str) -> Result<u64, String> {
        let mut expected = self.known(key).unwrap_or(0);
        for _ in 0..ATTEMPTS {
            let value = Bytes::from_static(STORED);
            match self.kv.update(key, value, expected).await {
                Ok(revision) => {
                    self.remember(key, revision);
                    return Ok(revision);
                }
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    expected = self.current(key).await?;
                }
                Err(err) => return Err(err.to_string()),
            }
        }
        Err(format!("{key} kept moving"))
    }
}

/// `GET /api/v2/presence/{user_id}`: the read ceiling's fixed answer.
async fn read() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], BODY)
}

/// `POST /api/v2/presence/{user_id}`: the body must be JSON (it is not
/// otherwise read); the answer is the stored revision.
async fn write(State(front): State<Front>, Path(user_id): Path<String>, body: Bytes) -> Response {
    if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    }
    match front.put(&user_id).await {
        Ok(revision) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"revision":{revision}}}"#),
        )
            .into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

/// `POST /api/v2/presence/batch` (`{"presences": [{"userID": …}, …]}`):
/// one conditional put per item, all in flight at once; the answer counts
/// the stored ones and lists their revisions.
async fn write_batch(State(front): State<Front>, body: Bytes) -> Response {
    let Ok(batch) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let Some(items) = batch["presences"].as_array() else {
        return (StatusCode::BAD_REQUEST, "no presences").into_response();
    };
    let puts = items.iter().map(|item| {
        let front = front.clone();
        async move {
            match item["userID"].as_str() {
                Some(user_id) => front.put(user_id).await.ok(),
                None => None,
            }
        }
    });
    let revisions = futures::future::join_all(puts).await;
    let succeeded = revisions.iter().flatten().count();
    let listed: Vec<String> = revisions
        .iter()
        .map(|r| r.map_or_else(|| "null".to_owned(), |r| r.to_string()))
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(
            r#"{{"succeeded":{succeeded},"revisions":[{}]}}"#,
            listed.join(",")
        ),
    )
        .into_response()
}

async fn bare_front(args: &[String]) -> Result<Front, Box<dyn std::error::Error>> {
    let [url, domain, bucket] = args else {
        return Err("usage: bare-server PORT [NATS_URL JS_DOMAIN BUCKET]".into());
    };
    let client = async_nats::connect(url.as_str()).await?;
    let kv = jetstream::with_domain(client, domain.as_str())
        .get_key_value(bucket.as_str())
        .await?;
    Ok(Front {
        kv,
        revisions: Arc::default(),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port: u16 = args.first().and_then(|p| p.parse().ok()).unwrap_or(18090);
    let app = if args.len() > 1 {
        let front = bare_front(&args[1..]).await?;
        Router::new()
            .route("/api/v2/presence/batch", axum::routing::post(write_batch))
            .route("/api/v2/presence/{user_id}", get(read).post(write))
            .with_state(front)
    } else {
        Router::new().route("/api/v2/presence/{user_id}", get(read))
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
