#!/usr/bin/env bash
# The live presence page (examples/web/) in a real browser: starts
# `presence-operator dev -f examples/dev.yaml` (hub + eu + us) on free ports
# with a temporary data dir, and drives Debian's headless Chromium with
# Selenium through tests/browser/test_page.py: cross-region updates, a
# stream resuming with lastEventId after its API node restarts, the status
# form. Everything it started is stopped at exit, even on failure.
#
# SCREENSHOT_DIR=docs/screenshots also saves screenshots of the page there
# (scripts/screenshot-page.sh does that).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
PYTHON=.tools/venv/bin/python

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] \
   || ! "$PYTHON" -c "import selenium" 2>/dev/null; then
  scripts/install-tools.sh
fi
# Always: a binary older than the sources would test old code.
$CARGO build --quiet --bin presence-service --bin presence-operator

# Ports: the page on base-2, metrics on base-1, the three APIs on base..base+2;
# NATS (one hub server, two leaves) at these offsets from the NATS base.
read -r BASE NATS_BASE < <("$PYTHON" - <<'PY'
import random, socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
for _ in range(200):
    base = random.randrange(30000, 45000)
    nats = random.randrange(46000, 58000)
    if all(free(base + o) for o in range(-2, 3)) and \
       all(free(nats + o) for o in (0, 11, 12, 100, 111, 112, 200)):
        print(base, nats)
        break
else:
    raise SystemExit("no free ports")
PY
)

WORK=$(mktemp -d)
DATA_DIR="$WORK/data"
LOG="$WORK/dev.log"
DEV_PID=""

cleanup() {
  local status=$?
  if [ -n "$DEV_PID" ] && kill -0 "$DEV_PID" 2>/dev/null; then
    kill -INT "$DEV_PID" 2>/dev/null || true
    for _ in $(seq 1 200); do
      kill -0 "$DEV_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$DEV_PID" 2>/dev/null || true
  fi
  # Whatever dev did not stop (it was killed, or died), by its pid files.
  for pid_file in "$DATA_DIR"/pids/*.pid; do
    [ -f "$pid_file" ] && kill -KILL "$(cat "$pid_file")" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ] && [ -f "$LOG" ]; then
    echo "---- presence-operator dev output ----" >&2
    cat "$LOG" >&2
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

target/debug/presence-operator dev -f examples/dev.yaml \
  --base-port "$BASE" --nats-base-port "$NATS_BASE" --data-dir "$DATA_DIR" \
  --nats-server .tools/venv/bin/nats-server \
  --presence-service target/debug/presence-service >"$LOG" 2>&1 &
DEV_PID=$!

for _ in $(seq 1 1800); do
  grep -qx ready "$LOG" && break
  kill -0 "$DEV_PID" 2>/dev/null || { echo "test-browser: presence-operator dev exited" >&2; exit 1; }
  sleep 0.1
done
grep -qx ready "$LOG" || { echo "test-browser: dev not ready after 180 s" >&2; exit 1; }

summary_value() { sed -n "$1" "$LOG" | head -n 1; }
export PAGE_URL TOKEN API_CENTER API_EU API_US DATA_DIR SCREENSHOT_DIR
PAGE_URL=$(summary_value 's/^  Live page: \(http:[^#]*\)#.*$/\1/p')
TOKEN=$(summary_value 's/^    export TOKEN=//p')
API_CENTER=$(summary_value 's/^  center .*API \(http:[^ ]*\) .*$/\1/p')
API_EU=$(summary_value 's/^  eu .*API \(http:[^ ]*\) .*$/\1/p')
API_US=$(summary_value 's/^  us .*API \(http:[^ ]*\) .*$/\1/p')
SCREENSHOT_DIR="${SCREENSHOT_DIR:-}"
for name in PAGE_URL TOKEN API_CENTER API_EU API_US; do
  [ -n "${!name}" ] || { echo "test-browser: no $name in dev's summary" >&2; exit 1; }
done
echo "test-browser: page $PAGE_URL, APIs $API_CENTER $API_EU $API_US"

"$PYTHON" tests/browser/test_page.py
