//! Health endpoints: liveness (the process answers), readiness (the node can
//! serve reads), and `/health` with the detail an operator needs to debug.

use crate::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

/// `GET /health/liveness`: the process is up and its HTTP loop runs.
pub async fn liveness() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

fn readiness_problem(state: &AppState) -> Option<&'static str> {
    let c = state.service.store().connectivity();
    if !c.connected {
        Some("not connected to this node's NATS server")
    } else if !c.bucket_open {
        Some("KV bucket not open yet")
    } else if state.watch.crashed() {
        Some("the KV watch crashed and is being restarted; the cache is not following the bucket")
    } else {
        None
    }
}

/// `GET /health/readiness`: 200 while the node can serve reads (its regional
/// NATS is connected, the bucket is open and the watch task is running). A
/// leaf cut off from the hub stays ready (cached reads work); the center,
/// whose NATS is the hub, is not.
pub async fn readiness(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match readiness_problem(&state) {
        None => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        ),
    }
}

/// `GET /health`: readiness plus NATS, KV, watch and cache detail. The KV
/// check asks the hub itself, so it also shows a leaf that lost the hub.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let store = state.service.store();
    let connectivity = store.connectivity();
    let probe = store.identity().await.map(|id| id.last_revision);
    let problem = readiness_problem(&state);
    let status = match (problem, &probe) {
        (Some(_), _) => "unavailable",
        (None, Err(_)) => "degraded",
        (None, Ok(_)) => "ok",
    };
    let kv = match &probe {
        Ok(revision) => {
            json!({"reachable": true, "bucket": state.settings.kv_bucket, "lastRevision": revision})
        }
        Err(err) => {
            json!({"reachable": false, "bucket": state.settings.kv_bucket, "error": err.to_string()})
        }
    };
    let cache = state.service.cache().stats().await;
    let body = json!({
        "status": status,
        "nodeID": state.settings.node_id,
        "nodeType": state.settings.node_type.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "store": store.kind(),
        "nats": {
            "connected": connectivity.connected,
                        "url": crate::config::redact_urls(&state.settings.nats_url),
            "jsDomain": state.settings.nats_js_domain,
        },
        "kv": kv,
        "watch": state.watch.snapshot(),
        "cache": {"entries": cache.entries, "weightedSize": cache.weighted_size, "maxCost": cache.max_cost},
    });
    let code = if problem.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
