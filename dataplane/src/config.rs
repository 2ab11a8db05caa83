//! Command line and environment configuration.
//!
//! Every setting of the Go service keeps its environment variable name, and
//! each is also a flag. `Args` is what clap parses; `Settings` is the
//! validated form the rest of the service uses, so nothing downstream has to
//! re-check a value.

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use presence_contract::{bucket, env, rules};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default NATS server: this node's regional server on the same host.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Longest token lifetime `token` signs and `JWT_MAX_LIFETIME` accepts:
/// ten years keeps every `exp` far from overflowing.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// `presence-service`: the presence API of a PresenceCluster region.
#[derive(Debug, Parser)]
#[command(
    name = "presence-service",
    version,
    about = "HTTP/JSON presence API backed by a NATS JetStream KV bucket",
    long_about = "HTTP/JSON presence API backed by a NATS JetStream KV bucket.\n\n\
        Every option can also be set through the environment variable shown \
        beside it. With no subcommand the service runs."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the presence API (the default).
    Serve,
    /// Print a signed JWT for trying the API locally (uses JWT_SECRET).
    Token(TokenArgs),
}

/// Options of `presence-service token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The caller's user ID (the `sub` claim).
    #[arg(long, default_value = "dev")]
    pub sub: String,
    /// Space-separated scopes, e.g. `presence:write` to set anyone's presence.
    #[arg(long, default_value = "")]
    pub scope: String,
    /// Lifetime of the token in seconds (at most ten years) [default: a
    /// day, or JWT_MAX_LIFETIME when that is shorter].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TOKEN_LIFETIME_SECS))]
    pub ttl_secs: Option<u64>,
}

/// The lifetime `presence-service token` gives a token unless told.
const DEFAULT_TOKEN_TTL_SECS: u64 = 86_400;

/// Why `presence-service token` would print a token the node refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--sub is empty: a token names its caller")]
    EmptySubject,
    #[error("--ttl-secs {ttl} is longer than JWT_MAX_LIFETIME ({max} s), which this node enforces")]
    OutlivesLimit { ttl: u64, max: u64 },
}

impl TokenArgs {
    /// The token to print, and the secret to sign it with: one this node's
    /// settings accept, with their `JWT_ISSUER` and `JWT_AUDIENCE`, within
    /// their `JWT_MAX_LIFETIME`.
    pub fn grant<'a>(
        &'a self,
        serve: &'a ServeArgs,
    ) -> Result<(&'a str, crate::auth::Grant<'a>), TokenError> {
        let secret = serve.signing_secret()?;
        let max = serve.checked_jwt_max_lifetime()?;
        if self.sub.trim().is_empty() {
            return Err(TokenError::EmptySubject);
        }
        let ttl_secs = match (self.ttl_secs, max) {
            (Some(ttl), Some(max)) if ttl > max => {
                return Err(TokenError::OutlivesLimit { ttl, max });
            }
            (Some(ttl), _) => ttl,
            (None, max) => max.map_or(DEFAULT_TOKEN_TTL_SECS, |max| {
                max.min(DEFAULT_TOKEN_TTL_SECS)
            }),
        };
        let grant = crate::auth::Grant {
            // Empty means unset, as for the node.
            issuer: serve.jwt_issuer.as_deref().filter(|s| !s.is_empty()),
            audience: serve.jwt_audience.as_deref().filter(|s| !s.is_empty()),
            ..crate::auth::Grant::new(&self.sub, &self.scope, ttl_secs)
        };
        Ok((secret, grant))
    }
}

/// Where this node sits in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeType {
    /// Next to the hub NATS server; creates the KV bucket when it is missing.
    Center,
    /// Next to a regional leaf NATS server; waits for the hub's bucket.
    Leaf,
}

impl NodeType {
    /// The name used in logs, `/health` and the `NODE_TYPE` variable.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Center => "center",
            NodeType::Leaf => "leaf",
        }
    }
}

