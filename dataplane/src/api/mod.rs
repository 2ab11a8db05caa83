//! The HTTP API: routes, the JSON error shape, extractors that turn bad input
//! into those errors, CORS, body limits and request metrics.

mod cors;
mod front;
mod health;
mod metrics;
pub mod openapi;
mod presence;
mod sessions;
mod stream;
mod track;

pub use front::Front;
pub use track::redacted_query;

use crate::AppState;
use crate::auth::{AuthError, Caller};
use crate::model::ValidationError;
use crate::store::StoreError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// An oversized body announced up to this size, or sent without a length
/// (chunked), is read and dropped up to this size before its 413 goes
/// out: a client that writes its whole body before reading (most HTTP
/// libraries) then reads the answer, instead of a broken pipe when the
/// connection closes under the rest of its body. Larger ones are answered
/// at once (a chunked one once this much of it was read).
const DRAINED_BODY_BYTES: u64 = 4 * MAX_BODY_BYTES as u64;

/// How long such a body is read at most before the 413 goes out anyway.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// An error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    /// An error with an explicit status and stable code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client when to try again
    /// (`Retry-After`): for refusals that pass by themselves.
    pub fn retry_after(self, wait: std::time::Duration) -> Self {
        ApiError {
            retry_after: Some(wait),
            ..self
        }
    }

    /// 429 for a user written too often; says when to retry.
    pub fn rate_limited(user_id: &str, wait: std::time::Duration) -> Self {
        let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many writes for user {user_id:?}; retry in {seconds} s"),
        )
        .retry_after(std::time::Duration::from_secs(seconds))
    }
}

/// The `error` object of every error answer (and of a failed batch item).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code such as `invalid_status`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

/// Every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code,
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&wait.as_secs().to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"presence\""),
            );
        }
        response
    }
}

/// JSON serialized already (a cached presence), answered as is.
pub struct RawJson(pub bytes::Bytes);

impl IntoResponse for RawJson {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0,
        )
            .into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, err.code(), err.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, err.code(), err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let (code, message) = match err {
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %err, "unreadable stored presence");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt_record",
                    "the stored presence for this user can't be read",
                );
            }
            StoreError::Timeout(_) => (
                "store_timeout",
                format!("{err}; the write may or may not have been applied, retrying is safe"),
            ),
            StoreError::NotReady(_) | StoreError::Unavailable(_) => {
                ("store_unavailable", err.to_string())
            }
            StoreError::Conflict => (
                "write_conflict",
                "other writes for this user kept changing it first; this write was not made, retry"
                    .to_owned(),
            ),
        };
        // Each passes within seconds (a leader election at the hub, a
        // reconnect, a burst of writes), so clients are told when to look
        // again.
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
            .retry_after(std::time::Duration::from_secs(1))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        caller_of(&parts.headers, state)
    }
}

/// Who sent a request, by its `Authorization` header.
fn caller_of(headers: &HeaderMap, state: &AppState) -> Result<Caller, ApiError> {
    let header = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| AuthError::MalformedHeader)?),
    };
    Ok(state.verifier.verify_header(header)?)
}

/// A JSON body parsed by us, so every failure (size, syntax, shape) gets our
/// error codes, and a missing `Content-Type` is tolerated.
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body means `T::default()` (a heartbeat
/// needs no body at all).
pub struct JsonBodyOrEmpty<T>(pub T);

/// The request's body, whole: at most [`MAX_BODY_BYTES`], within
/// `HTTP_BODY_READ_TIMEOUT_SECS`. A client that sends a body slowly or not
/// at all would otherwise hold its connection (and a handler) forever.
async fn read_body(req: Request, state: &AppState) -> Result<bytes::Bytes, ApiError> {
    // A body announced larger than the limit is refused without waiting
    // for more of it than the client sends within a moment: waiting would
    // only end in this answer, or in a 408 when the client sends less than
    // it announced.
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let limit = state.settings.http.body_read_timeout;
    if let Some(length) = announced.filter(|&length| length > MAX_BODY_BYTES as u64) {
        if length <= DRAINED_BODY_BYTES {
            let mut body = req.into_body().into_data_stream();
            drain(&mut body, 0, limit.min(DRAIN_TIME)).await;
        }
        return Err(too_large());
    }
    let Ok(collected) = tokio::time::timeout(limit, collect(req)).await else {
        state
            .metrics
            .http_connections_timed_out
            .with_label_values(&["body"])
            .inc();
        // hyper closes a connection whose request body was left unread.
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs()
            ),
        ));
    };
    match collected {
        Collected::Whole(bytes) => Ok(bytes),
        Collected::TooLarge(mut body, read) => {
            // A body sent without a length (chunked) outgrew the limit:
            // dropped as one announced too large would be.
            drain(&mut body, read, limit.min(DRAIN_TIME)).await;
            Err(too_large())
        }
        Collected::Broken(reason) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the request body could not be read: {reason}"),
        )),
    }
}

