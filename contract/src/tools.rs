//! Where the tools the product runs are found, so `presence-operator dev`,
//! the tests and the benchmarks all start the same `nats-server`.

use std::path::{Path, PathBuf};

/// Variable naming the `nats-server` binary explicitly.
pub const NATS_SERVER_BIN: &str = "NATS_SERVER_BIN";
/// Where `make tools` installs `nats-server`, relative to the repository.
pub const REPO_NATS_SERVER: &str = ".tools/venv/bin/nats-server";

/// Finds `nats-server`: `$NATS_SERVER_BIN`, then the repository's
/// `.tools/venv` under `repo_root`, then whatever `PATH` has.
pub fn nats_server_bin(repo_root: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os(NATS_SERVER_BIN).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let installed = repo_root.join(REPO_NATS_SERVER);
    if installed.is_file() {
        installed
    } else {
        PathBuf::from("nats-server")
    }
}