/// Which store backs the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// NATS JetStream KV (production).
    Nats,
    /// A single-process map, for trying the API without NATS; data is lost on exit.
    Memory,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Raw options as parsed from flags and environment.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Node type: `center` (next to the hub) or `leaf` (next to a regional leaf server).
    #[arg(long, env = env::NODE_TYPE, value_enum, ignore_case = true, default_value = "center")]
    pub node_type: NodeType,
    /// Unique node identifier, recorded as `nodeID` on every write this node accepts.
    #[arg(long, env = env::NODE_ID, default_value = "node-1")]
    pub node_id: String,
    /// HTTP port of the API.
    #[arg(long, env = env::SERVICE_PORT, default_value_t = 8080,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub service_port: u16,
    /// Address the API binds to.
    #[arg(long, env = env::SERVICE_HOST, default_value = "0.0.0.0")]
    pub service_host: IpAddr,
    /// HS256 secret that signs API tokens (required).
    #[arg(long, env = env::JWT_SECRET, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// When set, tokens must carry this `iss`.
    #[arg(long, env = env::JWT_ISSUER)]
    pub jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud` (as a string or in a list).
    #[arg(long, env = env::JWT_AUDIENCE)]
    pub jwt_audience: Option<String>,
    /// When set, tokens living longer than this many seconds (exp - iat, or
    /// exp - now without iat) are refused.
    #[arg(long, env = env::JWT_MAX_LIFETIME)]
    pub jwt_max_lifetime: Option<u64>,
    /// Cache budget in bytes (estimated memory of cached presences).
    #[arg(long, env = env::CACHE_MAX_COST, default_value_t = 64 * 1024 * 1024)]
    pub cache_max_cost: u64,
    /// Expected number of distinct users; pre-sizes the cache (1/10 of it, as
    /// Ristretto's guidance of 10 counters per item implies).
    #[arg(long, env = env::CACHE_NUM_COUNTERS, default_value_t = 100_000)]
    pub cache_num_counters: u64,
    /// Log level: trace, debug, info, warn (or warning) or error (or fatal,
    /// panic); 1 (error) to 5 (trace) also work.
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: String,
    /// Log format: text or json.
    #[arg(long, env = env::LOG_FORMAT, value_enum, ignore_case = true, default_value = "text")]
    pub log_format: LogFormat,
    /// Enable CORS handling.
    #[arg(long, env = env::CORS_ENABLED, default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub cors_enabled: bool,
    /// Comma-separated allowed origins, or `*` (never together with credentials).
    #[arg(long, env = env::CORS_ALLOWED_ORIGINS, default_value = rules::DEFAULT_CORS_ORIGINS)]
    pub cors_allowed_origins: String,
    /// Comma-separated allowed methods.
    #[arg(
        long,
        env = env::CORS_ALLOWED_METHODS,
        default_value = rules::DEFAULT_CORS_METHODS
    )]
    pub cors_allowed_methods: String,
    /// Comma-separated allowed request headers.
    #[arg(
        long,
        env = env::CORS_ALLOWED_HEADERS,
        default_value = rules::DEFAULT_CORS_HEADERS
    )]
    pub cors_allowed_headers: String,
    /// Allow credentials (cookies, authorization headers) in CORS requests.
    #[arg(long, env = env::CORS_ALLOW_CREDENTIALS, default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub cors_allow_credentials: bool,
    /// Preflight cache duration in seconds.
    #[arg(long, env = env::CORS_MAX_AGE, default_value_t = 600)]
    pub cors_max_age: u64,
    /// This node's regional NATS server (default nats://127.0.0.1:4222); a
    /// comma-separated list for a cluster of servers.
    #[arg(long, env = env::NATS_URL)]
    pub nats_url: Option<String>,
    /// The Go service's name for the NATS URL; used when NATS_URL is unset.
    #[arg(long, env = env::NATS_CENTER_URL)]
    pub nats_center_url: Option<String>,
    /// JetStream domain of the hub; leaf nodes set `hub`.
    #[arg(long, env = env::NATS_JS_DOMAIN)]
    pub nats_js_domain: Option<String>,
    /// Optional NATS credentials file (decentralized auth: a `.creds` file
    /// holding a user JWT and its seed).
    #[arg(long, env = env::NATS_CREDS)]
    pub nats_creds: Option<PathBuf>,
    /// File holding this service's NATS nkey seed (`SU...`), for servers
    /// that list nkey users (what the operator configures).
    #[arg(long, env = env::NATS_NKEY_SEED_FILE)]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// CA certificate (PEM) the NATS server's certificate must chain to;
    /// when set, the connection must be TLS.
    #[arg(long, env = env::NATS_TLS_CA)]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients.
    #[arg(long, env = env::NATS_TLS_CERT)]
    pub nats_tls_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[arg(long, env = env::NATS_TLS_KEY)]
    pub nats_tls_key: Option<PathBuf>,
    /// KV bucket holding presences.
    #[arg(long, env = env::KV_BUCKET, default_value = bucket::DEFAULT_NAME)]
    pub kv_bucket: String,
    /// Replicas of the bucket when the center creates it (1, 3 or 5).
    #[arg(long, env = env::KV_REPLICAS, default_value_t = 1)]
    pub kv_replicas: usize,
    /// Store backend: `nats`, or `memory` to try the API without NATS.
    #[arg(long, env = env::STORE, value_enum, ignore_case = true, default_value = "nats")]
    pub store: StoreKind,
    /// Longest a write waits for JetStream's acknowledgement before answering 503.
    #[arg(long, env = env::WRITE_TIMEOUT_MS, default_value_t = 3_000)]
    pub write_timeout_ms: u64,
    /// Longest a cache-miss read waits for the KV bucket before answering 503.
    #[arg(long, env = env::READ_TIMEOUT_MS, default_value_t = 2_000)]
    pub read_timeout_ms: u64,
    /// Sustained writes per second allowed per user ID on this node (0 = no limit).
    #[arg(long, env = env::RATE_LIMIT_WRITES_PER_SECOND, default_value_t = 5.0)]
    pub rate_limit_writes_per_second: f64,
    /// Writes per user ID allowed at once after a quiet period.
    #[arg(long, env = env::RATE_LIMIT_BURST, default_value_t = 20)]
    pub rate_limit_burst: u32,
    /// Longest a graceful stop waits for in-flight requests.
    #[arg(long, env = env::SHUTDOWN_TIMEOUT_SECS, default_value_t = 25)]
    pub shutdown_timeout_secs: u64,
    /// On SIGTERM, how long to keep serving (with readiness failing) before
    /// closing the listener, so load balancers stop routing here first.
    #[arg(long, env = env::SHUTDOWN_DELAY_SECS, default_value_t = 0)]
    pub shutdown_delay_secs: u64,
    /// Longest a starting node stays not ready while its watch fills the
    /// cache from the bucket (its reads would meanwhile all go to the
    /// hub); 0 makes it ready without waiting.
    #[arg(long, env = env::READINESS_WARMUP_TIMEOUT_SECS, default_value_t = 60)]
    pub readiness_warmup_timeout_secs: u64,
    /// Most change streams (SSE) this node keeps open at once; more get 503.
    #[arg(long, env = env::STREAM_MAX_CONNECTIONS, default_value_t = 10_000)]
    pub stream_max_connections: usize,
    /// Seconds between keep-alive comments on an idle change stream.
    #[arg(long, env = env::STREAM_KEEPALIVE_SECS, default_value_t = 15)]
    pub stream_keepalive_secs: u64,
    /// Most change streams one caller (the token's `sub`) may hold open on
    /// this node; more get 429.
    #[arg(long, env = env::STREAM_MAX_PER_CALLER, default_value_t = 32)]
    pub stream_max_per_caller: usize,
    /// Most users all of this node's change streams may follow together
    /// (each follow holds the user's ID and record); a stream that would
    /// pass it gets 503.
    #[arg(long, env = env::STREAM_MAX_FOLLOWS, default_value_t = 1_000_000)]
    pub stream_max_follows: usize,
    /// Bytes of recent events this node keeps for exact stream resumes
    /// (besides its cap of 32768 events).
    #[arg(long, env = env::STREAM_EVENT_LOG_MAX_BYTES, default_value_t = 64 * 1024 * 1024)]
    pub stream_event_log_max_bytes: u64,
    /// Seconds a client may take to send a request's headers. The timer also
    /// runs while a kept-alive connection waits for its next request.
    #[arg(long, env = env::HTTP_HEADER_READ_TIMEOUT_SECS, default_value_t = 10)]
    pub http_header_read_timeout_secs: u64,
    /// Seconds a client may take to send a request's body, counted from
    /// when its handler starts reading it (right after the headers); then
    /// it is answered 408 and the connection closed.
    #[arg(long, env = env::HTTP_BODY_READ_TIMEOUT_SECS, default_value_t = 30)]
    pub http_body_read_timeout_secs: u64,
    /// Seconds an idle kept-alive connection stays open between requests;
    /// at most HTTP_HEADER_READ_TIMEOUT_SECS.
    #[arg(long, env = env::HTTP_KEEPALIVE_TIMEOUT_SECS, default_value_t = 5)]
    pub http_keepalive_timeout_secs: u64,
    /// Most HTTP connections this node holds at once; more are answered 503
    /// and closed.
    #[arg(long, env = env::HTTP_MAX_CONNECTIONS, default_value_t = rules::DEFAULT_HTTP_MAX_CONNECTIONS)]
    pub http_max_connections: usize,
    /// Seconds a client may leave the node's answer unread before its
    /// connection (a change stream included) is closed.
    #[arg(long, env = env::HTTP_SEND_TIMEOUT_SECS, default_value_t = 30)]
    pub http_send_timeout_secs: u64,
}

/// A configuration value that can't work; the message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("JWT_SECRET is required: set it to the HS256 secret that signs API tokens")]
    MissingJwtSecret,
    #[error(
        "JWT_SECRET must be at least {min} bytes long (got {0})",
        min = rules::MIN_JWT_SECRET_BYTES
    )]
    ShortJwtSecret(usize),
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// clap's refusal of a setting's value (not a number, out of a type's
/// range, not one of the choices) as the one line every other invalid
/// setting gets, naming the variable: `NODE_TYPE is invalid: 'hub' is not
/// one of center, leaf`. `None` for what clap should print itself (help,
/// version, an unknown flag).
pub fn value_error_line(err: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let text = |kind| match err.get(kind) {
        Some(ContextValue::String(text)) => Some(text.as_str()),
        _ => None,
    };
    // "--node-type <NODE_TYPE>": the flag, then its value's name.
    let flag = text(ContextKind::InvalidArg)?.split_whitespace().next()?;
    let long = flag.strip_prefix("--")?;
    let command = <Cli as clap::CommandFactory>::command();
    let arg = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?;
    let name = arg
        .get_env()
        .map_or_else(|| flag.to_owned(), |env| env.to_string_lossy().into_owned());
    let value = text(ContextKind::InvalidValue).unwrap_or_default();
    let reason = match (
        err.get(ContextKind::ValidValue),
        std::error::Error::source(err),
    ) {
        (Some(ContextValue::Strings(choices)), _) => {
            format!("'{value}' is not one of {}", choices.join(", "))
        }
        (_, Some(cause)) => format!("'{value}': {cause}"),
        _ => format!("'{value}' is not a valid value"),
    };
    Some(format!("{name} is invalid: {reason}"))
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

/// CORS policy after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsSettings {
    /// `None` means any origin (`*`).
    pub allowed_origins: Option<Vec<String>>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub allow_credentials: bool,
    pub max_age: Duration,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_type: NodeType,
    pub node_id: String,
    pub listen: SocketAddr,
    pub jwt_secret: String,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub cache_max_cost: u64,
    pub cache_initial_capacity: usize,
    pub log_level: tracing::Level,
    pub log_format: LogFormat,
    pub cors: Option<CorsSettings>,
    pub nats_url: String,
    pub nats_js_domain: Option<String>,
    pub nats_creds: Option<PathBuf>,
    /// How the service proves itself to NATS and checks the server.
    pub nats_auth: NatsAuth,
    pub kv_bucket: String,
    pub kv_replicas: usize,
    pub store: StoreKind,
    pub write_timeout: Duration,
    pub read_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub shutdown_delay: Duration,
    /// How long readiness waits for the first replay of the bucket.
    pub readiness_warmup_timeout: Duration,
    pub stream_max_connections: usize,
    pub stream_keepalive: Duration,
    /// Most streams one caller may hold open on this node.
    pub stream_max_per_caller: usize,
    /// Most users all of this node's streams may follow together.
    pub stream_max_follows: usize,
    /// Byte budget of the event log.
    pub event_log_max_bytes: usize,
    /// Longest token lifetime accepted, in seconds; `None`: any.
    pub jwt_max_lifetime: Option<u64>,
    /// Connection limits of the HTTP server.
    pub http: HttpLimits,
    /// `None` when rate limiting is off.
    pub write_limit: Option<crate::ratelimit::Limit>,
}

