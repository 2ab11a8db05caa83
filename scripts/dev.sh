#!/usr/bin/env bash
# `make dev`: a local hub NATS server (JetStream domain "hub") and a center
# presence-service, in the foreground. Ctrl-C stops both.
#
# Ports can be moved with DEV_HTTP_PORT, DEV_NATS_PORT, DEV_NATS_MONITOR_PORT
# and DEV_LEAF_PORT. State lives in .dev/ (delete it to start empty).
set -euo pipefail
cd "$(dirname "$0")/.."

HTTP_PORT="${DEV_HTTP_PORT:-8080}"
NATS_PORT="${DEV_NATS_PORT:-4222}"
MONITOR_PORT="${DEV_NATS_MONITOR_PORT:-8222}"
LEAF_PORT="${DEV_LEAF_PORT:-7422}"
NATS_SERVER=.tools/venv/bin/nats-server
SERVICE=target/debug/presence-service
DEV=.dev
mkdir -p "$DEV"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$HTTP_PORT" "$NATS_PORT" "$MONITOR_PORT" "$LEAF_PORT"; do
  if port_busy "$p"; then
    echo "make dev: port $p on 127.0.0.1 is already in use (set DEV_HTTP_PORT, DEV_NATS_PORT, DEV_NATS_MONITOR_PORT or DEV_LEAF_PORT)" >&2
    exit 1
  fi
done

# A per-checkout secret, kept so printed tokens stay valid across restarts.
if [ -z "${JWT_SECRET:-}" ]; then
  [ -s "$DEV/jwt-secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEV/jwt-secret"
  JWT_SECRET=$(cat "$DEV/jwt-secret")
fi
export JWT_SECRET

cat > "$DEV/hub.conf" <<CONF
server_name: dev-hub
listen: 127.0.0.1:${NATS_PORT}
http: 127.0.0.1:${MONITOR_PORT}
jetstream { domain: hub, store_dir: "$(pwd)/${DEV}/jetstream" }
leafnodes { listen: 127.0.0.1:${LEAF_PORT} }
CONF

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "make dev: stopped"
  exit 0
}
trap cleanup INT TERM EXIT

"$NATS_SERVER" -c "$DEV/hub.conf" > "$DEV/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:${MONITOR_PORT}/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

NODE_TYPE=center NODE_ID=dev-center SERVICE_HOST=127.0.0.1 SERVICE_PORT="$HTTP_PORT" \
  NATS_URL="nats://127.0.0.1:${NATS_PORT}" NATS_JS_DOMAIN=hub LOG_LEVEL="${LOG_LEVEL:-info}" \
  "$SERVICE" &
pids+=($!)
for _ in $(seq 1 200); do
  curl -fs "http://127.0.0.1:${HTTP_PORT}/health/readiness" >/dev/null 2>&1 && break
  sleep 0.1
done

USER_TOKEN=$("$SERVICE" token --sub dev)
SERVICE_TOKEN=$("$SERVICE" token --sub dev-service --scope presence:write)
URL="http://127.0.0.1:${HTTP_PORT}"
cat <<INFO

  presence-service (center) is ready at ${URL}   (NATS hub: nats://127.0.0.1:${NATS_PORT}, JetStream domain "hub")

  Token for user "dev" (may set its own presence):
    export TOKEN=${USER_TOKEN}
  Token with scope presence:write (may set anyone's, and use batch):
    export SERVICE_TOKEN=${SERVICE_TOKEN}

  Try:
    curl -s -X POST -H "Authorization: Bearer \$TOKEN" -d '{"status":"away","message":"In a meeting"}' ${URL}/api/v2/presence/dev
    curl -s -H "Authorization: Bearer \$TOKEN" ${URL}/api/v2/presence/dev
    curl -s -H "Authorization: Bearer \$TOKEN" "${URL}/api/v2/presence?users=dev,someone"
    curl -s ${URL}/health

  Logs: this terminal (service), ${DEV}/nats.log (NATS). Ctrl-C stops everything.

INFO
wait -n "${pids[@]}" || true
echo "make dev: a process exited; stopping" >&2
