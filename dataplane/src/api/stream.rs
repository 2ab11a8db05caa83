//! `GET /api/v2/presence/stream?users=a,b`: Server-Sent Events of effective
//! presence changes (see `crate::fanout` for what is sent and why).
//!
//! A stream holds a place under the node's cap and its caller's, and ends
//! (freeing both) when its client leaves, when the client stops reading for
//! `HTTP_SEND_TIMEOUT_SECS`, when its token expires, when the bucket is
//! recreated, when it lags behind the change feed, or when the node stops.
//! The sender never waits on the client without also watching those.

use super::ApiError;
use super::presence::parse_user_list;
use crate::AppState;
use crate::auth::{AuthError, Caller};
use crate::fanout::{
    MAX_STREAM_USERS, Refused, StreamEvent, StreamPermit, Subscription, can_resume_exactly,
};
use crate::feed::{FeedError, FeedReceiver};
use crate::metrics::Metrics;
use crate::record::UserRecord;
use crate::store::Change;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

/// How long opening a stream waits for the node's watch to catch up with
/// the snapshot it read, so the snapshot and the live changes join exactly.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// The caller of a stream: the `Authorization` header, or, for browsers
/// (whose `EventSource` can't send headers), the `access_token` query
/// parameter of RFC 6750 §2.3. Only this route takes a token in the URL;
/// the access log redacts it (see [`super::redacted_query`]).
pub struct StreamCaller(pub Caller);

/// The token part of the stream's query.
#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

impl FromRequestParts<AppState> for StreamCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let in_query = Query::<TokenQuery>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?
            .0
            .access_token;
        match (parts.headers.contains_key(header::AUTHORIZATION), in_query) {
            (true, Some(_)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "multiple_tokens",
                "send the token either in the Authorization header or as access_token, not both",
            )),
            (false, Some(token)) if token.trim().is_empty() => {
                Err(AuthError::Invalid("access_token is empty".into()).into())
            }
            (false, Some(token)) => Ok(StreamCaller(state.verifier.verify(token.trim())?)),
            (_, None) => Caller::from_request_parts(parts, state)
                .await
                .map(StreamCaller),
        }
    }
}

/// Query of the stream.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StreamQuery {
    /// Up to 1000 comma-separated user IDs to follow.
    #[schemars(with = "String", length(min = 1))]
    users: Option<String>,
    /// Resume after this event ID, for clients that can't send the
    /// `Last-Event-ID` header (which wins when both are sent).
    #[serde(rename = "lastEventId", default)]
    #[schemars(with = "String", regex(pattern = r"^\s*[0-9]*\s*$"))]
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
        StreamEvent::Presence { id, view } => ("presence", *id, serde_json::to_string(&**view)),
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

/// An `event: error` that ends a stream, with the API's error shape.
fn error_event(code: &str, message: &str) -> Event {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    Event::default().event("error").data(body.to_string())
}

/// Seconds since the epoch, now.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn refusal(state: &AppState, caller: &Caller, refused: Refused) -> ApiError {
    let retry_after = Some(Duration::from_secs(5));
    match refused {
        Refused::Node => ApiError {
            retry_after,
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "this node already serves {} change streams, its limit (STREAM_MAX_CONNECTIONS); retry later or on another node",
                    state.streams.max_open()
                ),
            )
        },
        Refused::Caller => ApiError {
            retry_after,
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams_for_caller",
                format!(
                    "{:?} already has {} change streams open on this node, its limit (STREAM_MAX_PER_CALLER); close one first",
                    caller.user_id,
                    state.streams.per_caller()
                ),
            )
        },
    }
}