/// What one HTTP connection may cost the node, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest a request's head may take to arrive.
    pub header_read_timeout: Duration,
    /// Longest a request's body may take to arrive after its head.
    pub body_read_timeout: Duration,
    /// Longest an idle kept-alive connection stays open.
    pub keepalive_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
    /// Longest the node's writes to a client may stay blocked.
    pub send_timeout: Duration,
}

fn split_list(raw: &str) -> Vec<String> {
    rules::split_list(raw)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn is_nats_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ServeArgs {
    /// The JWT secret, checked as [`ServeArgs::validate`] checks it: what
    /// `presence-service token` signs with.
    pub fn signing_secret(&self) -> Result<&str, ConfigError> {
        let secret = self.jwt_secret.as_deref();
        jwt_secret(secret)?;
        Ok(secret.unwrap_or_default())
    }

    /// Checks every value once, at start, so a bad deployment fails loudly
    /// before it accepts traffic.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let cors = if self.cors_enabled {
            Some(cors_settings(&self)?)
        } else {
            None
        };
        let jwt_secret = jwt_secret(self.jwt_secret.as_deref())?;
        if self.node_id.trim().is_empty() || self.node_id.len() > 128 {
            return Err(invalid(env::NODE_ID, "must be 1 to 128 characters"));
        }
        let log_level = parse_log_level(&self.log_level)?;
        self.check_numbers()?;
        let cache_initial_capacity = usize::try_from(self.cache_num_counters / 10)
            .unwrap_or(usize::MAX)
            .min(10_000_000);
        let nats = self.nats_settings()?;
        let nats_auth = self.nats_auth()?;
        let timeouts = self.timeouts()?;
        let streams = self.stream_settings()?;
        let http = self.http_limits()?;
        let write_limit = self.write_limit()?;
        Ok(Settings {
            stream_max_connections: streams.max_connections,
            stream_keepalive: streams.keepalive,
            stream_max_per_caller: streams.per_caller,
            stream_max_follows: streams.follows,
            event_log_max_bytes: streams.event_log_bytes,
            jwt_max_lifetime: self.jwt_max_lifetime,
            http,
            write_limit,
            node_type: self.node_type,
            node_id: self.node_id,
            listen: SocketAddr::new(self.service_host, self.service_port),
            jwt_secret,
            jwt_issuer: self.jwt_issuer.filter(|s| !s.is_empty()),
            jwt_audience: self.jwt_audience.filter(|s| !s.is_empty()),
            cache_max_cost: self.cache_max_cost,
            cache_initial_capacity,
            log_level,
            log_format: self.log_format,
            cors,
            nats_url: nats.url,
            nats_js_domain: nats.js_domain,
            nats_creds: self.nats_creds.clone(),
            nats_auth,
            kv_bucket: self.kv_bucket,
            kv_replicas: self.kv_replicas,
            store: self.store,
            write_timeout: timeouts.0,
            read_timeout: timeouts.1,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            shutdown_delay: Duration::from_secs(self.shutdown_delay_secs),
            readiness_warmup_timeout: Duration::from_secs(self.readiness_warmup_timeout_secs),
        })
    }

    /// The plain numbers' bounds; the others are checked where they turn
    /// into settings.
    fn check_numbers(&self) -> Result<(), ConfigError> {
        in_range(env::SERVICE_PORT, u64::from(self.service_port), 1, 65_535)?;
        in_range(
            env::CACHE_MAX_COST,
            self.cache_max_cost,
            1024,
            MAX_CACHE_COST,
        )?;
        in_range(
            env::CACHE_NUM_COUNTERS,
            self.cache_num_counters,
            1,
            1_000_000_000,
        )?;
        in_range(env::CORS_MAX_AGE, self.cors_max_age, 0, 86_400)?;
        in_range(
            env::SHUTDOWN_TIMEOUT_SECS,
            self.shutdown_timeout_secs,
            0,
            3_600,
        )?;
        in_range(env::SHUTDOWN_DELAY_SECS, self.shutdown_delay_secs, 0, 300)?;
        in_range(
            env::READINESS_WARMUP_TIMEOUT_SECS,
            self.readiness_warmup_timeout_secs,
            0,
            3_600,
        )?;
        self.checked_jwt_max_lifetime()?;
        Ok(())
    }

    /// `JWT_MAX_LIFETIME` within its range, as the node and `presence-service
    /// token` both read it.
    fn checked_jwt_max_lifetime(&self) -> Result<Option<u64>, ConfigError> {
        if let Some(lifetime) = self.jwt_max_lifetime {
            in_range(env::JWT_MAX_LIFETIME, lifetime, 1, MAX_TOKEN_LIFETIME_SECS)?;
        }
        Ok(self.jwt_max_lifetime)
    }

    fn nats_settings(&self) -> Result<NatsTarget, ConfigError> {
        let url = self
            .nats_url
            .clone()
            .or_else(|| self.nats_center_url.clone())
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned());
        if url.split(',').all(|u| u.trim().is_empty()) {
            return Err(invalid(env::NATS_URL, "must not be empty"));
        }
        let js_domain = self.nats_js_domain.clone().filter(|d| !d.trim().is_empty());
        if let Some(domain) = &js_domain
            && !is_nats_name(domain)
        {
            return Err(invalid(
                env::NATS_JS_DOMAIN,
                format!("{domain:?} may contain only letters, digits, '-' and '_'"),
            ));
        }
        if let Some(path) = &self.nats_creds
            && !path.is_file()
        {
            return Err(invalid(
                env::NATS_CREDS,
                format!("{} is not a readable file", path.display()),
            ));
        }
        if !is_nats_name(&self.kv_bucket) {
            return Err(invalid(
                env::KV_BUCKET,
                format!(
                    "{:?} may contain only letters, digits, '-' and '_'",
                    self.kv_bucket
                ),
            ));
        }
        if ![1, 3, 5].contains(&self.kv_replicas) {
            return Err(invalid(env::KV_REPLICAS, "must be 1, 3 or 5"));
        }
        Ok(NatsTarget { url, js_domain })
    }

    /// (write, read) timeouts.
    fn timeouts(&self) -> Result<(Duration, Duration), ConfigError> {
        for (name, value) in [
            (env::WRITE_TIMEOUT_MS, self.write_timeout_ms),
            (env::READ_TIMEOUT_MS, self.read_timeout_ms),
        ] {
            if !(50..=60_000).contains(&value) {
                return Err(invalid(name, "must be between 50 and 60000"));
            }
        }
        Ok((
            Duration::from_millis(self.write_timeout_ms),
            Duration::from_millis(self.read_timeout_ms),
        ))
    }

    fn stream_settings(&self) -> Result<StreamSettings, ConfigError> {
        let max_connections = self.stream_max_connections;
        in_range(
            env::STREAM_MAX_CONNECTIONS,
            as_u64(max_connections),
            1,
            as_u64(rules::MAX_HTTP_CONNECTIONS),
        )?;
        in_range(
            env::STREAM_KEEPALIVE_SECS,
            self.stream_keepalive_secs,
            1,
            300,
        )?;
        let per_caller = self.stream_max_per_caller;
        in_range(env::STREAM_MAX_PER_CALLER, as_u64(per_caller), 1, 1_000_000)?;
        let follows = self.stream_max_follows;
        in_range(env::STREAM_MAX_FOLLOWS, as_u64(follows), 1, 100_000_000)?;
        let bytes = self.stream_event_log_max_bytes;
        in_range(env::STREAM_EVENT_LOG_MAX_BYTES, bytes, 1024, 16 << 30)?;
        Ok(StreamSettings {
            max_connections,
            keepalive: Duration::from_secs(self.stream_keepalive_secs),
            per_caller,
            follows,
            event_log_bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
        })
    }

    fn http_limits(&self) -> Result<HttpLimits, ConfigError> {
        let header = self.http_header_read_timeout_secs;
        in_range(env::HTTP_HEADER_READ_TIMEOUT_SECS, header, 1, 300)?;
        // hyper's header timer also runs between requests, so a longer
        // keep-alive could never take effect.
        let keepalive = self.http_keepalive_timeout_secs;
        in_range(env::HTTP_KEEPALIVE_TIMEOUT_SECS, keepalive, 1, header).map_err(|_| {
            invalid(
                env::HTTP_KEEPALIVE_TIMEOUT_SECS,
                format!(
                    "must be between 1 and HTTP_HEADER_READ_TIMEOUT_SECS ({header}), whose timer \
                     also runs while a kept-alive connection waits; got {keepalive}"
                ),
            )
        })?;
        let body = self.http_body_read_timeout_secs;
        in_range(env::HTTP_BODY_READ_TIMEOUT_SECS, body, 1, 3_600)?;
        let max_connections = self.http_max_connections;
        in_range(
            env::HTTP_MAX_CONNECTIONS,
            as_u64(max_connections),
            1,
            as_u64(rules::MAX_HTTP_CONNECTIONS),
        )?;
        in_range(
            env::HTTP_SEND_TIMEOUT_SECS,
            self.http_send_timeout_secs,
            1,
            3_600,
        )?;
        Ok(HttpLimits {
            header_read_timeout: Duration::from_secs(header),
            body_read_timeout: Duration::from_secs(body),
            keepalive_timeout: Duration::from_secs(keepalive),
            max_connections,
            send_timeout: Duration::from_secs(self.http_send_timeout_secs),
        })
    }

    fn write_limit(&self) -> Result<Option<crate::ratelimit::Limit>, ConfigError> {
        let rate = self.rate_limit_writes_per_second;
        let off = rate == 0.0;
        if !off && !(MIN_WRITE_RATE..=MAX_WRITE_RATE).contains(&rate) {
            return Err(invalid(
                env::RATE_LIMIT_WRITES_PER_SECOND,
                format!(
                    "must be 0 (no limit) or between {MIN_WRITE_RATE} and {MAX_WRITE_RATE}; got {rate}"
                ),
            ));
        }
        if !off {
            in_range(
                env::RATE_LIMIT_BURST,
                u64::from(self.rate_limit_burst),
                1,
                1_000_000,
            )?;
        }
        Ok((!off).then(|| crate::ratelimit::Limit {
            rate,
            burst: f64::from(self.rate_limit_burst),
        }))
    }
}