/// A request body read up to [`MAX_BODY_BYTES`].
enum Collected {
    Whole(bytes::Bytes),
    /// Larger than the limit: the rest of the body, and how much of it was
    /// read already.
    TooLarge(axum::body::BodyDataStream, u64),
    /// The client's body broke off (or was malformed as HTTP).
    Broken(String),
}

/// Reads `req`'s body whole if it stays within [`MAX_BODY_BYTES`]. A body
/// of one chunk (the usual small JSON) is kept as it came, not copied.
async fn collect(req: Request) -> Collected {
    use futures::StreamExt as _;
    let mut body = req.into_body().into_data_stream();
    let mut first: Option<bytes::Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut read = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => return Collected::Broken(err.to_string()),
        };
        read += chunk.len();
        if read > MAX_BODY_BYTES {
            return Collected::TooLarge(body, read as u64);
        }
        match &first {
            None => first = Some(chunk),
            Some(head) => {
                if joined.is_empty() {
                    joined.extend_from_slice(head);
                }
                joined.extend_from_slice(&chunk);
            }
        }
    }
    if joined.is_empty() {
        Collected::Whole(first.unwrap_or_default())
    } else {
        Collected::Whole(joined.into())
    }
}

/// Reads and drops the rest of a body (`read` bytes of it read already)
/// until it ends, [`DRAINED_BODY_BYTES`] were read, `time` passed or the
/// client broke off (see [`DRAINED_BODY_BYTES`]).
async fn drain(body: &mut axum::body::BodyDataStream, mut read: u64, time: std::time::Duration) {
    use futures::StreamExt as _;
    let rest = async {
        while read <= DRAINED_BODY_BYTES
            && let Some(Ok(chunk)) = body.next().await
        {
            read += chunk.len() as u64;
        }
    };
    let _ = tokio::time::timeout(time, rest).await;
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds {MAX_BODY_BYTES} bytes"),
    )
}

fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "request body must be a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        parse_object(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned + Default> FromRequest<AppState> for JsonBodyOrEmpty<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBodyOrEmpty(T::default()));
        }
        parse_object(&bytes).map(JsonBodyOrEmpty)
    }
}

/// `{userID}/sessions/{sessionID}` path segments, percent-decoded.
pub struct SessionPath(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map(|p| SessionPath(p.0.0, p.0.1))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_path",
                    format!("userID or sessionID is not valid UTF-8: {}", e.body_text()),
                )
            })
    }
}

/// A `{userID}` path segment, percent-decoded.
pub struct UserIdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for UserIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| UserIdPath(p.0))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_user_id",
                    format!("userID in the path is not valid UTF-8: {}", e.body_text()),
                )
            })
    }
}

/// A query string read into `T`, refusing percent-escapes that don't
/// decode to UTF-8: the usual reader replaces such bytes with U+FFFD, which
/// would name a different user than the client sent.
pub struct StrictQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let invalid =
            |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message);
        if let Some(query) = parts.uri.query()
            && !decodes_to_utf8(query)
        {
            return Err(invalid(
                "the query string's percent-escapes do not decode to UTF-8".into(),
            ));
        }
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| StrictQuery(q.0))
            .map_err(|e| invalid(e.body_text()))
    }
}

/// Whether every name and value of `query` is UTF-8 once its `%XX`
/// escapes are decoded (a `%` without two hex digits stays as it is, as
/// form decoding leaves it).
fn decodes_to_utf8(query: &str) -> bool {
    // The query is a `str` already: only escapes can make it otherwise.
    if !query.contains('%') {
        return true;
    }
    let hex = |b: u8| char::from(b).to_digit(16);
    query.split(['&', '=']).all(|part| {
        let bytes = part.as_bytes();
        let mut decoded = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'%')
                .then(|| Some((hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?)))
                .flatten();
            match escaped {
                Some((high, low)) => {
                    // Two hex digits: at most 0xFF.
                    decoded.push((high * 16 + low) as u8);
                    i += 3;
                }
                None => {
                    decoded.push(bytes[i]);
                    i += 1;
                }
            }
        }
        std::str::from_utf8(&decoded).is_ok()
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not support that method",
    )
}