/// Opens a change stream: the current state of every user (or, with
/// `Last-Event-ID`, what changed since), a `snapshot-end` event, then live
/// changes. Refuses with 503 `too_many_streams` at the node's cap and 429
/// `too_many_streams_for_caller` at the caller's.
pub async fn open(
    State(state): State<AppState>,
    StreamCaller(caller): StreamCaller,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let ids = parse_user_list(query.users.as_deref(), MAX_STREAM_USERS)?;
    let resume_from = last_event_id(&headers, query.last_event_id.as_deref())?;
    let permit = state
        .streams
        .open(&caller.user_id)
        .map_err(|refused| refusal(&state, &caller, refused))?;
    // Subscribe before reading, so no change (or reset) falls between the two.
    let changes = state.streams.subscribe(&ids);
    let resets = state.watch.resets();
    let start = start(&state, ids, resume_from, changes).await?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let task = Follow {
        subscription: start.subscription,
        changes: start.changes,
        tx,
        stopping: state.stopping.subscribe(),
        resets,
        expiry: Box::pin(tokio::time::sleep(Duration::from_secs(
            caller.valid_until.saturating_sub(now_secs()),
        ))),
        send_timeout: state.settings.http.send_timeout,
        metrics: state.metrics.clone(),
        _permit: permit,
    };
    tokio::spawn(task.run(start.opening, start.live));
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

/// What a new stream starts with.
struct Start {
    subscription: Subscription,
    /// The snapshot (or catch-up) events, sent first and then dropped.
    opening: Vec<StreamEvent>,
    /// Changes past the snapshot that arrived while it was read.
    live: Vec<Arc<Change>>,
    changes: FeedReceiver,
}

/// Reads the users' records and joins them with the feed: the opening
/// events cover everything up to a revision the watch has applied.
async fn start(
    state: &AppState,
    ids: Vec<String>,
    resume_from: Option<u64>,
    mut changes: FeedReceiver,
) -> Result<Start, ApiError> {
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
            Ok(Some(change)) if change.revision <= through => subscription.absorb(&change),
            Ok(Some(change)) => live.push(change),
            Err(FeedError::Lagged) => {
                return Err(ApiError {
                    retry_after: Some(Duration::from_secs(1)),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stream_lagged",
                        "changes arrived faster than the stream could open; retry",
                    )
                });
            }
            Ok(None) | Err(FeedError::Closed) => break,
        }
    }
    let opening = match resume_from {
        None => subscription.opening(through, None),
        Some(after) => {
            match state
                .streams
                .log()
                .replay(after, through, &subscription.users())
            {
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
    Ok(Start {
        subscription,
        opening,
        live,
        changes,
    })
}

/// Why a stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The client went away.
    Gone,
    /// The node is stopping (or the feed closed with it).
    Stopping,
    /// The client didn't read for the send timeout.
    Stalled,
    /// The caller's token is no longer accepted.
    Expired,
    /// The bucket was recreated: every revision the stream knows is void.
    Reset,
    /// A change for the stream didn't fit its queue in the feed.
    Lagged,
}

/// One open stream: sends the opening, then live changes, until it ends.
struct Follow {
    subscription: Subscription,
    changes: FeedReceiver,
    tx: mpsc::Sender<Event>,
    stopping: watch::Receiver<bool>,
    resets: watch::Receiver<u64>,
    /// Fires when the caller's token stops being accepted.
    expiry: Pin<Box<tokio::time::Sleep>>,
    send_timeout: Duration,
    metrics: Metrics,
    _permit: StreamPermit,
}

impl Follow {
    async fn run(mut self, opening: Vec<StreamEvent>, live: Vec<Arc<Change>>) {
        let end = match self.start(opening, live).await {
            Ok(()) => self.follow().await,
            Err(end) => end,
        };
        self.finish(end).await;
    }

    /// Sends the opening events, each dropped once sent, then the changes
    /// that arrived while the stream opened.
    async fn start(
        &mut self,
        opening: Vec<StreamEvent>,
        live: Vec<Arc<Change>>,
    ) -> Result<(), End> {
        if *self.stopping.borrow() {
            return Err(End::Stopping);
        }
        for event in opening {
            self.deliver(event).await?;
        }
        for change in live {
            self.deliver_change(&change).await?;
        }
        Ok(())
    }

    /// Sends the event a live change makes, if any, and records how long
    /// the change took from the hub to this stream's connection: the
    /// service's own share of a viewer's latency.
    async fn deliver_change(&mut self, change: &Change) -> Result<(), End> {
        let Some(event) = self.subscription.apply(change) else {
            return Ok(());
        };
        self.deliver(event).await?;
        let lag = OffsetDateTime::now_utc() - change.stored_at;
        self.metrics
            .stream_event_lag
            .observe(lag.as_seconds_f64().max(0.0));
        Ok(())
    }

    async fn follow(&mut self) -> End {
        loop {
            tokio::select! {
                received = self.changes.recv() => match received {
                    Ok(change) => {
                        if let Err(end) = self.deliver_change(&change).await {
                            return end;
                        }
                    }
                    Err(FeedError::Lagged) => return End::Lagged,
                    Err(FeedError::Closed) => return End::Stopping,
                },
                // The only change is to "stopping" (or the sender is gone).
                _ = self.stopping.changed() => return End::Stopping,
                _ = self.resets.changed() => return End::Reset,
                () = &mut self.expiry => return End::Expired,
                () = self.tx.closed() => return End::Gone,
            }
        }
    }

    /// Sends one event, or gives up: a client that doesn't take it within
    /// the send timeout ends its stream, and so does any other end signal
    /// that arrives meanwhile.
    async fn deliver(&mut self, event: StreamEvent) -> Result<(), End> {
        let sse = to_sse(&event);
        drop(event);
        let sse = match self.tx.try_send(sse) {
            Ok(()) => {
                self.metrics.stream_events.inc();
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
            Err(mpsc::error::TrySendError::Full(sse)) => sse,
        };
        tokio::select! {
            sent = self.tx.send(sse) => sent.map_err(|_| End::Gone)?,
            () = tokio::time::sleep(self.send_timeout) => return Err(End::Stalled),
            _ = self.stopping.changed() => return Err(End::Stopping),
            _ = self.resets.changed() => return Err(End::Reset),
            () = &mut self.expiry => return Err(End::Expired),
        }
        self.metrics.stream_events.inc();
        Ok(())
    }

    /// Tells the client why its stream ends, when it should know.
    async fn finish(self, end: End) {
        let closed = |reason: &str| {
            self.metrics
                .streams_closed
                .with_label_values(&[reason])
                .inc();
        };
        let last = match end {
            End::Gone | End::Stopping => None,
            End::Stalled => {
                closed("send_timeout");
                tracing::info!("a change stream's client stopped reading; ending the stream");
                None
            }
            End::Lagged => {
                tracing::warn!("a change stream lagged; ending it so its client resumes");
                self.metrics.streams_lagged.inc();
                Some(error_event(
                    "stream_lagged",
                    "this stream fell behind the change feed; reconnect with Last-Event-ID to resume",
                ))
            }
            End::Expired => {
                closed("token_expired");
                Some(error_event(
                    "token_expired",
                    "the token of this stream expired; reconnect with a fresh token (Last-Event-ID resumes where this stream ended)",
                ))
            }
            End::Reset => {
                closed("bucket_reset");
                // An empty id clears the client's Last-Event-ID: the old
                // bucket's revisions mean nothing in the new one.
                Some(
                    error_event(
                        "stream_reset",
                        "the presence data was reset (the bucket was recreated); reconnect without Last-Event-ID for a new snapshot",
                    )
                    .id(""),
                )
            }
        };
        if let Some(event) = last {
            let _ = tokio::time::timeout(self.send_timeout, self.tx.send(event)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::StreamHub;
    use crate::record::PresenceView;

    struct Harness {
        rx: mpsc::Receiver<Event>,
        metrics: Metrics,
        _stopping: watch::Sender<bool>,
        resets: watch::Sender<u64>,
        feed: crate::feed::ChangeFeed,
    }

    /// A stream of users `a` and `b` whose opening is its snapshot; the
    /// returned view is `a`'s, shared with the opening.
    fn stream(expires_in: Duration, send_timeout: Duration) -> (Follow, Vec<StreamEvent>, Harness) {
        let hub = StreamHub::new(10, 10, 1 << 20);
        let feed = crate::feed::ChangeFeed::new(16);
        let changes = feed.subscribe(&["a".into(), "b".into()]);
        let (tx, rx) = mpsc::channel(64);
        let (stopping_tx, stopping) = watch::channel(false);
        let (resets_tx, resets) = watch::channel(0);
        let metrics = Metrics::new().expect("metrics");
        let subscription = Subscription::new(
            vec!["a".into(), "b".into()],
            vec![UserRecord::default(), UserRecord::default()],
        );
        let opening = subscription.opening(7, None);
        let follow = Follow {
            subscription,
            changes,
            tx,
            stopping,
            resets,
            expiry: Box::pin(tokio::time::sleep(expires_in)),
            send_timeout,
            metrics: metrics.clone(),
            _permit: hub.open("t").expect("a place"),
        };
        let harness = Harness {
            rx,
            metrics,
            _stopping: stopping_tx,
            resets: resets_tx,
            feed,
        };
        (follow, opening, harness)
    }

    fn view_of(event: &StreamEvent) -> Arc<PresenceView> {
        match event {
            StreamEvent::Presence { view, .. } => view.clone(),
            StreamEvent::SnapshotEnd { .. } => panic!("not a presence"),
        }
    }

    fn closed(metrics: &Metrics, reason: &str) -> u64 {
        metrics.streams_closed.with_label_values(&[reason]).get()
    }

    #[tokio::test]
    async fn the_opening_is_freed_once_sent() {
        let (follow, opening, mut h) = stream(Duration::from_secs(3600), Duration::from_secs(30));
        let probe = view_of(&opening[0]);
        // The subscription, the opening and the probe hold it.
        assert_eq!(Arc::strong_count(&probe), 3);
        let task = tokio::spawn(follow.run(opening, Vec::new()));
        for _ in 0..3 {
            let _opening = h.rx.recv().await.expect("an opening event");
        }
        // Sent: only the subscription (what the client was told) and the
        // probe are left, while the stream lives on.
        let freed = async {
            while Arc::strong_count(&probe) > 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), freed)
            .await
            .expect("the sent opening is dropped");
        assert!(!task.is_finished());
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_with_its_token_or_its_bucket() {
        let (follow, opening, mut h) = stream(Duration::from_secs(60), Duration::from_secs(30));
        let task = tokio::spawn(follow.run(opening, Vec::new()));
        for _ in 0..3 {
            let _opening = h.rx.recv().await.expect("an opening event");
        }
        let _last = h.rx.recv().await.expect("a last event");
        assert!(h.rx.recv().await.is_none(), "then the stream ends");
        task.await.expect("ends cleanly");
        assert_eq!(closed(&h.metrics, "token_expired"), 1);

        let (follow, opening, mut h) = stream(Duration::from_secs(60), Duration::from_secs(30));
        let task = tokio::spawn(follow.run(opening, Vec::new()));
        h.resets.send_modify(|e| *e += 1);
        while h.rx.recv().await.is_some() {}
        task.await.expect("ends cleanly");
        assert_eq!(closed(&h.metrics, "bucket_reset"), 1);
    }

    #[tokio::test]
    async fn a_stream_that_fell_behind_the_feed_ends_lagged() {
        let (follow, opening, mut h) = stream(Duration::from_secs(3600), Duration::from_secs(30));
        // One more change of `a` than its queue holds, before it reads any.
        for revision in 10..27 {
            h.feed.send(Arc::new(Change {
                user_id: "a".into(),
                update: crate::record::Update::Seen(None),
                revision,
                stored_at: OffsetDateTime::now_utc(),
                pending: 0,
            }));
        }
        let task = tokio::spawn(follow.run(opening, Vec::new()));
        let drained = async { while h.rx.recv().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(10), drained)
            .await
            .expect("the lagged stream ends");
        task.await.expect("ends cleanly");
        assert_eq!(h.metrics.streams_lagged.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_loses_its_stream() {
        let (mut follow, _, h) = stream(Duration::from_secs(3600), Duration::from_secs(30));
        // Far more events than the channel holds, and nobody reading.
        let many: Vec<StreamEvent> = (0..100)
            .map(|i| StreamEvent::SnapshotEnd { id: i, users: 2 })
            .collect();
        let end = follow.start(many, Vec::new()).await;
        assert_eq!(end, Err(End::Stalled));
        follow.finish(End::Stalled).await;
        assert_eq!(closed(&h.metrics, "send_timeout"), 1);
    }
}
