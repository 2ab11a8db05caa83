//! The access log and the request metrics, as one tower layer around every
//! route. A plain layer rather than `middleware::from_fn`: no boxed inner
//! service to clone and no boxed future per request.

use crate::metrics::Metrics;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;
use pin_project_lite::pin_project;
use prometheus::{HistogramVec, IntCounterVec};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;
use tower::{Layer, Service};

/// Counts and times every request by route, method and status, and writes
/// the debug-level access line.
#[derive(Clone)]
pub struct TrackLayer {
    series: Arc<Series>,
}

/// The two metric families a request updates; shared, so a request holds
/// one reference rather than a copy of every handle.
struct Series {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl TrackLayer {
    /// Records into the HTTP families of `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        TrackLayer {
            series: Arc::new(Series {
                requests: metrics.http_requests.clone(),
                duration: metrics.http_duration.clone(),
            }),
        }
    }
}

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            series: self.series.clone(),
        }
    }
}

/// [`TrackLayer`] around one route.
#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    series: Arc<Series>,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // `MatchedPath` is a shared string: cloning it allocates nothing.
        let route = match request.extensions().get::<MatchedPath>() {
            Some(matched) => RouteName::Matched(matched.clone()),
            None => RouteName::Named("unmatched"),
        };
        let record = Record::start(route, &request, &self.series);
        Tracked {
            inner: self.inner.call(request),
            record: Some(record),
        }
    }
}

impl TrackLayer {
    /// Starts the record of a request answered outside the router, under
    /// the name of the route that would have answered it.
    pub(super) fn start(&self, route: &'static str, request: &Request) -> Record {
        Record::start(RouteName::Named(route), request, &self.series)
    }
}

pin_project! {
    /// A route's answer, recorded when it is ready.
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

/// What a request's metrics and log line need once its answer is ready.
pub(super) struct Record {
    started: Instant,
    route: RouteName,
    method: &'static str,
    target: Option<String>,
    series: Arc<Series>,
}

/// The `route` label: the pattern the router matched, or a fixed name.
enum RouteName {
    Matched(MatchedPath),
    Named(&'static str),
}

impl RouteName {
    fn as_str(&self) -> &str {
        match self {
            RouteName::Matched(matched) => matched.as_str(),
            RouteName::Named(name) => name,
        }
    }
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(record)) = (&result, this.record.take()) {
            record.finish(response);
        }
        Poll::Ready(result)
    }
}

impl Record {
    fn start(route: RouteName, request: &Request, series: &Arc<Series>) -> Self {
        // The access log (debug level) names the path and a redacted query.
        let target = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let uri = request.uri();
            match uri.query() {
                Some(q) => format!("{}?{}", uri.path(), redacted_query(q)),
                None => uri.path().to_owned(),
            }
        });
        Record {
            started: Instant::now(),
            route,
            method: method_label(request.method()),
            target,
            series: series.clone(),
        }
    }

    /// Records the answer's status and the time it took.
    pub(super) fn finish(self, response: &Response) {
        let elapsed = self.started.elapsed();
        // A static string for every status code: no allocation per request.
        let status = response.status();
        if let Some(target) = self.target {
            tracing::debug!(
                method = self.method,
                %target,
                status = status.as_u16(),
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "request"
            );
        }
        let route = self.route.as_str();
        self.series
            .requests
            .with_label_values(&[route, self.method, status.as_str()])
            .inc();
        self.series
            .duration
            .with_label_values(&[route, status.as_str()])
            .observe(elapsed.as_secs_f64());
    }
}

/// The `method` label of a request: the standard methods by name, anything
/// else as `other`, so clients can't create label values (and series) at will.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// Query parameters whose values are secrets: never logged.
const SECRET_PARAMS: &[&str] = &["access_token"];

/// `query` fit for a log line: the value of every secret parameter (a
/// stream token, RFC 6750 §2.3) replaced by `REDACTED`, whatever its case
/// or encoding of the name.
pub fn redacted_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            let decoded = percent_decoded(name);
            if SECRET_PARAMS
                .iter()
                .any(|s| decoded.eq_ignore_ascii_case(s))
            {
                format!("{name}=REDACTED")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A query parameter name as the query parser sees it (`%XX` and `+`
/// decoded), so no spelling of a secret name escapes redaction.
fn percent_decoded(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn secret_query_values_never_reach_a_log_line() {
        assert_eq!(
            redacted_query("users=ann,bob&access_token=eyJ.secret&lastEventId=7"),
            "users=ann,bob&access_token=REDACTED&lastEventId=7"
        );
        for spelling in [
            "ACCESS_TOKEN",
            "access%5Ftoken",
            "%61ccess_token",
            "access%5ftoken",
        ] {
            let redacted = redacted_query(&format!("{spelling}=eyJ.secret"));
            assert!(!redacted.contains("secret"), "{spelling}: {redacted}");
        }
        assert_eq!(redacted_query("users=ann"), "users=ann");
        assert_eq!(redacted_query("access_token"), "access_token=REDACTED");
    }

    proptest! {
        #[test]
        fn redaction_keeps_every_other_parameter(
            pairs in prop::collection::vec(("[a-z]{1,8}", "[a-zA-Z0-9.%-]{0,12}"), 0..6),
            secret in "[a-zA-Z0-9._-]{1,40}",
        ) {
            let mut query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            query.push(format!("access_token={secret}"));
            let redacted = redacted_query(&query.join("&"));
            let kept: Vec<&str> = redacted.split('&').collect();
            prop_assert_eq!(kept.len(), query.len());
            prop_assert_eq!(*kept.last().unwrap_or(&""), "access_token=REDACTED");
            for (got, sent) in kept.iter().zip(&query[..query.len() - 1]) {
                prop_assert_eq!(*got, sent.as_str());
            }
        }
    }

    #[test]
    fn method_labels_are_a_closed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        let made_up = Method::from_bytes(b"FOO1").expect("a token");
        assert_eq!(method_label(&made_up), "other");
    }
}