/// Every route of the service.
pub fn router(state: AppState) -> Router {
    let cors = state.settings.cors.as_ref().map(cors::ForBrowsers::new);
    let api = Router::new()
        .route("/health", get(health::health))
        .route("/health/liveness", get(health::liveness))
        .route("/health/readiness", get(health::readiness))
        .route("/metrics", get(metrics::prometheus))
        .route(openapi::OPENAPI_PATH, get(openapi::serve))
        .route("/api/v2/cache/metrics", get(metrics::cache))
        .route("/api/v2/presence", get(presence::get_many))
        .route(
            "/api/v2/presence/batch",
            post(presence::set_batch)
                .get(presence::get_user_named_batch)
                .delete(presence::clear_user_named_batch),
        )
        .route(
            "/api/v2/presence/stream",
            get(stream::open)
                .post(presence::set_user_named_stream)
                .delete(presence::clear_user_named_stream),
        )
        .route(
            front::ONE_PRESENCE,
            get(presence::get_one)
                .post(presence::set_one)
                .delete(presence::clear_one),
        )
        .route(
            "/api/v2/presence/{user_id}/sessions/{session_id}",
            put(sessions::heartbeat).delete(sessions::end),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(track::TrackLayer::new(&state.metrics))
        .with_state(state);
    match cors {
        Some(layer) => api.layer(layer),
        None => api,
    }
}

#[cfg(test)]
mod tests {
    //! In-process property test of the whole router: no input a client can
    //! send yields a 5xx or a panic, and every refusal is our JSON error.

    use super::*;
    use axum::body::Body;
    use axum::http::Method;
    use proptest::prelude::*;
    use std::sync::LazyLock;
    use tower::ServiceExt;

    const SECRET: &str = "router-property-test-secret";

    /// The API as the server serves it: the front, then the router.
    static FIXTURE: LazyLock<(tokio::runtime::Runtime, Front)> = LazyLock::new(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let settings = crate::fixtures::memory_settings(SECRET, &[]);
        let front = runtime.block_on(async {
            let state = crate::build(settings).await.expect("state");
            Front::new(state.clone(), router(state))
        });
        (runtime, front)
    });

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::GET),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::DELETE),
            Just(Method::OPTIONS),
            Just(Method::HEAD),
            Just(Method::PATCH),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        let segment = prop::collection::vec(any::<u8>(), 0..300).prop_map(|bytes| {
            bytes
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>()
        });
        prop_oneof![
            segment
                .clone()
                .prop_map(|s| format!("/api/v2/presence/{s}")),
            "[a-zA-Z0-9@._~:+-]{0,40}".prop_map(|s| format!("/api/v2/presence/{s}")),
            "[a-zA-Z0-9,%=&]{0,200}".prop_map(|q| format!("/api/v2/presence?{q}")),
            segment
                .clone()
                .prop_map(|s| format!("/api/v2/presence?users={s}")),
            (segment.clone(), segment.clone())
                .prop_map(|(u, s)| format!("/api/v2/presence/{u}/sessions/{s}")),
            "[a-z0-9]{1,8}".prop_map(|s| format!("/api/v2/presence/ann/sessions/{s}")),
            segment.prop_map(|s| format!("/api/v2/presence/stream?users={s}")),
            "[a-zA-Z0-9,%=&]{0,100}".prop_map(|q| format!("/api/v2/presence/stream?{q}")),
            Just("/api/v2/presence/batch".to_owned()),
            Just("/api/v2/cache/metrics".to_owned()),
            Just("/health".to_owned()),
            "/[a-z/]{0,30}".prop_map(|s| s.to_owned()),
        ]
    }

    fn authorization() -> impl Strategy<Value = Option<String>> {
        let write = crate::auth::mint(SECRET, "svc", "presence:write", 600).expect("mint");
        let own = crate::auth::mint(SECRET, "ann", "", 600).expect("mint");
        prop_oneof![
            Just(None),
            Just(Some(format!("Bearer {write}"))),
            Just(Some(format!("Bearer {own}"))),
            "[ -~]{0,80}".prop_map(Some),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        let status = prop_oneof![
            Just("online".to_owned()),
            Just("busy".to_owned()),
            "[a-z]{0,8}".prop_map(|s| s.to_owned()),
        ];
        let json_item = (status.clone(), "\\PC{0,300}", "\\PC{0,20}")
            .prop_map(|(s, m, u)| serde_json::json!({"userID": u, "status": s, "message": m}));
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (status, "\\PC{0,300}").prop_map(|(s, m)| {
                serde_json::to_vec(&serde_json::json!({"status": s, "message": m}))
                    .unwrap_or_default()
            }),
            prop::collection::vec(json_item, 0..20).prop_map(|items| {
                serde_json::to_vec(&serde_json::json!({"presences": items})).unwrap_or_default()
            }),
            Just(b"{\"status\": null, \"message\": 7}".to_vec()),
            (
                prop_oneof![Just("online"), Just("away"), Just("busy")],
                any::<i64>(),
                "\\PC{0,140}"
            )
                .prop_map(|(s, ttl, device)| {
                    serde_json::to_vec(
                        &serde_json::json!({"status": s, "ttlSeconds": ttl, "device": device}),
                    )
                    .unwrap_or_default()
                }),
            "\\PC{0,40}".prop_map(|raw| {
                serde_json::to_vec(&serde_json::json!({"status": "busy", "expiresAt": raw}))
                    .unwrap_or_default()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn no_client_input_causes_a_server_error(
            method in method(),
            path in path(),
            auth in authorization(),
            body in body(),
        ) {
            let (runtime, api) = &*FIXTURE;
            let is_head = method == Method::HEAD;
            let mut request = axum::http::Request::builder().method(method).uri(path.as_str());
            if let Some(auth) = auth {
                request = request.header(header::AUTHORIZATION, auth);
            }
            let Ok(request) = request.body(Body::from(body)) else {
                // The HTTP layer itself would reject this before our code runs.
                return Ok(());
            };
            let response = runtime
                .block_on(api.clone().oneshot(request))
                .expect("the API is infallible");
            let status = response.status();
            prop_assert!(!status.is_server_error(), "{status} for {path}");
            // HEAD answers carry no body by definition.
            if status.is_client_error() && !is_head {
                let bytes = runtime
                    .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
                    .expect("body");
                let json: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| TestCaseError::fail(format!("{status} body is not JSON: {e}")))?;
                prop_assert!(json["error"]["code"].is_string(), "{json}");
            }
        }
    }

    /// One request without a token: the status and the body.
    fn send(method: &str, path: &str) -> (StatusCode, Vec<u8>) {
        let (runtime, api) = &*FIXTURE;
        let request = axum::http::Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(path)
            .body(Body::empty())
            .expect("request");
        runtime.block_on(async {
            let response = api.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            (status, body.to_vec())
        })
    }

    fn error_code(body: &[u8]) -> String {
        serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn every_documented_operation_is_routed_and_its_path_refuses_other_methods() {
        for op in openapi::OPERATIONS {
            let path = op
                .path
                .replace("{userID}", "ann")
                .replace("{sessionID}", "tab-1");
            let (status, body) = send(op.method, &format!("{path}?users=ann"));
            let code = error_code(&body);
            assert!(
                !matches!(code.as_str(), "route_not_found" | "method_not_allowed"),
                "{} {path}: {status} {code}",
                op.method
            );
            let documented: Vec<&str> = openapi::OPERATIONS
                .iter()
                .filter(|o| o.path == op.path)
                .map(|o| o.method)
                .collect();
            for other in ["get", "post", "put", "delete", "patch"] {
                if !documented.contains(&other) {
                    let (status, body) = send(other, &path);
                    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{other} {path}");
                    assert_eq!(error_code(&body), "method_not_allowed");
                }
            }
        }
    }

    #[test]
    fn the_service_serves_the_committed_description() {
        let (status, body) = send("get", openapi::OPENAPI_PATH);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(String::from_utf8_lossy(&body), openapi::document_text());
    }

    #[test]
    fn query_escapes_must_decode_to_utf8() {
        assert!(decodes_to_utf8("users=a,b&x"));
        assert!(decodes_to_utf8("users=ann%40example.com,%C3%A9"));
        assert!(decodes_to_utf8("users=100%25,50%,%2"));
        assert!(decodes_to_utf8(""));
        assert!(!decodes_to_utf8("users=%FF"));
        assert!(!decodes_to_utf8("users=a,%C3"));
        assert!(!decodes_to_utf8("%FF=a"));
        // A split escape is two invalid halves, not one valid character.
        assert!(!decodes_to_utf8("users=%C3&x=%A9"));
    }
}
