//! `GET /api/v2/presence/stream?users=a,b`: Server-Sent Events of effective
//! presence changes (see `crate::fanout` for what is sent and why).

use super::ApiError;
use super::presence::parse_user_list;
use crate::AppState;
use crate::auth::Caller;
use crate::fanout::{
    MAX_STREAM_USERS, StreamEvent, StreamPermit, Subscription, can_resume_exactly,
};
use crate::record::UserRecord;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};

/// How long opening a stream waits for the node's watch to catch up with
/// the snapshot it read, so the snapshot and the live changes join exactly.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// Query of the stream.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    users: Option<String>,
    /// For clients that can't send the `Last-Event-ID` header.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

fn last_event_id(headers: &HeaderMap, query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let header = headers.get("last-event-id").map(HeaderValue::to_str);
    let raw = match (header, query) {
        (Some(Ok(value)), _) => value,
        (Some(Err(_)), _) => "?",
        (None, Some(value)) => value,
        (None, None) => return Ok(None),
    };
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_last_event_id",
            format!("Last-Event-ID must be an event id this service sent (a number); got {raw:?}"),
        )
    })
}

fn to_sse(event: &StreamEvent) -> Event {
    let (name, id, data) = match event {
        StreamEvent::Presence { id, view } => ("presence", *id, serde_json::to_string(view)),
        StreamEvent::SnapshotEnd { id, users } => (
            "snapshot-end",
            Some(*id),
            serde_json::to_string(&serde_json::json!({"revision": id, "users": users})),
        ),
    };
    let mut sse = Event::default().event(name);
    if let Some(id) = id {
        sse = sse.id(id.to_string());
    }
    match data {
        Ok(data) => sse.data(data),
        Err(err) => sse.comment(format!("unserializable event: {err}")),
    }
}

fn lagged_event() -> Event {
    let body = serde_json::json!({"error": {
        "code": "stream_lagged",
        "message": "this stream fell behind the change feed; reconnect with Last-Event-ID to resume",
    }});
    Event::default().event("error").data(body.to_string())
}

/// Opens a change stream: the current state of every user (or, with
/// `Last-Event-ID`, what changed since), a `snapshot-end` event, then live
/// changes. Refuses with 503 `too_many_streams` at the node's cap.
pub async fn open(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let ids = parse_user_list(query.users.as_deref(), MAX_STREAM_USERS)?;
    let resume_from = last_event_id(&headers, query.last_event_id.as_deref())?;
    let permit = state.streams.open().ok_or_else(|| ApiError {
        retry_after: Some(Duration::from_secs(5)),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!(
                "this node already serves {} change streams, its limit (STREAM_MAX_CONNECTIONS); retry later or on another node",
                state.streams.max_open()
            ),
        )
    })?;
    // Subscribe before reading, so no change falls between the two.
    let mut changes = state.streams.subscribe();
    let applied_before = state.watch.applied_revision();
    let records = state.service.records(&ids).await?;
    let through = records
        .iter()
        .map(|r| r.revision())
        .fold(applied_before, u64::max);
    if !state.watch.wait_applied(through, CATCH_UP_LIMIT).await {
        tracing::warn!(
            through,
            "the KV watch is behind; a stream's snapshot may be followed by changes it includes"
        );
    }
    let now = OffsetDateTime::now_utc();
    let records = records.iter().map(|r| UserRecord::clone(r)).collect();
    let mut subscription = Subscription::new(ids, records);
    let mut live = Vec::new();
    loop {
        match changes.try_recv() {
            Ok(change) if change.revision <= through => subscription.absorb(&change),
            Ok(change) => live.push(change),
            Err(broadcast::error::TryRecvError::Lagged(_)) => {
                return Err(ApiError {
                    retry_after: Some(Duration::from_secs(1)),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stream_lagged",
                        "changes arrived faster than the stream could open; retry",
                    )
                });
            }
            Err(_) => break,
        }
    }
    let opening = match resume_from {
        None => subscription.opening(through, None),
        Some(after) => {
            let log = state.streams.log();
            match log.replay(after, through, &subscription.users()) {
                // Every change missed, one event each.
                Some(missed) => subscription.replayed(missed, through),
                // Older than the log: each changed user's latest state, if
                // the bucket still shows every change since; else everything.
                None => {
                    let recent = state.watch.stored_no_earlier_than(after);
                    let resume = can_resume_exactly(after, through, recent, now).then_some(after);
                    subscription.opening(through, resume)
                }
            }
        }
    };
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(follow(
        state.clone(),
        permit,
        subscription,
        opening,
        live,
        changes,
        tx,
    ));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    let keep_alive = KeepAlive::new().interval(state.settings.stream_keepalive);
    let mut response = Sse::new(body).keep_alive(keep_alive).into_response();
    // Reverse proxies (nginx) must not buffer an event stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Sends the opening events, then live changes until the client leaves,
/// the stream lags, or the node stops.
async fn follow(
    state: AppState,
    permit: StreamPermit,
    mut subscription: Subscription,
    opening: Vec<StreamEvent>,
    live: Vec<Arc<crate::store::Change>>,
    mut changes: broadcast::Receiver<Arc<crate::store::Change>>,
    tx: mpsc::Sender<Event>,
) {
    let metrics = &state.metrics;
    let _permit = permit;
    let mut stopping = state.stopping.subscribe();
    if *stopping.borrow() {
        return;
    }
    for event in &opening {
        if tx.send(to_sse(event)).await.is_err() {
            return;
        }
        metrics.stream_events.inc();
    }
    for change in live {
        if let Some(event) = subscription.apply(&change) {
            if tx.send(to_sse(&event)).await.is_err() {
                return;
            }
            metrics.stream_events.inc();
        }
    }
    loop {
        tokio::select! {
            received = changes.recv() => match received {
                Ok(change) => {
                    if let Some(event) = subscription.apply(&change) {
                        if tx.send(to_sse(&event)).await.is_err() {
                            return;
                        }
                        metrics.stream_events.inc();
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "a change stream lagged; ending it so its client resumes");
                    metrics.streams_lagged.inc();
                    let _ = tx.send(lagged_event()).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // The only change is to "stopping" (or the sender is gone).
            _ = stopping.changed() => return,
            () = tx.closed() => return,
        }
    }
}
