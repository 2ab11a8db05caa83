//! The service's HTTP front: `GET /api/v2/presence/{userID}`, the call
//! clients make most, answered in front of the router, and every other
//! request handed to the router.
//!
//! A cached read is a byte copy, so what the router does around it (a
//! dozen nested route and layer futures, the matched-path lookup, the
//! boxed route, the path extractor) was most of its CPU in profiles (#17).
//! The front runs the same handler code ([`super::presence`]'s lookup, the
//! same authentication, the same error answers, the same metrics under the
//! route's name) for the requests it can tell apart from a path alone, and
//! leaves to the router anything it would treat differently: other
//! methods, an `Origin` header (CORS), a percent-encoded ID, the
//! `batch` and `stream` routes.

use super::track::TrackLayer;
use super::{caller_of, cors, presence};
use crate::AppState;
use axum::Router;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use futures::future::{BoxFuture, Either};
use std::convert::Infallible;
use std::task::{Context, Poll};
use tower::Service;

/// The route the front answers, named as the router names it in metrics.
pub const ONE_PRESENCE: &str = "/api/v2/presence/{user_id}";

/// The path before a user's ID in [`ONE_PRESENCE`].
const PREFIX: &str = "/api/v2/presence/";

/// Every route, with the cached read in front (see the module docs).
#[derive(Clone)]
pub struct Front {
    state: AppState,
    router: Router,
    track: TrackLayer,
    /// The router adds `Vary: origin` to every answer when CORS is on.
    vary_origin: bool,
}

impl Front {
    /// The front of `router`, which serves `state`.
    pub fn new(state: AppState, router: Router) -> Self {
        Front {
            track: TrackLayer::new(&state.metrics),
            vary_origin: state.settings.cors.is_some(),
            state,
            router,
        }
    }
}

/// The user ID of a request the front answers: a `GET` of one user's
/// presence, whose path the router would match to [`ONE_PRESENCE`] and
/// decode to itself, from a caller that sent no `Origin`.
fn one_presence(request: &Request) -> Option<&str> {
    if request.method() != Method::GET || request.headers().contains_key(header::ORIGIN) {
        return None;
    }
    let id = request.uri().path().strip_prefix(PREFIX)?;
    let routed_elsewhere = matches!(id, "" | "batch" | "stream");
    (!routed_elsewhere && !id.contains(['/', '%'])).then_some(id)
}

impl Service<Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        BoxFuture<'static, Result<Response, Infallible>>,
        <Router as Service<Request>>::Future,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready, and so is the front.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if one_presence(&request).is_none() {
            return Either::Right(self.router.call(request));
        }
        let record = self.track.start(ONE_PRESENCE, &request);
        let (state, vary_origin) = (self.state.clone(), self.vary_origin);
        // A GET's body is never read here, as the router never reads it.
        let (request, _body) = request.into_parts();
        Either::Left(Box::pin(async move {
            let mut response = answer(&state, &request).await;
            if vary_origin {
                response = cors::vary_on_origin(response);
            }
            record.finish(&response);
            Ok(response)
        }))
    }
}

