//! `presence-operator run`: leader election, the controller runtime with
//! its watches, and the `/metrics` + `/health` endpoints.

use crate::controller::{self, Context, HubAccess};
use crate::crd::PresenceCluster;
use crate::lease::{LEASE_DURATION, LeaderElector, RENEW_INTERVAL};
use crate::metrics::Metrics;
use crate::render::MANAGER;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(kube::Error),
    #[error("cannot set up metrics: {0}")]
    Metrics(prometheus::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("lost the leader Lease; exiting so another replica takes over")]
    LostLeadership,
}

// Each cause is part of the message, so it is not also a `source()`:
// printing an error chain shows it once.
impl From<kube::Error> for RunError {
    fn from(err: kube::Error) -> Self {
        RunError::Client(err)
    }
}

impl From<prometheus::Error> for RunError {
    fn from(err: prometheus::Error) -> Self {
        RunError::Metrics(err)
    }
}

/// Options of `presence-operator run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    pub listen: SocketAddr,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub hub: HubAccess,
    /// The Kubernetes cluster this operator serves (`None`: every region).
    pub cluster_name: Option<String>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Serves `/metrics` and `/health` on `listen` in the background.
pub async fn serve_http(listen: SocketAddr, metrics: Metrics) -> Result<(), RunError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| RunError::Listen(listen, e))?;
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.render() {
                        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "metrics server stopped");
        }
    });
    Ok(())
}

/// Waits until this replica holds the Lease, then keeps renewing it; the
/// returned future resolves only if leadership is lost.
async fn lead(elector: LeaderElector, metrics: Metrics) -> impl Future<Output = ()> {
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => tracing::info!("another replica leads; waiting"),
            Err(err) => tracing::warn!(error = %err, "cannot read the leader Lease"),
        }
        tokio::time::sleep(RENEW_INTERVAL).await;
    }
    tracing::info!("acquired the leader Lease");
    metrics.leader.set(1);
    async move {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(RENEW_INTERVAL).await;
            match elector.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => return,
                Err(err) => tracing::warn!(error = %err, "cannot renew the leader Lease"),
            }
            // Stop before another replica may consider the Lease expired.
            if last_renewal.elapsed() + RENEW_INTERVAL >= LEASE_DURATION {
                return;
            }
        }
    }
}

/// Runs the controller until SIGTERM/Ctrl-C or lost leadership.
pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let metrics = Metrics::new()?;
    serve_http(opts.listen, metrics.clone()).await?;

    let lost: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = if opts.leader_election {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &opts.lease_namespace);
        let elector = LeaderElector::new(leases, &opts.lease_name, &opts.identity);
        Box::pin(lead(elector, metrics.clone()).await)
    } else {
        metrics.leader.set(1);
        Box::pin(std::future::pending())
    };

    let ns = opts.namespace.as_deref();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let clusters: Api<PresenceCluster> = api(&client, ns);
    let controller = Controller::new(clusters, watcher::Config::default().any_semantic());
    metrics.init_error_reasons(
        crate::controller::conditions::Reason::ALL
            .iter()
            .map(|r| r.as_str()),
    );
    let mut ctx = Context::new(client.clone(), &opts.identity, metrics, opts.hub.clone());
    ctx.operator_namespace = opts.lease_namespace.clone();
    ctx.cluster_name = opts.cluster_name.clone();
    let ctx = Arc::new(ctx);
    let controller = controller
        .owns(api::<StatefulSet>(&client, ns), owned.clone())
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), owned.clone())
        .owns(api::<NetworkPolicy>(&client, ns), owned)
        // Secrets are not watched at all, so the operator needs neither list
        // nor watch on Secrets: it reads the ones it uses by name on every
        // reconcile, and a ready cluster is reconciled every minute, so a
        // rotated or newly created Secret takes effect within a minute.
        .shutdown_on_signal()
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(presencecluster = %object, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "reconcile error"),
            }
        });
    tokio::select! {
        () = controller => {
            tracing::info!("controller stopped");
            Ok(())
        }
        () = lost => Err(RunError::LostLeadership),
    }
}

/// Default identity: the pod name, else the host name.
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("presence-operator-{}", std::process::id()))
}
