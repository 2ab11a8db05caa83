//! PresenceCluster data plane: the presence API of one region.
//!
//! `main.rs` only parses configuration and calls [`run`]; everything else is
//! here so integration tests and benchmarks can build the same service.
//!
//! # Glossary
//!
//! - **Presence** ([`model::Presence`]): a user's manual status as the Go
//!   service stored it under the key `<user>`: status, message, last seen,
//!   the node that took the write, and an optional expiry.
//! - **Update** ([`record::Update`]): the new value of one of a user's keys
//!   (manual status, `seen`, or one session), or that key's removal.
//! - **Change** ([`store::Change`]): an update as the bucket ordered it: the
//!   user, the update, its KV revision and when the hub stored it. The
//!   watch turns the bucket's entries into changes.
//! - **UserRecord** ([`record::UserRecord`]): everything known about one
//!   user (manual status, last sign of life, sessions), each part at its own
//!   revision; what the cache holds. Changes merge into it in any order.
//! - **PresenceView** ([`record::PresenceView`]): the effective presence a
//!   client sees, folded from a record: a valid manual status wins, then the
//!   best live session, else offline.
//! - **The watch** ([`watch`]): one KV watch per node that applies every
//!   change to the cache and fans it out to change streams ([`fanout`]),
//!   recording visible changes in the [`event_log`] for resumes.

// Functions stay under about 100 lines (clippy.toml); tests are exempt.
#![warn(clippy::too_many_lines)]

pub mod api;
pub mod auth;
pub mod cache;
pub mod config;
pub mod event_log;
pub mod fanout;
pub mod feed;
pub mod keys;
pub mod kv_probe;
pub mod metrics;
pub mod model;
pub mod node_id;
pub mod ratelimit;
pub mod record;
pub mod rfc3339;
pub mod server;
pub mod service;
pub mod session;
pub mod store;
pub mod watch;

#[cfg(test)]
mod fixtures;

use crate::auth::Verifier;
use crate::cache::PresenceCache;
use crate::config::{Settings, StoreKind};
use crate::metrics::Metrics;
use crate::service::PresenceService;
use crate::store::PresenceStore;
use crate::store::memory::MemoryStore;
use crate::store::nats::NatsStore;
use crate::watch::WatchStatus;
use std::sync::Arc;
use std::time::Instant;

/// Why the service could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot set up metrics: {0}")]
    Metrics(prometheus::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

// The cause is part of the message, so it is not also a `source()`:
// printing an error chain shows it once.
impl From<prometheus::Error> for Error {
    fn from(err: prometheus::Error) -> Self {
        Error::Metrics(err)
    }
}

/// Shared by every handler, behind one `Arc` so that the per-request clone
/// axum makes is a single reference-count increment (cloning the fields
/// themselves cost ~9% of a cached read in profiles).
pub type AppState = Arc<App>;

/// What [`AppState`] points to.
pub struct App {
    pub settings: Arc<Settings>,
    pub service: PresenceService,
    pub verifier: Arc<Verifier>,
    pub metrics: Metrics,
    pub watch: Arc<WatchStatus>,
    pub limiter: ratelimit::RateLimiter,
    pub streams: fanout::StreamHub,
    /// Flips to `true` when the node starts stopping, so change streams
    /// end (their clients reconnect elsewhere) instead of holding it up.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Set on SIGTERM, `SHUTDOWN_DELAY_SECS` before `stopping`: readiness
    /// fails so load balancers take the node out while it still serves.
    pub leaving: std::sync::atomic::AtomicBool,
    pub started: Instant,
    /// `/health`'s check of the bucket, shared for a second.
    pub kv_probe: kv_probe::KvProbe,
}

/// Builds the state and starts the background work (bucket opening, watch).
pub async fn build(settings: Settings) -> Result<AppState, Error> {
    let metrics = Metrics::new()?;
    let store: Arc<dyn PresenceStore> = match settings.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Nats => {
            let nats = Arc::new(NatsStore::connect(&settings, metrics.clone()).await?);
            let opener = nats.clone();
            tokio::spawn(async move { opener.open_bucket_until_ready().await });
            nats
        }
    };
    Ok(build_with_store(settings, store, metrics))
}

