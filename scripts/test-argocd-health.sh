#!/usr/bin/env bash
# Tests the Argo CD health check with a real Lua interpreter, and checks that
# the argocd-cm patch embeds exactly config/argocd/health.lua.
set -euo pipefail
cd "$(dirname "$0")/.."
LUA=$(command -v lua5.4 || command -v lua5.3 || command -v lua || true)
if [ -z "$LUA" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "test-argocd-health: no Lua interpreter (apt-get install lua5.4)" >&2
    exit 1
  fi
  echo "test-argocd-health: skipped, no Lua interpreter here (apt-get install lua5.4); CI runs it"
  exit 0
fi
"$LUA" config/argocd/health_test.lua
.tools/venv/bin/python - <<'PY'
import sys, yaml
patch = yaml.safe_load(open("config/argocd/argocd-cm-patch.yaml"))
embedded = patch["data"]["resource.customizations.health.presencecluster.io_PresenceCluster"]
if embedded.rstrip("\n") != open("config/argocd/health.lua").read().rstrip("\n"):
    sys.exit("config/argocd/argocd-cm-patch.yaml does not embed config/argocd/health.lua; regenerate it")
print("argocd-cm patch embeds health.lua")
PY