/// Slowest write rate accepted: one write per 1000 s. Slower rates would
/// make the wait in a 429 longer than any client keeps a retry.
const MIN_WRITE_RATE: f64 = 0.001;
/// Fastest write rate accepted (it is per user).
const MAX_WRITE_RATE: f64 = 1_000_000.0;
/// Largest cache budget accepted: 1 TiB.
const MAX_CACHE_COST: u64 = 1 << 40;

/// Stream settings after validation.
struct StreamSettings {
    max_connections: usize,
    keepalive: Duration,
    per_caller: usize,
    follows: usize,
    event_log_bytes: usize,
}

fn as_u64(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// `Ok` when `min <= value <= max`; else an error naming the variable.
fn in_range(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            name,
            format!("must be between {min} and {max}; got {value}"),
        ))
    }
}

/// NATS credentials and TLS, after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// The nkey seed, read from `NATS_NKEY_SEED_FILE` (never logged).
    pub nkey_seed: Option<String>,
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl ServeArgs {
    fn nats_auth(&self) -> Result<NatsAuth, ConfigError> {
        let readable = |name: &'static str, path: &PathBuf| {
            if path.is_file() {
                Ok(())
            } else {
                Err(invalid(
                    name,
                    format!("{} is not a readable file", path.display()),
                ))
            }
        };
        let nkey_seed = match &self.nats_nkey_seed_file {
            None => None,
            Some(path) => {
                let seed = std::fs::read_to_string(path)
                    .map_err(|e| {
                        invalid(
                            env::NATS_NKEY_SEED_FILE,
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .trim()
                    .to_owned();
                if !seed.starts_with("SU") {
                    return Err(invalid(
                        env::NATS_NKEY_SEED_FILE,
                        format!("{} does not hold a user nkey seed (SU...)", path.display()),
                    ));
                }
                Some(seed)
            }
        };
        if let Some(ca) = &self.nats_tls_ca {
            readable(env::NATS_TLS_CA, ca)?;
        }
        let tls_client = match (&self.nats_tls_cert, &self.nats_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                readable(env::NATS_TLS_CERT, cert)?;
                readable(env::NATS_TLS_KEY, key)?;
                Some((cert.clone(), key.clone()))
            }
            _ => {
                return Err(invalid(
                    env::NATS_TLS_CERT,
                    "NATS_TLS_CERT and NATS_TLS_KEY go together",
                ));
            }
        };
        Ok(NatsAuth {
            nkey_seed,
            tls_ca: self.nats_tls_ca.clone(),
            tls_client,
        })
    }
}

/// `urls` (comma-separated) with any `user:password@` replaced by `***@`,
/// so a credential in NATS_URL never reaches logs or `/health`.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let redacted = match rest.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                redacted
            } else {
                format!("{scheme}://{redacted}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the node's NATS is, after validation.
struct NatsTarget {
    url: String,
    js_domain: Option<String>,
}

fn jwt_secret(raw: Option<&str>) -> Result<String, ConfigError> {
    let secret = raw.ok_or(ConfigError::MissingJwtSecret)?;
    match rules::jwt_secret_problem(secret.as_bytes()) {
        None => Ok(secret.to_owned()),
        Some(rules::JwtSecretProblem::Short(len)) => Err(ConfigError::ShortJwtSecret(len)),
        // A `&str` is always text.
        Some(rules::JwtSecretProblem::Blank | rules::JwtSecretProblem::NotText) => {
            Err(ConfigError::MissingJwtSecret)
        }
    }
}

/// A log level: tracing's names, and the other names Go loggers (logrus)
/// take, so a Go deployment's `LOG_LEVEL=warning` keeps working: `warning`
/// is `warn`, and `fatal` and `panic` are `error`, the nearest level.
fn parse_log_level(raw: &str) -> Result<tracing::Level, ConfigError> {
    let name = raw.trim().to_ascii_lowercase();
    let name = match name.as_str() {
        "warning" => "warn",
        "fatal" | "panic" => "error",
        other => other,
    };
    name.parse::<tracing::Level>().map_err(|_| {
        invalid(
            env::LOG_LEVEL,
            format!(
                "{raw:?} is not one of trace, debug, info, warn (warning), error (fatal, panic)"
            ),
        )
    })
}

/// Every environment variable `presence-service` reads, from its clap
/// definition: the one list the operator's renderer and the docs are
/// checked against.
pub fn accepted_variables() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

/// The names among `present` that look like this service's settings (they
/// carry one of its prefixes) but aren't any of them: most likely typos,
/// which would otherwise be silently ignored.
pub fn unknown_variables<I: IntoIterator<Item = String>>(present: I) -> Vec<String> {
    let known = accepted_variables();
    let mut unknown: Vec<String> = present
        .into_iter()
        .filter(|name| env::OWNED_PREFIXES.iter().any(|p| name.starts_with(p)))
        .filter(|name| !known.contains(name))
        .filter(|name| name != presence_contract::tools::NATS_SERVER_BIN)
        .collect();
    unknown.sort();
    unknown
}

fn cors_settings(args: &ServeArgs) -> Result<CorsSettings, ConfigError> {
    let origins = split_list(&args.cors_allowed_origins);
    let methods = split_list(&args.cors_allowed_methods);
    let headers = split_list(&args.cors_allowed_headers);
    if let Some((variable, problem)) =
        rules::cors_problem(&origins, &methods, &headers, args.cors_allow_credentials)
    {
        return Err(invalid(variable, problem));
    }
    let any_origin = origins.iter().any(|o| o == "*");
    Ok(CorsSettings {
        allowed_origins: (!any_origin).then_some(origins),
        allowed_methods: methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        allowed_headers: headers,
        allow_credentials: args.cors_allow_credentials,
        max_age: Duration::from_secs(args.cors_max_age),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["presence-service"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses").serve
    }

    const SECRET: &str = "--jwt-secret=0123456789abcdef";

    #[test]
    fn defaults_match_the_go_service() {
        let s = parse(&[SECRET]).validate().unwrap();
        assert_eq!(s.node_type, NodeType::Center);
        assert_eq!(s.node_id, "node-1");
        assert_eq!(s.listen.port(), 8080);
        assert_eq!(s.kv_bucket, "PRESENCE");
        assert_eq!(s.nats_url, DEFAULT_NATS_URL);
        let cors = s.cors.unwrap();
        assert_eq!(cors.allowed_origins, None);
        assert_eq!(
            cors.allowed_methods,
            ["GET", "POST", "PUT", "DELETE", "OPTIONS"]
        );
        assert_eq!(cors.allowed_headers, ["Authorization", "Content-Type"]);
        assert!(!cors.allow_credentials);
        assert_eq!(cors.max_age, Duration::from_secs(600));
    }

    #[test]
    fn missing_secret_is_an_error() {
        assert_eq!(
            parse(&[]).validate().unwrap_err(),
            ConfigError::MissingJwtSecret
        );
        assert_eq!(
            parse(&["--jwt-secret=short"]).validate().unwrap_err(),
            ConfigError::ShortJwtSecret(5)
        );
    }

    #[test]
    fn go_log_level_names_are_accepted() {
        for (raw, level) in [
            ("warning", tracing::Level::WARN),
            ("WARN", tracing::Level::WARN),
            ("fatal", tracing::Level::ERROR),
            ("panic", tracing::Level::ERROR),
            (" Debug ", tracing::Level::DEBUG),
        ] {
            let settings = parse(&[SECRET, &format!("--log-level={raw}")])
                .validate()
                .expect(raw);
            assert_eq!(settings.log_level, level, "{raw}");
        }
    }

    #[test]
    fn wildcard_origin_with_credentials_is_refused() {
        let err = parse(&[SECRET, "--cors-allow-credentials=true"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("CORS_ALLOWED_ORIGINS"), "{err}");
        let ok = parse(&[
            SECRET,
            "--cors-allow-credentials=true",
            "--cors-allowed-origins=https://a.example, https://b.example",
        ])
        .validate()
        .unwrap();
        assert_eq!(
            ok.cors.unwrap().allowed_origins.unwrap(),
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn cors_can_be_disabled() {
        let s = parse(&[SECRET, "--cors-enabled=false"]).validate().unwrap();
        assert!(s.cors.is_none());
    }

    #[test]
    fn go_center_url_is_honoured_when_nats_url_is_unset() {
        let s = parse(&[SECRET, "--nats-center-url=nats://hub:4222"])
            .validate()
            .unwrap();
        assert_eq!(s.nats_url, "nats://hub:4222");
        let s = parse(&[
            SECRET,
            "--nats-center-url=nats://hub:4222",
            "--nats-url=nats://leaf:4222",
        ])
        .validate()
        .unwrap();
        assert_eq!(s.nats_url, "nats://leaf:4222");
    }

    #[test]
    fn credentials_in_nats_urls_are_redacted() {
        assert_eq!(
            redact_urls("nats://u:secret@hub:4222, tls://tok@b:4222,nats://c:4222"),
            "nats://***@hub:4222,tls://***@b:4222,nats://c:4222"
        );
        assert_eq!(redact_urls("a:p@host:4222"), "***@host:4222");
    }

    #[test]
    fn nkey_seeds_and_tls_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(
            &seed,
            "SUAAVJN2VOJGR3CQS5EDE3CKN5MLAQPJ3CWDPPMWWIFQALOI3B3VLNFNI\n",
        )
        .unwrap();
        let arg = |name: &str, path: &std::path::Path| format!("--{name}={}", path.display());
        let s = parse(&[SECRET, &arg("nats-nkey-seed-file", &seed)])
            .validate()
            .unwrap();
        assert!(
            s.nats_auth
                .nkey_seed
                .as_deref()
                .is_some_and(|k| k.starts_with("SU") && !k.ends_with('\n'))
        );
        std::fs::write(&seed, "not a seed").unwrap();
        let err = parse(&[SECRET, &arg("nats-nkey-seed-file", &seed)])
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("NATS_NKEY_SEED_FILE"), "{err}");
        let err = parse(&[SECRET, &arg("nats-tls-cert", &seed)])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
        let err = parse(&[SECRET, "--nats-tls-ca=/nonexistent/ca.pem"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("NATS_TLS_CA"), "{err}");
    }

    #[test]
    fn typos_in_our_variables_are_found() {
        let present = [
            "CORS_ALLOWED_ORIGIN",
            "KV_BUCKET",
            "PATH",
            "NODE_OPTIONS",
            "STREAM_MAX_CONN",
        ]
        .map(String::from);
        assert_eq!(
            unknown_variables(present),
            ["CORS_ALLOWED_ORIGIN", "STREAM_MAX_CONN"]
        );
    }

    #[test]
    fn every_contract_variable_is_accepted() {
        let accepted = accepted_variables();
        for name in env::REQUIRED_IN_CLUSTER {
            assert!(accepted.iter().any(|a| a == name), "{name}");
        }
        assert!(accepted.len() >= 30, "{accepted:?}");
    }

    /// Values clap refuses (not a number, out of range, not a choice) get
    /// the same one line as the values `validate` refuses.
    #[test]
    fn values_clap_refuses_are_one_line_naming_the_variable() {
        for (args, line) in [
            (
                vec!["--node-type=hub"],
                "NODE_TYPE is invalid: 'hub' is not one of center, leaf",
            ),
            (
                vec!["--service-port=70000"],
                "SERVICE_PORT is invalid: '70000': 70000 is not in 1..=65535",
            ),
            (
                vec!["--service-port=0"],
                "SERVICE_PORT is invalid: '0': 0 is not in 1..=65535",
            ),
            (
                vec!["--cache-num-counters=1e7"],
                "CACHE_NUM_COUNTERS is invalid: '1e7': invalid digit found in string",
            ),
        ] {
            let mut argv = vec!["presence-service"];
            argv.extend_from_slice(&args);
            let err = Cli::try_parse_from(argv).expect_err("refused");
            assert_eq!(value_error_line(&err).as_deref(), Some(line), "{args:?}");
        }
        let unknown = Cli::try_parse_from(["presence-service", "--no-such-flag"]).unwrap_err();
        assert_eq!(value_error_line(&unknown), None, "clap says that itself");
    }

    #[test]
    fn choices_ignore_case() {
        assert_eq!(parse(&["--node-type=LEAF"]).node_type, NodeType::Leaf);
        assert_eq!(parse(&["--log-format=JSON"]).log_format, LogFormat::Json);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (args, name) in [
            (vec![SECRET, "--log-level=loud"], "LOG_LEVEL"),
            (vec![SECRET, "--kv-bucket=a.b"], "KV_BUCKET"),
            (vec![SECRET, "--kv-replicas=2"], "KV_REPLICAS"),
            (vec![SECRET, "--nats-js-domain=h.ub"], "NATS_JS_DOMAIN"),
            (
                vec![SECRET, "--nats-creds=/nonexistent/x.creds"],
                "NATS_CREDS",
            ),
            (
                vec![SECRET, "--cors-allowed-origins=example.com"],
                "CORS_ALLOWED_ORIGINS",
            ),
            (
                vec![SECRET, "--cors-allowed-methods=GET,P0ST"],
                "CORS_ALLOWED_METHODS",
            ),
            (vec![SECRET, "--write-timeout-ms=0"], "WRITE_TIMEOUT_MS"),
            (
                vec![SECRET, "--rate-limit-writes-per-second=-1"],
                "RATE_LIMIT_WRITES_PER_SECOND",
            ),
            (vec![SECRET, "--rate-limit-burst=0"], "RATE_LIMIT_BURST"),
            (
                vec![SECRET, "--rate-limit-writes-per-second=1e-20"],
                "RATE_LIMIT_WRITES_PER_SECOND",
            ),
            (
                vec![SECRET, "--rate-limit-writes-per-second=NaN"],
                "RATE_LIMIT_WRITES_PER_SECOND",
            ),
            (vec![SECRET, "--cache-num-counters=0"], "CACHE_NUM_COUNTERS"),
            (vec![SECRET, "--cors-max-age=999999999"], "CORS_MAX_AGE"),
            (
                vec![SECRET, "--shutdown-timeout-secs=18446744073709551615"],
                "SHUTDOWN_TIMEOUT_SECS",
            ),
            (vec![SECRET, "--jwt-max-lifetime=0"], "JWT_MAX_LIFETIME"),
            (
                vec![SECRET, "--http-keepalive-timeout-secs=11"],
                "HTTP_KEEPALIVE_TIMEOUT_SECS",
            ),
            (
                vec![SECRET, "--http-header-read-timeout-secs=0"],
                "HTTP_HEADER_READ_TIMEOUT_SECS",
            ),
            (
                vec![SECRET, "--http-max-connections=0"],
                "HTTP_MAX_CONNECTIONS",
            ),
            (
                vec![SECRET, "--stream-max-per-caller=0"],
                "STREAM_MAX_PER_CALLER",
            ),
            (
                vec![SECRET, "--stream-event-log-max-bytes=100"],
                "STREAM_EVENT_LOG_MAX_BYTES",
            ),
            (
                vec![SECRET, "--http-send-timeout-secs=0"],
                "HTTP_SEND_TIMEOUT_SECS",
            ),
        ] {
            let err = parse(&args).validate().unwrap_err().to_string();
            assert!(err.starts_with(name), "{args:?}: {err}");
        }
    }
}
