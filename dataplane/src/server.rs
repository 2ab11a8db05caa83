//! The HTTP server: our own accept loop over hyper's HTTP/1 connections.
//!
//! `axum::serve` runs hyper without a timer, so hyper's header-read timeout
//! is off, and it has no idle timeout or connection cap: a client could hold
//! a connection forever with half a request head, and open as many as it
//! liked. Here every connection has
//!
//! - hyper's header-read timeout (`HTTP_HEADER_READ_TIMEOUT_SECS`), which
//!   also runs while a kept-alive connection waits for its next request;
//! - a keep-alive timeout (`HTTP_KEEPALIVE_TIMEOUT_SECS`): no request in
//!   flight and nothing read for that long, and the connection is closed;
//! - a send timeout (`HTTP_SEND_TIMEOUT_SECS`): when the client stops
//!   reading and the node's writes stay blocked that long, the connection
//!   is dropped at once (a graceful close would wait for the same writes);
//! - a place under the node's cap (`HTTP_MAX_CONNECTIONS`); a connection
//!   beyond it is answered `503` and closed, except that a few more
//!   ([`PROBE_PLACES`]) may each ask one health probe: the kubelet's
//!   liveness probe must not fail, and restart the pod with every stream
//!   it holds, because clients hold every place.
//!
//! Graceful shutdown: once `stopping` is set the listener is closed, each
//! connection finishes its current response and closes, and [`serve`]
//! returns when the last one is gone.

use crate::config::HttpLimits;
use crate::metrics::Metrics;
use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use futures::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounterVec, IntGauge};
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::{Service, ServiceExt};

/// What the server hands each request to: the API's front (a router, or
/// what stands in front of one).
pub trait Handler:
    Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send + 'static
{
}

impl<S> Handler for S where
    S: Service<Request, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// Connections beyond `HTTP_MAX_CONNECTIONS` that are served one health
/// probe (`/health...`) each; anything else on them gets the cap's `503`.
pub const PROBE_PLACES: usize = 8;

/// How long a connection in a probe place may take to send its request:
/// the kubelet sends at once, and a client that holds the place idle or
/// trickles its head would keep the probes out.
const PROBE_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves `api` on `listener` until `stopping` turns true, then waits
/// for the open connections to finish (the caller bounds that wait).
pub async fn serve<A: Handler>(
    listener: TcpListener,
    api: A,
    limits: HttpLimits,
    metrics: Metrics,
    mut stopping: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let probe_places = Arc::new(Semaphore::new(PROBE_PLACES));
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|s| *s) => break,
        };
        let socket = match accepted {
            Ok((socket, _peer)) => socket,
            Err(err) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a little instead of spinning.
                if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %err, "cannot accept a connection");
                    last_accept_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let connection = |place, limits, keep_alive| Connection {
            limits,
            metrics: metrics.clone(),
            stopping: stopping.clone(),
            activity: Arc::new(Activity::new()),
            keep_alive,
            _place: place,
        };
        if let Ok(place) = places.clone().try_acquire_owned() {
            tokio::spawn(connection(place, limits, true).serve(socket, api.clone()));
        } else if let Ok(place) = probe_places.clone().try_acquire_owned() {
            let probes = ProbesOnly {
                api: api.clone(),
                refused: metrics.http_connections_refused.clone(),
            };
            let probe_limits = HttpLimits {
                header_read_timeout: limits.header_read_timeout.min(PROBE_HEAD_TIMEOUT),
                ..limits
            };
            tokio::spawn(connection(place, probe_limits, false).serve(socket, probes));
        } else {
            metrics.http_connections_refused.inc();
            tokio::spawn(refuse(socket));
        }
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = places.acquire_many(all).await;
    let _ = probe_places.acquire_many(PROBE_PLACES as u32).await;
}

/// The cap's refusal, as a body.
const TOO_MANY_CONNECTIONS: &str = r#"{"error":{"code":"too_many_connections","message":"this node holds HTTP_MAX_CONNECTIONS connections; retry later or on another node"}}"#;

/// The API on a connection beyond the cap: health probes only; anything
/// else counts as a refused connection.
#[derive(Clone)]
struct ProbesOnly<A> {
    api: A,
    refused: prometheus::IntCounter,
}

impl<A: Handler> Service<Request> for ProbesOnly<A> {
    type Response = Response;
    type Error = Infallible;
    type Future =
        futures::future::Either<A::Future, std::future::Ready<Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.api.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if request.uri().path().starts_with("/health") {
            return futures::future::Either::Left(self.api.call(request));
        }
        self.refused.inc();
        use axum::http::{HeaderValue, StatusCode, header};
        let mut refusal = Response::new(Body::from(TOO_MANY_CONNECTIONS));
        *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = refusal.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        futures::future::Either::Right(std::future::ready(Ok(refusal)))
    }
}

