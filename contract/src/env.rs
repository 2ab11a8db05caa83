//! Environment variable names of `presence-service`.
//!
//! The service's clap definitions use these constants, and the operator's
//! renderer emits only these constants. The names are the Go service's where
//! it had one, so existing deployments keep working.

/// `center` or `leaf`.
pub const NODE_TYPE: &str = "NODE_TYPE";
/// A unique name of this node, recorded as `nodeID` on its writes.
pub const NODE_ID: &str = "NODE_ID";
/// HTTP port of the API.
pub const SERVICE_PORT: &str = "SERVICE_PORT";
/// Address the API binds to.
pub const SERVICE_HOST: &str = "SERVICE_HOST";
/// HS256 secret of API tokens.
pub const JWT_SECRET: &str = "JWT_SECRET";
/// Required `iss` of tokens.
pub const JWT_ISSUER: &str = "JWT_ISSUER";
/// Required `aud` of tokens.
pub const JWT_AUDIENCE: &str = "JWT_AUDIENCE";
/// Cache budget in bytes.
pub const CACHE_MAX_COST: &str = "CACHE_MAX_COST";
/// Expected number of users (pre-sizes the cache).
pub const CACHE_NUM_COUNTERS: &str = "CACHE_NUM_COUNTERS";
/// trace, debug, info, warn or error.
pub const LOG_LEVEL: &str = "LOG_LEVEL";
/// text or json.
pub const LOG_FORMAT: &str = "LOG_FORMAT";
/// CORS on or off.
pub const CORS_ENABLED: &str = "CORS_ENABLED";
/// Comma-separated origins, or `*`.
pub const CORS_ALLOWED_ORIGINS: &str = "CORS_ALLOWED_ORIGINS";
/// Comma-separated methods.
pub const CORS_ALLOWED_METHODS: &str = "CORS_ALLOWED_METHODS";
/// Comma-separated request headers.
pub const CORS_ALLOWED_HEADERS: &str = "CORS_ALLOWED_HEADERS";
/// Credentials in CORS requests.
pub const CORS_ALLOW_CREDENTIALS: &str = "CORS_ALLOW_CREDENTIALS";
/// Preflight cache seconds.
pub const CORS_MAX_AGE: &str = "CORS_MAX_AGE";
/// The node's regional NATS server(s).
pub const NATS_URL: &str = "NATS_URL";
/// The Go service's name for the NATS URL.
pub const NATS_CENTER_URL: &str = "NATS_CENTER_URL";
/// JetStream domain of the hub.
pub const NATS_JS_DOMAIN: &str = "NATS_JS_DOMAIN";
/// NATS credentials file (a decentralized-auth `.creds` file with a JWT).
pub const NATS_CREDS: &str = "NATS_CREDS";
/// File holding this service's NATS nkey seed (`SU…`).
pub const NATS_NKEY_SEED_FILE: &str = "NATS_NKEY_SEED_FILE";
/// CA certificate (PEM) that NATS servers' certificates must chain to;
/// when set, the connection must be TLS.
pub const NATS_TLS_CA: &str = "NATS_TLS_CA";
/// Client certificate (PEM) presented to NATS servers that ask for one.
pub const NATS_TLS_CERT: &str = "NATS_TLS_CERT";
/// Key (PEM) of `NATS_TLS_CERT`.
pub const NATS_TLS_KEY: &str = "NATS_TLS_KEY";
/// Name of the presence bucket.
pub const KV_BUCKET: &str = "KV_BUCKET";
/// Replicas of the bucket when the center creates it.
pub const KV_REPLICAS: &str = "KV_REPLICAS";
/// `nats` or `memory`.
pub const STORE: &str = "STORE";
/// Write acknowledgement timeout.
pub const WRITE_TIMEOUT_MS: &str = "WRITE_TIMEOUT_MS";
/// Cache-miss read timeout.
pub const READ_TIMEOUT_MS: &str = "READ_TIMEOUT_MS";
/// Sustained writes per second per user.
pub const RATE_LIMIT_WRITES_PER_SECOND: &str = "RATE_LIMIT_WRITES_PER_SECOND";
/// Writes per user at once.
pub const RATE_LIMIT_BURST: &str = "RATE_LIMIT_BURST";
/// Graceful stop bound.
pub const SHUTDOWN_TIMEOUT_SECS: &str = "SHUTDOWN_TIMEOUT_SECS";
/// Seconds a stopping node keeps serving, not ready, before it closes its
/// listener: the time load balancers take to stop sending it requests.
pub const SHUTDOWN_DELAY_SECS: &str = "SHUTDOWN_DELAY_SECS";
/// Longest readiness waits for a starting node's cache to be filled.
pub const READINESS_WARMUP_TIMEOUT_SECS: &str = "READINESS_WARMUP_TIMEOUT_SECS";
/// Change streams per node.
pub const STREAM_MAX_CONNECTIONS: &str = "STREAM_MAX_CONNECTIONS";
/// Seconds between keep-alive comments on a stream.
pub const STREAM_KEEPALIVE_SECS: &str = "STREAM_KEEPALIVE_SECS";
/// Change streams one caller (`sub`) may hold open on a node.
pub const STREAM_MAX_PER_CALLER: &str = "STREAM_MAX_PER_CALLER";
/// Users all of a node's change streams may follow together.
pub const STREAM_MAX_FOLLOWS: &str = "STREAM_MAX_FOLLOWS";
/// Byte budget of a node's event log (exact stream resumes).
pub const STREAM_EVENT_LOG_MAX_BYTES: &str = "STREAM_EVENT_LOG_MAX_BYTES";
/// Longest tokens accepted, in seconds (unset: any).
pub const JWT_MAX_LIFETIME: &str = "JWT_MAX_LIFETIME";
/// Seconds a client may take to send a request's headers.
pub const HTTP_HEADER_READ_TIMEOUT_SECS: &str = "HTTP_HEADER_READ_TIMEOUT_SECS";
/// Seconds a client may take to send a request's body.
pub const HTTP_BODY_READ_TIMEOUT_SECS: &str = "HTTP_BODY_READ_TIMEOUT_SECS";
/// Seconds an idle kept-alive connection stays open.
pub const HTTP_KEEPALIVE_TIMEOUT_SECS: &str = "HTTP_KEEPALIVE_TIMEOUT_SECS";
/// HTTP connections per node.
pub const HTTP_MAX_CONNECTIONS: &str = "HTTP_MAX_CONNECTIONS";
/// Seconds a client may leave the node's answer unread.
pub const HTTP_SEND_TIMEOUT_SECS: &str = "HTTP_SEND_TIMEOUT_SECS";

/// Variables a deployment in a cluster must set: their built-in defaults
/// only suit a single process on a laptop (or, for `JWT_SECRET`, there is
/// none). The operator's renderer emits every one of them for every region.
pub const REQUIRED_IN_CLUSTER: &[&str] = &[
    NODE_TYPE,
    NODE_ID,
    SERVICE_HOST,
    SERVICE_PORT,
    NATS_URL,
    NATS_JS_DOMAIN,
    KV_BUCKET,
    JWT_SECRET,
    LOG_FORMAT,
];

/// Prefixes of the service's own variables. A variable with one of these
/// prefixes that isn't a known name is almost certainly a typo, and the
/// service warns about it at start instead of silently ignoring it.
/// (`NODE_` is left out: Node.js owns `NODE_OPTIONS` and friends.)
pub const OWNED_PREFIXES: &[&str] = &[
    "SERVICE_",
    "JWT_",
    "CACHE_",
    "CORS_",
    "NATS_",
    "KV_",
    "WRITE_",
    "READ_",
    "RATE_LIMIT_",
    "SHUTDOWN_",
    "STREAM_",
];
