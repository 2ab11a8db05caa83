#!/usr/bin/env bash
# Shows a session expiring live on a change stream, against a running
# `make dev` (hub + eu + us): a stream is opened at the us leaf, a device
# heartbeats at the eu leaf with a 5 s lease, then goes quiet; the bucket
# expires the session by itself and the stream reports the user offline.
#
#   make dev          # in one terminal
#   make demo         # in another
set -euo pipefail

DATA_DIR=${DATA_DIR:-.dev/dev}
EU=${EU:-http://127.0.0.1:8081}
US=${US:-http://127.0.0.1:8082}
USER_ID=${USER_ID:-demo}
SERVICE=${PRESENCE_SERVICE:-target/debug/presence-service}

if [[ ! -r "$DATA_DIR/jwt-secret" ]]; then
  echo "no $DATA_DIR/jwt-secret: start the local cluster first with 'make dev'" >&2
  exit 1
fi
if ! curl -sf "$US/health/readiness" >/dev/null; then
  echo "$US is not ready: start the local cluster first with 'make dev'" >&2
  exit 1
fi
TOKEN=$(JWT_SECRET=$(cat "$DATA_DIR/jwt-secret") "$SERVICE" token --sub "$USER_ID")
auth=(-H "Authorization: Bearer $TOKEN")

echo "== stream at us: $US/api/v2/presence/stream?users=$USER_ID"
curl -sN "${auth[@]}" "$US/api/v2/presence/stream?users=$USER_ID" | sed -u 's/^/   stream| /' &
stream=$!
trap 'kill $stream 2>/dev/null || true' EXIT
sleep 1

for i in 1 2 3; do
  [ "$i" -eq 1 ] || sleep 2
  echo "== heartbeat $i at eu at $(date -u +%T) (session laptop, ttlSeconds 5)"
  curl -sf -X PUT "${auth[@]}" -d '{"status":"online","device":"laptop","ttlSeconds":5}' \
    "$EU/api/v2/presence/$USER_ID/sessions/laptop" >/dev/null
done
echo "== no more heartbeats; the session expires about 5 s after the last one (heartbeat 3)"
sleep 11
echo "== GET at eu:"
curl -s "${auth[@]}" "$EU/api/v2/presence/$USER_ID"
echo