/// Builds the state around a given store and starts the supervised watch;
/// [`build`] picks the store from the settings. Tests use this to put a
/// store with faults behind the real service.
pub fn build_with_store(
    settings: Settings,
    store: Arc<dyn PresenceStore>,
    metrics: Metrics,
) -> AppState {
    let cache = PresenceCache::new(
        settings.cache_max_cost,
        settings.cache_initial_capacity,
        metrics.cache.clone(),
    );
    let watch = Arc::new(WatchStatus::default());
    let streams = fanout::StreamHub::new(
        fanout::StreamCaps {
            streams: settings.stream_max_connections,
            per_caller: settings.stream_max_per_caller,
            follows: settings.stream_max_follows,
        },
        settings.event_log_max_bytes,
    );
    tokio::spawn(watch::supervise(
        store.clone(),
        cache.clone(),
        watch.clone(),
        metrics.clone(),
        streams.feed(),
        streams.log(),
    ));
    let verifier = Verifier::new(
        &settings.jwt_secret,
        settings.jwt_issuer.as_deref(),
        settings.jwt_audience.as_deref(),
    )
    .with_max_lifetime(settings.jwt_max_lifetime);
    Arc::new(App {
        service: PresenceService::new(
            store,
            cache,
            watch.clone(),
            &settings.node_id,
            streams.log(),
            metrics.clone(),
        ),
        limiter: ratelimit::RateLimiter::new(settings.write_limit),
        streams,
        stopping: tokio::sync::watch::channel(false).0,
        leaving: std::sync::atomic::AtomicBool::new(false),
        settings: Arc::new(settings),
        verifier: Arc::new(verifier),
        metrics,
        watch,
        started: Instant::now(),
        kv_probe: kv_probe::KvProbe::default(),
    })
}

/// Serves until SIGTERM or Ctrl-C, then fails readiness but keeps serving
/// for `SHUTDOWN_DELAY_SECS` (a second signal cuts that short), stops
/// accepting, lets in-flight requests finish (bounded by
/// `SHUTDOWN_TIMEOUT_SECS`) and returns.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let addr = settings.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| Error::Bind { addr, error })?;
    let grace = settings.shutdown_timeout;
    let limits = settings.http;
    let state = build(settings).await?;
    tracing::info!(
        %addr,
        node_id = %state.settings.node_id,
        node_type = state.settings.node_type.as_str(),
        store = state.service.store().kind(),
        "presence-service listening"
    );
    tokio::spawn(leave_on_signal(state.clone()));
    let mut stopping = state.stopping.subscribe();
    let server = server::serve(
        listener,
        api::Front::new(state.clone(), api::router(state.clone())),
        limits,
        state.metrics.clone(),
        state.stopping.subscribe(),
    );
    let forced = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = server => {}
        () = forced => tracing::warn!(?grace, "in-flight requests did not finish in time; exiting"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// On the first signal: readiness fails at once, and the node stops after
/// `SHUTDOWN_DELAY_SECS`, or at a second signal. In Kubernetes a deleted
/// pod leaves its Services' endpoints while it is told to stop, and
/// kube-proxy, ingresses and load balancers learn that only seconds later:
/// a node that closed its listener at once would refuse the requests they
/// still send it.
async fn leave_on_signal(state: AppState) {
    shutdown_signal().await;
    state
        .leaving
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let delay = state.settings.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "shutdown requested; not ready, serving on while load balancers let go"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown_signal() => tracing::info!("second signal; not waiting any longer"),
        }
    }
    tracing::info!("shutting down; finishing in-flight requests");
    let _ = state.stopping.send(true);
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
