//! Health endpoints: liveness (the process answers), readiness (the node can
//! serve reads), and `/health` with the detail an operator needs to debug.

use crate::AppState;
use crate::config::StoreKind;
use crate::watch::WatchSnapshot;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::Serialize;
use std::time::Duration;

/// Body of `GET /health/liveness`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Liveness {
    /// Always `alive`.
    #[schemars(extend("const" = "alive"))]
    pub status: &'static str,
}

/// Body of `GET /health/readiness`, with 200 or 503.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Readiness {
    /// `ready` (200) or `not_ready` (503).
    #[schemars(extend("enum" = ["ready", "not_ready"]))]
    pub status: &'static str,
    /// Why the node is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Body of `GET /health`, with 200 or 503.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok`; `degraded` when the node is ready but the hub's KV does not
    /// answer now; `unavailable` when the node is not ready (503).
    #[schemars(extend("enum" = ["ok", "degraded", "unavailable"]))]
    pub status: &'static str,
    #[serde(rename = "nodeID")]
    pub node_id: String,
    /// `center` or `leaf`.
    pub node_type: &'static str,
    pub version: &'static str,
    pub uptime_seconds: u64,
    /// `nats`, or `memory` with `STORE=memory`.
    pub store: &'static str,
    pub nats: NatsHealth,
    pub kv: KvHealth,
    pub watch: WatchSnapshot,
    pub cache: CacheSize,
}

/// `/health`'s view of the NATS connection (not connected, no URL, with
/// `STORE=memory`).
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsHealth {
    pub connected: bool,
    /// The server URLs, credentials redacted.
    pub url: String,
    pub js_domain: Option<String>,
}

/// `/health`'s view of the bucket, asked of the hub now.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvHealth {
    pub reachable: bool,
    pub bucket: String,
    /// When reachable: the bucket's last revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_revision: Option<u64>,
    /// When not reachable: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `/health`'s view of the cache's size.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSize {
    pub entries: u64,
    pub weighted_size: u64,
    pub max_cost: u64,
}

/// The NATS part of `/health`: with the memory store no NATS is used, so
/// none is shown as connected.
fn nats_health(state: &AppState, connected: bool) -> NatsHealth {
    if state.settings.store == StoreKind::Memory {
        return NatsHealth {
            connected: false,
            url: String::new(),
            js_domain: None,
        };
    }
    NatsHealth {
        connected,
        url: crate::config::redact_urls(&state.settings.nats_url),
        js_domain: state.settings.nats_js_domain.clone(),
    }
}

/// `GET /health/liveness`: the process is up and its HTTP loop runs.
pub async fn liveness() -> Json<Liveness> {
    Json(Liveness { status: "alive" })
}

fn readiness_problem(state: &AppState) -> Option<&'static str> {
    let c = state.service.store().connectivity();
    if state.leaving.load(std::sync::atomic::Ordering::SeqCst) {
        Some("shutting down: serving on until load balancers have let go")
    } else if !c.connected {
        Some("not connected to this node's NATS server")
    } else if !c.bucket_open {
        Some("KV bucket not open yet")
    } else if state.watch.crashed() {
        Some("the KV watch crashed and is being restarted; the cache is not following the bucket")
    } else {
        // Counted from the replay's start: a start spent waiting for NATS
        // or the hub doesn't use up the wait (until the replay starts, from
        // the process's start, so a node that never gets that far isn't
        // held back for longer than before).
        let since = state.watch.warm_up_began().unwrap_or(state.started);
        warming_up(
            state.watch.warmed_up(),
            since.elapsed(),
            state.settings.readiness_warmup_timeout,
        )
    }
}

/// Why a node that started `since_start` ago is not ready yet, if its first
/// replay of the bucket has not ended (`warmed_up`) and readiness still
/// waits for it (`limit`; 0 waits not at all).
fn warming_up(warmed_up: bool, since_start: Duration, limit: Duration) -> Option<&'static str> {
    (!warmed_up && since_start < limit)
        .then_some("warming up: the KV watch is filling the cache from the bucket")
}

/// 200 while the node is ready, 503 when it is not.
fn ready_code(problem: Option<&str>) -> StatusCode {
    match problem {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `GET /health/readiness`: 200 while the node can serve reads (its regional
/// NATS is connected, the bucket is open, the watch task is running, and it
/// has filled the cache from the bucket once since it started, or gave up
/// waiting after `READINESS_WARMUP_TIMEOUT_SECS`: until then every read of
/// a user not yet replayed goes to the hub, at a fraction of a cached read's
/// rate). A leaf cut off from the hub stays ready (cached reads work); the
/// center, whose NATS is the hub, is not.
pub async fn readiness(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let reason = readiness_problem(&state);
    let status = if reason.is_none() {
        "ready"
    } else {
        "not_ready"
    };
    (ready_code(reason), Json(Readiness { status, reason }))
}

/// `GET /health`: readiness plus NATS, KV, watch and cache detail. The KV
/// check asks the hub itself, so it also shows a leaf that lost the hub;
/// one answer serves every call for a second.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let store = state.service.store();
    let connectivity = store.connectivity();
    let probe = state.kv_probe.last_revision(store.as_ref()).await;
    let problem = readiness_problem(&state);
    let status = match (problem, &probe) {
        (Some(_), _) => "unavailable",
        (None, Err(_)) => "degraded",
        (None, Ok(_)) => "ok",
    };
    let (last_revision, error) = match probe {
        Ok(revision) => (Some(revision), None),
        Err(err) => (None, Some(err)),
    };
    let cache = state.service.cache().stats();
    let body = Health {
        status,
        node_id: state.settings.node_id.clone(),
        node_type: state.settings.node_type.as_str(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        store: store.kind(),
        nats: nats_health(&state, connectivity.connected),
        kv: KvHealth {
            reachable: last_revision.is_some(),
            bucket: state.settings.kv_bucket.clone(),
            last_revision,
            error,
        },
        watch: state.watch.snapshot(),
        cache: CacheSize {
            entries: cache.entries,
            weighted_size: cache.weighted_size,
            max_cost: cache.max_cost,
        },
    };
    (ready_code(problem), Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_waits_for_its_first_replay_for_at_most_the_limit() {
        let (second, minute) = (Duration::from_secs(1), Duration::from_secs(60));
        assert!(warming_up(false, second, minute).is_some(), "replaying");
        assert_eq!(warming_up(true, second, minute), None, "replayed");
        assert_eq!(warming_up(false, minute, minute), None, "waited enough");
        assert_eq!(
            warming_up(false, Duration::ZERO, Duration::ZERO),
            None,
            "0 waits not"
        );
    }

    #[tokio::test]
    async fn the_memory_store_shows_no_nats() {
        let settings = crate::fixtures::memory_settings("0123456789abcdef", &[]);
        let state = crate::build(settings).await.expect("state");
        let (_, Json(body)) = health(State(state)).await;
        assert_eq!(body.store, "memory");
        assert!(!body.nats.connected);
        assert_eq!(body.nats.url, "");
    }
}
