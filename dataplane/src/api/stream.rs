//! `GET /api/v2/presence/stream?users=a,b`: Server-Sent Events of effective
//! presence changes (see `crate::fanout` for what is sent and why).
//!
//! A stream holds a place under the node's cap and its caller's, and ends
//! (freeing both) when its client leaves, when the client stops reading for
//! `HTTP_SEND_TIMEOUT_SECS`, when its token expires, when the bucket is
//! recreated, when it lags behind the change feed, or when the node stops.
//! The response body itself follows the feed (see [`Follow`]).

use super::presence::parse_user_list;
use super::{ApiError, StrictQuery};
use crate::AppState;
use crate::auth::{AuthError, Caller};
use crate::fanout::{
    MAX_STREAM_USERS, Refused, StreamEvent, StreamPermit, Subscription, can_resume_exactly,
};
use crate::feed::{Fed, FeedError, FeedReceiver};
use crate::metrics::Metrics;
use crate::record::UserRecord;
use crate::server::StallNotice;
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;

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
        let StrictQuery(TokenQuery {
            access_token: in_query,
        }) = StrictQuery::from_request_parts(parts, state).await?;
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
    match data {
        Ok(data) => sse_event(name, id).data(data),
        Err(err) => sse_event(name, id).comment(format!("unserializable event: {err}")),
    }
}

/// An event named `name` with `id`, if any, for its data to follow.
fn sse_event(name: &str, id: Option<u64>) -> Event {
    let sse = Event::default().event(name);
    match id {
        Some(id) => sse.id(id.to_string()),
        None => sse,
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
    let retry_after = Duration::from_secs(5);
    match refused {
        Refused::Node => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!(
                "this node already serves {} change streams, its limit (STREAM_MAX_CONNECTIONS); retry later or on another node",
                state.streams.caps().streams
            ),
        )
        .retry_after(retry_after),
        Refused::Caller => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams_for_caller",
            format!(
                "{:?} already has {} change streams open on this node, its limit (STREAM_MAX_PER_CALLER); close one first",
                caller.user_id,
                state.streams.caps().per_caller
            ),
        )
        .retry_after(retry_after),
        Refused::TooManyUsers => ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_users",
            format!(
                "this stream follows more users than all of this node's streams may together ({}, STREAM_MAX_FOLLOWS); follow fewer",
                state.streams.caps().follows
            ),
        ),
        Refused::Follows => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_follows",
            format!(
                "this node's change streams already follow nearly {} users, its limit (STREAM_MAX_FOLLOWS); follow fewer users, or retry later or on another node",
                state.streams.caps().follows
            ),
        )
        .retry_after(retry_after),
    }
}

/// Opens a change stream: the current state of every user (or, with
/// `Last-Event-ID`, what changed since), a `snapshot-end` event, then live
/// changes. Refuses with 503 `too_many_streams` at the node's cap, 503
/// `too_many_follows` at its cap of users followed, and 429
/// `too_many_streams_for_caller` at the caller's.
pub async fn open(
    State(state): State<AppState>,
    StreamCaller(caller): StreamCaller,
    headers: HeaderMap,
    StrictQuery(query): StrictQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let ids: Vec<String> = parse_user_list(query.users.as_deref(), MAX_STREAM_USERS)?
        .into_iter()
        .map(str::to_owned)
        .collect();
    let resume_from = last_event_id(&headers, query.last_event_id.as_deref())?;
    let permit = state
        .streams
        .open(&caller.user_id, ids.len())
        .map_err(|refused| refusal(&state, &caller, refused))?;
    // Subscribe before reading, so no change (or reset) falls between the two.
    let changes = state.streams.subscribe(&ids);
    let resets = state.watch.resets();
    let start = start(&state, ids, resume_from, changes).await?;
    let stall = StallNotice::default();
    let follow = Follow {
        subscription: start.subscription,
        opening: start.opening.into_iter(),
        live: start.live.into_iter(),
        changes: start.changes,
        stopping: state.stopping.subscribe(),
        resets,
        expiry: Box::pin(tokio::time::sleep(Duration::from_secs(
            caller.valid_until.saturating_sub(now_secs()),
        ))),
        metrics: state.metrics.clone(),
        stall: stall.clone(),
        ended: false,
        _permit: permit,
    };
    let body = futures::stream::unfold(follow, |mut follow| async move {
        let event = follow.next().await?;
        Some((Ok::<_, Infallible>(event), follow))
    });
    let keep_alive = KeepAlive::new().interval(state.settings.stream_keepalive);
    let mut response = Sse::new(body).keep_alive(keep_alive).into_response();
    // Reverse proxies (nginx) must not buffer an event stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.extensions_mut().insert(stall);
    Ok(response)
}

