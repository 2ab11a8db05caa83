//! CORS for browsers only: a request without `Origin` is never a browser's
//! cross-origin request, so it skips the CORS layer's per-request work
//! (about 15% of a cached read's CPU, measured with `wrk` in #17).
//! In-cluster callers send no `Origin`; browsers always do.

use crate::config::CorsSettings;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::Response;
use futures::future::Either;
use std::task::{Context, Poll};
use tower::Layer;
use tower::Service;
use tower::util::{MapResponse, MapResponseLayer};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

/// Applies the configured CORS policy to requests that carry `Origin`.
#[derive(Clone)]
pub struct ForBrowsers {
    cors: CorsLayer,
}

impl ForBrowsers {
    /// The layer for the validated CORS settings.
    pub fn new(settings: &CorsSettings) -> Self {
        ForBrowsers {
            cors: cors_layer(settings),
        }
    }
}

/// An answer without CORS headers still depends on `Origin`: it says
/// `Vary: Origin`, so no cache hands it to a browser's cross-origin request.
type AddVary = fn(Response) -> Response;

pub(super) fn vary_on_origin(mut response: Response) -> Response {
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("origin"));
    response
}

impl<S: Clone> Layer<S> for ForBrowsers {
    type Service = ForBrowsersService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ForBrowsersService {
            cors: self.cors.layer(inner.clone()),
            plain: MapResponseLayer::new(vary_on_origin as AddVary).layer(inner),
        }
    }
}

/// [`ForBrowsers`] around one service.
#[derive(Clone)]
pub struct ForBrowsersService<S> {
    cors: Cors<S>,
    plain: MapResponse<S, AddVary>,
}

impl<S> Service<Request> for ForBrowsersService<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<
        tower_http::cors::ResponseFuture<S::Future>,
        <MapResponse<S, AddVary> as Service<Request>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both wrap clones of one inner service; whichever `call` picks
        // must have been polled ready.
        match self.cors.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.plain.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if request.headers().contains_key(header::ORIGIN) {
            Either::Left(self.cors.call(request))
        } else {
            Either::Right(self.plain.call(request))
        }
    }
}

fn cors_layer(cors: &CorsSettings) -> CorsLayer {
    let origin = match &cors.allowed_origins {
        None => AllowOrigin::any(),
        Some(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods(
            cors.allowed_methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect::<Vec<_>>(),
        )
        .allow_credentials(cors.allow_credentials)
        .max_age(cors.max_age)
        // Resuming a stream sends Last-Event-ID; a client backing off
        // reads Retry-After. Both whatever CORS_ALLOWED_HEADERS says.
        .allow_headers(
            cors.allowed_headers
                .iter()
                .map(String::as_str)
                .chain(["Last-Event-ID"])
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect::<Vec<_>>(),
        )
        .expose_headers([header::RETRY_AFTER])
}