/// What `presence::get_one` answers, through the same steps in the same
/// order: the caller first, then the ID.
async fn answer(state: &AppState, request: &Parts) -> Response {
    // The front took the request for its path: the ID follows the prefix.
    let user_id = request.uri.path().get(PREFIX.len()..).unwrap_or_default();
    match caller_of(&request.headers, state) {
        Ok(_) => presence::lookup(state, user_id).await.into_response(),
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{HeaderValue, StatusCode};
    use tower::ServiceExt;

    const SECRET: &str = "front-test-secret";

    async fn state(cors: &str) -> AppState {
        let settings = crate::fixtures::memory_settings(SECRET, &["--cors-enabled", cors]);
        crate::build(settings).await.expect("state")
    }

    fn token(sub: &str) -> String {
        crate::auth::mint(SECRET, sub, "presence:write", 3600).expect("token")
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = axum::http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            let value = HeaderValue::from_bytes(value.as_bytes()).expect("header value");
            builder = builder.header(*name, value);
        }
        builder.body(Body::empty()).expect("request")
    }

    /// Status, headers and body, for comparing two answers whole. The
    /// router writes `Content-Length` itself, and hyper writes it from the
    /// body's exact size where nobody did: the same on the wire, so it is
    /// checked against the body and left out of the comparison.
    async fn whole(response: Response) -> (StatusCode, Vec<(String, String)>, String) {
        let status = response.status();
        let mut headers: Vec<_> = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().expect("ASCII").to_owned()))
            .collect();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        headers.retain(|(name, value)| {
            let length = name == "content-length";
            assert!(!length || *value == body.len().to_string(), "{value}");
            !length
        });
        headers.sort();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    fn counted(state: &AppState, status: &str) -> u64 {
        state
            .metrics
            .http_requests
            .with_label_values(&[ONE_PRESENCE, "GET", status])
            .get()
    }

    #[test]
    fn takes_only_what_the_router_would_answer_with_get_one() {
        let get = |uri: &str| request("GET", uri, &[]);
        assert_eq!(one_presence(&get("/api/v2/presence/ann")), Some("ann"));
        assert_eq!(one_presence(&get("/api/v2/presence/ann?x=1")), Some("ann"));
        for uri in [
            "/api/v2/presence/",
            "/api/v2/presence",
            "/api/v2/presence/batch",
            "/api/v2/presence/stream",
            "/api/v2/presence/a%20b",
            "/api/v2/presence/ann/sessions/tab",
            "/api/v2/presence/ann/",
            "/api/v2/presencex/ann",
            "/health",
        ] {
            assert_eq!(one_presence(&get(uri)), None, "{uri}");
        }
        for method in ["POST", "HEAD", "PUT", "DELETE", "OPTIONS"] {
            let other = request(method, "/api/v2/presence/ann", &[]);
            assert_eq!(one_presence(&other), None, "{method}");
        }
        let browser = request(
            "GET",
            "/api/v2/presence/ann",
            &[("origin", "https://app.example")],
        );
        assert_eq!(one_presence(&browser), None, "CORS is the router's");
    }

    /// Every read the front answers, it answers as the router does: the
    /// same status, headers and body, counted under the same route.
    #[tokio::test]
    async fn answers_exactly_as_the_router_does() {
        for cors in ["true", "false"] {
            let state = state(cors).await;
            let router = super::super::router(state.clone());
            let front = Front::new(state.clone(), router.clone());
            let ann = format!("Bearer {}", token("ann"));
            let set = request("POST", "/api/v2/presence/ann", &[("authorization", &ann)]);
            let set = set.map(|_| Body::from(r#"{"status":"busy","message":"in a meeting"}"#));
            let set = router.clone().oneshot(set).await.expect("infallible");
            assert_eq!(set.status(), StatusCode::OK);
            let long = format!("/api/v2/presence/{}", "x".repeat(300));
            // IDs the front takes that a router might treat otherwise.
            let odd: Vec<String> = ["..", "a+b", "batchx", "stream.x", "~ann", "a;b"]
                .iter()
                .map(|id| format!("/api/v2/presence/{id}"))
                .collect();
            let mut cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
                ("/api/v2/presence/ann", vec![("authorization", &ann)]),
                (
                    "/api/v2/presence/ann?ignored=1",
                    vec![("authorization", &ann)],
                ),
                ("/api/v2/presence/nobody", vec![("authorization", &ann)]),
                (&long, vec![("authorization", &ann)]),
                ("/api/v2/presence/ann", vec![]),
                ("/api/v2/presence/ann", vec![("authorization", "Basic abc")]),
                (
                    "/api/v2/presence/ann",
                    vec![("authorization", "Bearer not-a-jwt")],
                ),
                (
                    "/api/v2/presence/ann",
                    vec![("authorization", "Bearer \u{e9}")],
                ),
            ];
            for uri in &odd {
                cases.push((uri, vec![("authorization", &ann)]));
            }
            for (uri, headers) in &cases {
                assert!(
                    one_presence(&request("GET", uri, headers)).is_some(),
                    "the front takes {uri}"
                );
                let expected = router.clone().oneshot(request("GET", uri, headers)).await;
                let expected = whole(expected.expect("infallible")).await;
                let status = expected.0.as_str().to_owned();
                let before = counted(&state, &status);
                let got = front.clone().oneshot(request("GET", uri, headers)).await;
                let got = whole(got.expect("infallible")).await;
                assert_eq!(got, expected, "{uri} {headers:?} (CORS {cors})");
                assert_eq!(counted(&state, &status), before + 1, "{uri} counted once");
            }
        }
    }

    /// What the front does not take still reaches every route.
    #[tokio::test]
    async fn hands_everything_else_to_the_router() {
        let state = state("true").await;
        let front = Front::new(state.clone(), super::super::router(state));
        let health = front
            .clone()
            .oneshot(request("GET", "/health/liveness", &[]));
        assert_eq!(health.await.expect("infallible").status(), StatusCode::OK);
        let browser = request(
            "GET",
            "/api/v2/presence/ann",
            &[("origin", "https://app.example")],
        );
        let browser = front.clone().oneshot(browser).await.expect("infallible");
        assert!(
            browser
                .headers()
                .contains_key("access-control-allow-origin"),
            "CORS answered: {:?}",
            browser.headers()
        );
    }
}