/// What a new stream starts with.
struct Start {
    subscription: Subscription,
    /// The snapshot (or catch-up) events, sent first and then dropped.
    opening: Vec<StreamEvent>,
    /// Changes past the snapshot that arrived while it was read.
    live: Vec<Arc<Fed>>,
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
            Ok(Some(fed)) if fed.change.revision <= through => subscription.absorb(&fed.change),
            Ok(Some(fed)) => live.push(fed),
            Err(FeedError::Lagged) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stream_lagged",
                    "changes arrived faster than the stream could open; retry",
                )
                .retry_after(Duration::from_secs(1)));
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
    /// The node is stopping (or the feed closed with it).
    Stopping,
    /// The caller's token is no longer accepted.
    Expired,
    /// The bucket was recreated: every revision the stream knows is void.
    Reset,
    /// A change for the stream didn't fit its queue in the feed.
    Lagged,
}

/// One open stream, polled by its connection as the response body: the
/// opening, then live changes, until it ends.
///
/// The body follows the feed itself rather than through a task of its own,
/// so a change reaches the socket in one wake-up instead of two (#17), and
/// events that queue up while the connection writes go out in one write. A
/// client that stops reading stops the connection polling the body; the
/// server's send timeout then drops the connection (and this with it), and
/// [`StallNotice`] tells the drop why. The feed's queue bounds what waits
/// meanwhile: a stream that falls further behind is ended as lagged.
struct Follow {
    subscription: Subscription,
    /// The snapshot (or catch-up) events, each dropped once sent.
    opening: std::vec::IntoIter<StreamEvent>,
    /// Changes past the snapshot that arrived while the stream opened.
    live: std::vec::IntoIter<Arc<Fed>>,
    changes: FeedReceiver,
    stopping: watch::Receiver<bool>,
    resets: watch::Receiver<u64>,
    /// Fires when the caller's token stops being accepted.
    expiry: Pin<Box<tokio::time::Sleep>>,
    metrics: Metrics,
    stall: StallNotice,
    /// The stream told its end (or had nothing to tell): nothing follows.
    ended: bool,
    _permit: StreamPermit,
}

