//! Metrics endpoints: Prometheus text for scrapers, and the Go service's
//! cache JSON for people.

use super::ApiError;
use crate::AppState;
use crate::auth::Caller;
use crate::cache::CacheStats;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

/// `GET /metrics`: Prometheus text format (no auth, for in-cluster scrapers).
pub async fn prometheus(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let cache = state.service.cache();
    let stats = cache.stats();
    state
        .metrics
        .cache_entries
        .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
    state
        .metrics
        .cache_weighted_size
        .set(i64::try_from(stats.weighted_size).unwrap_or(i64::MAX));
    state
        .metrics
        .streams_open
        .set(i64::try_from(state.streams.open_streams()).unwrap_or(i64::MAX));
    state
        .metrics
        .stream_follows
        .set(i64::try_from(state.streams.follows()).unwrap_or(i64::MAX));
    let (entries, bytes) = state.streams.log().size();
    state
        .metrics
        .event_log_entries
        .set(i64::try_from(entries).unwrap_or(i64::MAX));
    state
        .metrics
        .event_log_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    let text = state.metrics.render().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics_unavailable",
            e.to_string(),
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// `GET /api/v2/cache/metrics`: the Go service's cache statistics (with auth).
pub async fn cache(State(state): State<AppState>, _caller: Caller) -> Json<CacheStats> {
    Json(state.service.cache().stats())
}
