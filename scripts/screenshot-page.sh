#!/usr/bin/env bash
# Screenshots of the live presence page for the docs: runs the browser test
# (scripts/test-browser.sh) and, after it passes, saves the page with a
# roster of every status into docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/screenshots
SCREENSHOT_DIR="$PWD/docs/screenshots" exec scripts/test-browser.sh