impl Follow {
    /// The next event for the client, or `None` once the stream is over.
    async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        match self.next_event().await {
            Ok(event) => {
                self.metrics.stream_events.inc();
                Some(event)
            }
            Err(end) => {
                self.ended = true;
                self.last_words(end)
            }
        }
    }

    /// The next opening event, then the next live change that makes one.
    async fn next_event(&mut self) -> Result<Event, End> {
        // A long opening is handed out without waiting, so the end signals
        // are looked at before every event, not only while waiting.
        self.ended_meanwhile()?;
        if let Some(event) = self.opening.next() {
            return Ok(to_sse(&event));
        }
        while let Some(fed) = self.live.next() {
            if let Some(event) = self.event_of(&fed) {
                return Ok(event);
            }
        }
        loop {
            let fed = tokio::select! {
                // An end signal wins over changes still queued behind it.
                biased;
                // The only change is to "stopping" (or the sender is gone).
                _ = self.stopping.changed() => return Err(End::Stopping),
                _ = self.resets.changed() => return Err(End::Reset),
                () = &mut self.expiry => return Err(End::Expired),
                received = self.changes.recv() => match received {
                    Ok(fed) => fed,
                    Err(FeedError::Lagged) => return Err(End::Lagged),
                    Err(FeedError::Closed) => return Err(End::Stopping),
                },
            };
            if let Some(event) = self.event_of(&fed) {
                return Ok(event);
            }
        }
    }

    /// Whether the node began stopping, the bucket was reset or the token
    /// expired since the stream last looked, without waiting for any.
    fn ended_meanwhile(&self) -> Result<(), End> {
        if *self.stopping.borrow() {
            return Err(End::Stopping);
        }
        if self.resets.has_changed().unwrap_or(true) {
            return Err(End::Reset);
        }
        if self.expiry.deadline() <= tokio::time::Instant::now() {
            return Err(End::Expired);
        }
        Ok(())
    }

    /// The event a live change makes, if any, having recorded how long the
    /// change took from the hub to this stream's connection: the service's
    /// own share of a viewer's latency.
    ///
    /// The event's JSON is the one the feed shares among the streams that
    /// show the same presence, when this stream shows it too.
    fn event_of(&mut self, fed: &Fed) -> Option<Event> {
        let event = self.subscription.apply(&fed.change)?;
        let lag = OffsetDateTime::now_utc() - fed.change.stored_at;
        self.metrics
            .stream_event_lag
            .observe(lag.as_seconds_f64().max(0.0));
        let shared = match &event {
            StreamEvent::Presence { id, view } => fed
                .shared_json(view)
                .map(|json| sse_event("presence", *id).data(json)),
            StreamEvent::SnapshotEnd { .. } => None,
        };
        Some(shared.unwrap_or_else(|| to_sse(&event)))
    }

    /// What the client is told of why its stream ends, when it should know.
    fn last_words(&self, end: End) -> Option<Event> {
        let closed = |reason: &str| {
            self.metrics
                .streams_closed
                .with_label_values(&[reason])
                .inc();
        };
        match end {
            End::Stopping => None,
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
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        if !self.ended && self.stall.stalled() {
            self.metrics
                .streams_closed
                .with_label_values(&["send_timeout"])
                .inc();
            tracing::info!("a change stream's client stopped reading; ended the stream");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::StreamHub;
    use crate::record::PresenceView;

    struct Harness {
        metrics: Metrics,
        stopping: watch::Sender<bool>,
        resets: watch::Sender<u64>,
        feed: crate::feed::ChangeFeed,
        stall: StallNotice,
    }

    /// A stream of users `a` and `b` whose opening is its snapshot (three
    /// events), and a probe: `a`'s view, shared with the opening.
    fn stream(expires_in: Duration) -> (Follow, Arc<PresenceView>, Harness) {
        let caps = crate::fanout::StreamCaps {
            streams: 10,
            per_caller: 10,
            follows: 1000,
        };
        let hub = StreamHub::new(caps, 1 << 20);
        let feed = crate::feed::ChangeFeed::new(16);
        let changes = feed.subscribe(&["a".into(), "b".into()]);
        let (stopping_tx, stopping) = watch::channel(false);
        let (resets_tx, resets) = watch::channel(0);
        let metrics = Metrics::new().expect("metrics");
        let subscription = Subscription::new(
            vec!["a".into(), "b".into()],
            vec![UserRecord::default(), UserRecord::default()],
        );
        let opening = subscription.opening(7, None);
        let probe = match &opening[0] {
            StreamEvent::Presence { view, .. } => view.clone(),
            StreamEvent::SnapshotEnd { .. } => panic!("not a presence"),
        };
        let stall = StallNotice::default();
        let follow = Follow {
            subscription,
            opening: opening.into_iter(),
            live: Vec::new().into_iter(),
            changes,
            stopping,
            resets,
            expiry: Box::pin(tokio::time::sleep(expires_in)),
            metrics: metrics.clone(),
            stall: stall.clone(),
            ended: false,
            _permit: hub.open("t", 1).expect("a place"),
        };
        let harness = Harness {
            metrics,
            stopping: stopping_tx,
            resets: resets_tx,
            feed,
            stall,
        };
        (follow, probe, harness)
    }

    async fn opening(follow: &mut Follow) {
        for _ in 0..3 {
            assert!(follow.next().await.is_some(), "an opening event");
        }
    }

    fn closed(metrics: &Metrics, reason: &str) -> u64 {
        metrics.streams_closed.with_label_values(&[reason]).get()
    }

    /// `a` set busy (the same state at every revision).
    fn change_of_a(revision: u64) -> Arc<Fed> {
        let busy = crate::model::ValidUpdate {
            user_id: "a".into(),
            status: crate::model::Status::Busy,
            message: "in a meeting".into(),
            expires_at: None,
        };
        let now = OffsetDateTime::now_utc();
        let presence = crate::model::Presence::accepted(busy, "n1", now);
        let change = crate::store::Change {
            user_id: "a".into(),
            update: crate::record::Update::Manual(Some(presence)),
            revision,
            stored_at: OffsetDateTime::now_utc(),
            pending: 0,
        };
        Arc::new(Fed::new(change, None))
    }

    /// `fed`'s change fed again, with `shown` as the node's view.
    fn showing(fed: &Fed, shown: &Arc<PresenceView>) -> Arc<Fed> {
        Arc::new(Fed::new(fed.change.clone(), Some(shown.clone())))
    }

    /// What a stream that starts with nothing of `a` shows after `fed`.
    fn a_after(fed: &Fed) -> Arc<PresenceView> {
        let mut record = UserRecord::default();
        assert!(record.merge(fed.change.update.clone(), fed.change.revision));
        Arc::new(record.stored_view("a"))
    }

    #[tokio::test]
    async fn streams_that_show_the_node_s_view_send_its_shared_json() {
        let change = change_of_a(10);
        let shown = a_after(&change);
        let fed = showing(&change, &shown);
        let own = to_sse(&StreamEvent::Presence {
            id: Some(10),
            view: shown.clone(),
        });
        for _ in 0..2 {
            let (mut follow, _, h) = stream(Duration::from_secs(3600));
            opening(&mut follow).await;
            h.feed.send(fed.clone());
            let event = follow.next().await.expect("an event");
            assert_eq!(format!("{event:?}"), format!("{own:?}"));
        }
        let json = fed.shared_json(&shown).expect("made by the first stream");
        assert_eq!(json, serde_json::to_string(&*shown).unwrap());
        assert!(std::ptr::eq(json, fed.shared_json(&shown).unwrap()));
    }

    #[tokio::test]
    async fn a_stream_that_shows_another_view_than_the_node_s_sends_its_own() {
        // The node's view of the change differs from what this stream
        // shows (as for a stream opened on another snapshot): the shared
        // JSON must not go out in place of the stream's own.
        let change = change_of_a(10);
        let other = Arc::new(PresenceView::unknown("a"));
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        opening(&mut follow).await;
        h.feed.send(showing(&change, &other));
        let event = follow.next().await.expect("an event");
        let own = to_sse(&StreamEvent::Presence {
            id: Some(10),
            view: a_after(&change),
        });
        assert_eq!(format!("{event:?}"), format!("{own:?}"));
    }

    #[tokio::test]
    async fn the_opening_is_freed_once_sent() {
        let (mut follow, probe, _h) = stream(Duration::from_secs(3600));
        // The subscription, the opening and the probe hold it.
        assert_eq!(Arc::strong_count(&probe), 3);
        opening(&mut follow).await;
        // Sent: only the subscription (what the client was told) and the
        // probe are left, while the stream lives on.
        assert_eq!(Arc::strong_count(&probe), 2);
        let more = tokio::time::timeout(Duration::from_millis(50), follow.next()).await;
        assert!(more.is_err(), "no event without a change");
    }

    #[tokio::test]
    async fn a_live_change_is_an_event_and_one_that_shows_nothing_is_not() {
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        opening(&mut follow).await;
        h.feed.send(change_of_a(10));
        let event = tokio::time::timeout(Duration::from_secs(10), follow.next()).await;
        assert!(matches!(event, Ok(Some(_))), "an event for the change");
        assert_eq!(h.metrics.stream_event_lag.get_sample_count(), 1);
        // The same state again: the stream waits for a real change.
        h.feed.send(change_of_a(11));
        let more = tokio::time::timeout(Duration::from_millis(50), follow.next()).await;
        assert!(
            more.is_err(),
            "no event for a change that shows nothing new"
        );
        assert_eq!(h.metrics.stream_events.get(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_with_its_token_or_its_bucket() {
        let (mut follow, _, h) = stream(Duration::from_secs(60));
        opening(&mut follow).await;
        assert!(follow.next().await.is_some(), "a last event");
        assert!(follow.next().await.is_none(), "then the stream ends");
        assert_eq!(closed(&h.metrics, "token_expired"), 1);

        let (mut follow, _, h) = stream(Duration::from_secs(60));
        opening(&mut follow).await;
        h.resets.send_modify(|e| *e += 1);
        assert!(follow.next().await.is_some(), "a last event");
        assert!(follow.next().await.is_none(), "then the stream ends");
        assert_eq!(closed(&h.metrics, "bucket_reset"), 1);
        assert_eq!(closed(&h.metrics, "token_expired"), 0);
    }

    #[tokio::test]
    async fn a_token_that_expired_before_the_opening_gets_none_of_it() {
        let (mut follow, _, h) = stream(Duration::ZERO);
        assert!(follow.next().await.is_some(), "the token_expired event");
        assert!(follow.next().await.is_none(), "and no opening");
        assert_eq!(closed(&h.metrics, "token_expired"), 1);
        assert_eq!(h.metrics.stream_events.get(), 0);
    }

    #[tokio::test]
    async fn an_end_signal_stops_a_stream_in_its_opening_and_while_it_waits() {
        // Stopping in the middle of the opening: nothing more is sent.
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        assert!(follow.next().await.is_some(), "the first opening event");
        h.stopping.send_replace(true);
        assert!(follow.next().await.is_none(), "the rest is not sent");
        // A reset in the middle of the opening: the client is told, and
        // gets none of the stale snapshot's other events.
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        assert!(follow.next().await.is_some(), "the first opening event");
        h.resets.send_modify(|e| *e += 1);
        assert!(follow.next().await.is_some(), "the reset event");
        assert!(follow.next().await.is_none(), "then the stream ends");
        assert_eq!(closed(&h.metrics, "bucket_reset"), 1);
        // Stopping while the stream waits for a change.
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        opening(&mut follow).await;
        let stop = async {
            tokio::task::yield_now().await;
            h.stopping.send_replace(true);
        };
        let (next, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(follow.next(), stop)
        })
        .await
        .expect("the waiting stream ends");
        assert!(next.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_told_its_end_is_not_also_counted_as_stalled() {
        let (mut follow, _, h) = stream(Duration::from_secs(60));
        opening(&mut follow).await;
        assert!(follow.next().await.is_some(), "the token_expired event");
        assert!(follow.next().await.is_none());
        h.stall.set();
        drop(follow);
        assert_eq!(closed(&h.metrics, "token_expired"), 1);
        assert_eq!(closed(&h.metrics, "send_timeout"), 0);
    }

    #[tokio::test]
    async fn a_stream_that_fell_behind_the_feed_ends_lagged() {
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        // One more change of `a` than its queue holds, before it reads any.
        for revision in 10..27 {
            h.feed.send(change_of_a(revision));
        }
        opening(&mut follow).await;
        assert!(follow.next().await.is_some(), "the lagged error");
        assert!(follow.next().await.is_none(), "then the stream ends");
        assert_eq!(h.metrics.streams_lagged.get(), 1);
    }

    #[tokio::test]
    async fn a_stream_dropped_for_its_send_timeout_is_counted_as_such() {
        // The client left: not a send timeout.
        let (follow, _, h) = stream(Duration::from_secs(3600));
        drop(follow);
        assert_eq!(closed(&h.metrics, "send_timeout"), 0);
        // The server gave up on a client that stopped reading.
        let (mut follow, _, h) = stream(Duration::from_secs(3600));
        opening(&mut follow).await;
        h.stall.set();
        drop(follow);
        assert_eq!(closed(&h.metrics, "send_timeout"), 1);
    }
}