/// Tells a connection beyond the cap to come back later, and closes it.
async fn refuse(mut socket: TcpStream) {
    let body = TOO_MANY_CONNECTIONS;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Bounded: a client that reads nothing can't keep this task alive.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        socket.write_all(answer.as_bytes()).await?;
        socket.shutdown().await?;
        // Read what the client sent until it closes, so closing our end
        // doesn't reset the connection before it read the answer.
        let mut sink = [0u8; 4096];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// One accepted connection and what it may cost.
struct Connection {
    limits: HttpLimits,
    metrics: Metrics,
    stopping: watch::Receiver<bool>,
    activity: Arc<Activity>,
    /// Off for a connection beyond the cap: one probe, then it closes.
    keep_alive: bool,
    /// Its place under the cap, given back when the connection ends.
    _place: OwnedSemaphorePermit,
}

/// What the watchdog decided about a connection.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Idle past the keep-alive timeout: close it gracefully.
    Idle,
    /// The client hasn't read for the send timeout: drop it.
    Stalled,
}

impl Connection {
    async fn serve<A: Handler>(self, socket: TcpStream, api: A) {
        let Connection {
            limits,
            metrics,
            stopping,
            activity,
            keep_alive,
            _place,
        } = self;
        let _open = OpenConnection::count(&metrics.http_connections_open);
        let _ = socket.set_nodelay(true);
        let io = TokioIo::new(Tracked {
            inner: socket,
            activity: activity.clone(),
        });
        let service = PerConnection {
            api,
            activity: activity.clone(),
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(keep_alive);
        let connection = http.serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let orders = Arc::new(Orders::default());
        let timed_out = metrics.http_connections_timed_out.clone();
        let _watchdog = AbortOnDrop(tokio::spawn(watch_over(
            activity,
            limits,
            stopping,
            orders.clone(),
            timed_out.clone(),
        )));
        let mut handled = CARRY_ON;
        loop {
            tokio::select! {
                biased;
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        if err.is_timeout() {
                            timed_out.with_label_values(&["header"]).inc();
                        } else {
                            tracing::debug!(error = %err, "HTTP connection ended with an error");
                        }
                    }
                    break;
                }
                order = orders.next(handled) => {
                    handled = order;
                    if order == DROP {
                        break;
                    }
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A connection's watchdog, a task of its own: it closes the connection
/// when the node stops or the connection idles past its keep-alive, and
/// drops it when its client stops reading. Apart from the connection's
/// task, so that a request's wake-up polls only the connection, not the
/// node's stop signal (whose poll takes a lock shared by every
/// connection) and a timer.
async fn watch_over(
    activity: Arc<Activity>,
    limits: HttpLimits,
    mut stopping: watch::Receiver<bool>,
    orders: Arc<Orders>,
    timed_out: IntCounterVec,
) {
    let mut closing = false;
    loop {
        let check = tokio::time::sleep(activity.next_check(&limits));
        tokio::select! {
            _ = stopping.wait_for(|s| *s), if !closing => {
                closing = true;
                orders.give(CLOSE);
            }
            () = check => match activity.verdict(&limits) {
                Verdict::Fine => {}
                Verdict::Idle if closing => {}
                Verdict::Idle => {
                    timed_out.with_label_values(&["keepalive"]).inc();
                    closing = true;
                    orders.give(CLOSE);
                }
                Verdict::Stalled => {
                    timed_out.with_label_values(&["send"]).inc();
                    activity.stalled.store(true, Ordering::Release);
                    orders.give(DROP);
                    return;
                }
            },
        }
    }
}

/// No order from the watchdog yet.
const CARRY_ON: u8 = 0;
/// Finish the response in flight, then close.
const CLOSE: u8 = 1;
/// Drop the connection now.
const DROP: u8 = 2;

/// What a connection's watchdog asks of it; an order is only ever raised.
#[derive(Default)]
struct Orders {
    order: AtomicU8,
    waker: AtomicWaker,
}

impl Orders {
    fn give(&self, order: u8) {
        self.order.fetch_max(order, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The order, once it is above `handled`.
    fn next(&self, handled: u8) -> impl Future<Output = u8> + '_ {
        std::future::poll_fn(move |cx| {
            self.waker.register(cx.waker());
            match self.order.load(Ordering::Acquire) {
                order if order > handled => Poll::Ready(order),
                _ => Poll::Pending,
            }
        })
    }
}

/// Ends a task when its owner is gone.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a connection as open for as long as it is served, however its
/// task ends: a handler's panic unwinds through it too.
struct OpenConnection(IntGauge);

impl OpenConnection {
    fn count(gauge: &IntGauge) -> Self {
        gauge.inc();
        OpenConnection(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What one connection is doing, for its watchdog. Times are milliseconds
/// since `origin`; `NEVER` marks "not now".
struct Activity {
    origin: Instant,
    /// Requests whose response has not been sent completely.
    in_flight: AtomicUsize,
    /// When the connection last became idle (accepted, or a response done).
    idle_since: AtomicU64,
    /// When bytes were last read from the client.
    last_read: AtomicU64,
    /// Since when writes find the socket full (the client doesn't read).
    blocked_since: AtomicU64,
    /// Set when the watchdog drops the connection for its send timeout,
    /// before the response in flight is dropped.
    stalled: AtomicBool,
}

const NEVER: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            last_read: AtomicU64::new(0),
            blocked_since: AtomicU64::new(NEVER),
            stalled: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn read(&self) {
        self.last_read.store(self.now(), Ordering::Relaxed);
    }

    fn wrote(&self, went_through: bool) {
        if went_through {
            self.blocked_since.store(NEVER, Ordering::Relaxed);
        } else if self.blocked_since.load(Ordering::Relaxed) == NEVER {
            self.blocked_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Since when nothing happened on an idle connection, if it is idle.
    fn quiet_since(&self) -> Option<u64> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| {
            let idle = self.idle_since.load(Ordering::Acquire);
            idle.max(self.last_read.load(Ordering::Relaxed))
        })
    }

    fn verdict(&self, limits: &HttpLimits) -> Verdict {
        let now = self.now();
        let blocked = self.blocked_since.load(Ordering::Relaxed);
        if blocked != NEVER && now.saturating_sub(blocked) >= millis(limits.send_timeout) {
            return Verdict::Stalled;
        }
        match self.quiet_since() {
            Some(quiet) if now.saturating_sub(quiet) >= millis(limits.keepalive_timeout) => {
                Verdict::Idle
            }
            _ => Verdict::Fine,
        }
    }

    /// When the verdict could next change: at the keep-alive deadline of an
    /// idle connection, and a quarter of the send timeout apart otherwise
    /// (so a stalled client is noticed within 1.25 times the timeout).
    fn next_check(&self, limits: &HttpLimits) -> Duration {
        let mut wait = limits.send_timeout / 4;
        if let Some(quiet) = self.quiet_since() {
            let deadline = quiet.saturating_add(millis(limits.keepalive_timeout));
            wait = wait.min(Duration::from_millis(deadline.saturating_sub(self.now())));
        }
        wait.max(Duration::from_millis(10))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(NEVER - 1)
}

/// A request in flight on a connection; the response body carries it, so
/// the connection counts as busy until the whole response went out.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.now();
        self.0.idle_since.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The API for one connection, marking each request in flight.
#[derive(Clone)]
struct PerConnection<A> {
    api: A,
    activity: Arc<Activity>,
}

impl<A: Handler> hyper::service::Service<Request<Incoming>> for PerConnection<A> {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let busy = InFlight::new(self.activity.clone());
        let api = self.api.clone();
        Box::pin(async move {
            let mut response = api.oneshot(request.map(Body::new)).await?;
            let notice = response.extensions_mut().remove::<StallNotice>();
            Ok(response.map(|body| Body::new(Guarded { body, busy, notice })))
        })
    }
}

/// Lets a response that lasts as long as its client reads (a change
/// stream) tell, once its body is dropped, whether that was because the
/// node gave up on a client that stopped reading (the send timeout) rather
/// than the client leaving. Put a clone in the response's extensions; the
/// server sets it before it drops the body.
#[derive(Clone, Default)]
pub struct StallNotice(Arc<AtomicBool>);

impl StallNotice {
    /// Whether the connection was dropped for its send timeout.
    pub fn stalled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Says the connection was dropped for its send timeout.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct Guarded {
    body: Body,
    busy: InFlight,
    notice: Option<StallNotice>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Runs before `body` is dropped, so the body's own drop reads it.
        if let Some(notice) = &self.notice
            && self.busy.0.stalled.load(Ordering::Acquire)
        {
            notice.set();
        }
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket, noting reads and blocked writes for the watchdog.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.wrote(poll.is_ready());
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.wrote(poll.is_ready());
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HttpLimits = HttpLimits {
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(5),
        max_connections: 10,
        send_timeout: Duration::from_secs(30),
    };

    /// A connection whose task panics (a handler's bug) is no longer
    /// counted as open.
    #[test]
    fn a_connection_that_panicked_is_not_counted_open() {
        let open = IntGauge::new("open", "open").expect("gauge");
        let _held = OpenConnection::count(&open);
        let panicked = std::panic::catch_unwind(|| {
            let _served = OpenConnection::count(&open);
            assert_eq!(open.get(), 2);
            panic!("a handler's bug");
        });
        assert!(panicked.is_err());
        assert_eq!(open.get(), 1);
    }

    fn at(activity: &mut Activity, millis_ago: u64) {
        activity.origin = Instant::now() - Duration::from_millis(millis_ago);
    }

    /// A response body that notes, when dropped, whether its stall notice
    /// was set by then.
    struct Probe {
        notice: StallNotice,
        saw_stall: Arc<AtomicBool>,
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.saw_stall
                .store(self.notice.stalled(), Ordering::Release);
        }
    }

    fn guarded_probe(activity: &Arc<Activity>) -> (Guarded, Arc<AtomicBool>) {
        let notice = StallNotice::default();
        let saw_stall = Arc::new(AtomicBool::new(false));
        let probe = Probe {
            notice: notice.clone(),
            saw_stall: saw_stall.clone(),
        };
        let body = Body::from_stream(futures::stream::unfold(probe, |_probe| async move {
            None::<(Result<Bytes, Infallible>, Probe)>
        }));
        let guarded = Guarded {
            body,
            busy: InFlight::new(activity.clone()),
            notice: Some(notice),
        };
        (guarded, saw_stall)
    }

    #[test]
    fn a_body_dropped_for_the_send_timeout_knows_it_when_it_is_dropped() {
        let activity = Arc::new(Activity::new());
        let (guarded, saw_stall) = guarded_probe(&activity);
        drop(guarded);
        assert!(!saw_stall.load(Ordering::Acquire), "a client that left");
        let (guarded, saw_stall) = guarded_probe(&activity);
        activity.stalled.store(true, Ordering::Release);
        drop(guarded);
        assert!(saw_stall.load(Ordering::Acquire), "the watchdog gave up");
    }

    /// The watchdog's orders reach the connection's task, each once, and
    /// only upwards.
    #[tokio::test]
    async fn orders_wake_the_connection_once_each() {
        use futures::FutureExt;
        let orders = Orders::default();
        assert_eq!(orders.next(CARRY_ON).now_or_never(), None);
        orders.give(CLOSE);
        assert_eq!(orders.next(CARRY_ON).await, CLOSE);
        assert_eq!(orders.next(CLOSE).now_or_never(), None, "handled already");
        let (waiting, _) = tokio::join!(orders.next(CLOSE), async { orders.give(DROP) });
        assert_eq!(waiting, DROP);
        orders.give(CLOSE);
        assert_eq!(orders.next(CLOSE).await, DROP, "never lowered");
    }

    #[test]
    fn idle_stalled_and_busy_connections() {
        let mut activity = Activity::new();
        assert_eq!(activity.verdict(&LIMITS), Verdict::Fine);
        // Accepted 6 s ago and nothing since: idle past the keep-alive.
        at(&mut activity, 6_000);
        assert_eq!(activity.verdict(&LIMITS), Verdict::Idle);
        // A request in flight is never idle, however long it takes...
        let activity = Arc::new(activity);
        let busy = InFlight::new(activity.clone());
        assert_eq!(activity.verdict(&LIMITS), Verdict::Fine);
        assert_eq!(activity.next_check(&LIMITS), LIMITS.send_timeout / 4);
        // ...unless its client stops reading for the send timeout.
        activity.blocked_since.store(0, Ordering::Relaxed);
        let mut stalled = Activity::new();
        at(&mut stalled, 31_000);
        stalled.in_flight.store(1, Ordering::Relaxed);
        stalled.blocked_since.store(0, Ordering::Relaxed);
        assert_eq!(stalled.verdict(&LIMITS), Verdict::Stalled);
        stalled.wrote(true);
        assert_eq!(stalled.verdict(&LIMITS), Verdict::Fine);
        // A finished response starts the keep-alive clock again.
        drop(busy);
        activity.blocked_since.store(NEVER, Ordering::Relaxed);
        assert_eq!(activity.verdict(&LIMITS), Verdict::Fine);
        assert!(activity.next_check(&LIMITS) <= LIMITS.keepalive_timeout);
    }
}
