//! Test fixtures: real `nats-server` and `presence-service` processes on free
//! loopback ports, in temp dirs, killed on drop (also when a test fails).
//! Readiness is always awaited by polling, never by fixed sleeps.

#![allow(dead_code)]

pub use testkit::*;

mod sse;
#[allow(unused_imports)]
pub use sse::*;

use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

/// The shared JWT secret of every test service.
pub const SECRET: &str = "integration-test-secret-0123456789";

/// How to start one `presence-service`.
pub struct ServiceSpec<'a> {
    pub node_id: &'a str,
    pub node_type: &'a str,
    pub nats_url: String,
    pub extra_env: Vec<(&'a str, String)>,
}

impl<'a> ServiceSpec<'a> {
    /// A node with the common test settings and nothing extra.
    pub fn new(node_id: &'a str, node_type: &'a str, nats_url: String) -> Self {
        ServiceSpec {
            node_id,
            node_type,
            nats_url,
            extra_env: vec![],
        }
    }
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

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Sends SIGTERM without waiting for the process to exit.
    pub fn signal_term(&self) {
        let pid = self.proc.as_ref().expect("service is running").pid();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Waits for the process to exit by itself (after a signal sent
    /// earlier) and returns the exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.proc
            .take()
            .expect("service is running")
            .wait_exit("its shutdown")
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.proc.take().expect("service is running").terminate()
    }

    /// Sends SIGTERM; the exit status and everything the process logged.
    pub fn terminate_logged(&mut self) -> (std::process::ExitStatus, String) {
        self.proc
            .take()
            .expect("service is running")
            .terminate_logged()
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
    // Fields drop in order: services, then NATS, then the directory holding
    // their logs (printed by the processes' guards when a test fails).
    pub center: Service,
    pub eu: Service,
    pub us: Service,
    pub hub: Nats,
    pub eu_nats: Nats,
    pub us_nats: Nats,
    pub dir: TempDir,
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_with(vec![]).await
    }

    /// The cluster with `extra_env` set on every service.
    pub async fn start_with(extra_env: Vec<(&'static str, String)>) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_owned();
        let hub = Nats::hub(&root).await;
        let eu_nats = Nats::leaf(&root, "eu", &hub, None).await;
        let us_nats = Nats::leaf(&root, "us", &hub, Some("us")).await;
        let spec = |node_id, node_type, nats: &Nats| ServiceSpec {
            node_id,
            node_type,
            nats_url: nats.url(),
            extra_env: extra_env.clone(),
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

    /// Starts one more leaf node on `eu`'s NATS server, with an empty cache.
    pub async fn start_eu_node(&self, node_id: &str) -> Service {
        let spec = ServiceSpec {
            node_id,
            node_type: "leaf",
            nats_url: self.eu_nats.url(),
            extra_env: vec![],
        };
        Service::start(self.dir.path(), spec).await
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

/// GETs `url` (with a reader token when `authed`) and parses the JSON body;
/// a body that isn't JSON is `Value::Null`.
pub async fn get_json(client: &reqwest::Client, url: &str, authed: bool) -> serde_json::Value {
    let mut request = client.get(url);
    if authed {
        request = request.header("Authorization", bearer("reader", ""));
    }
    let response = request.send().await.expect("request completes");
    response.json().await.unwrap_or_default()
}
