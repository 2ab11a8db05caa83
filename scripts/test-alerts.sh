#!/usr/bin/env bash
# The alert rules: valid for Prometheus (promtool check), each alert firing
# and staying quiet where it should (promtool unit tests), and the
# PrometheusRule object carrying exactly the same groups as alerts.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v promtool >/dev/null || scripts/install-tools.sh
promtool check rules config/prometheus/alerts.yaml
promtool test rules config/prometheus/tests/alerts_test.yaml
.tools/venv/bin/python - <<'PY'
import sys, yaml
plain = yaml.safe_load(open("config/prometheus/alerts.yaml"))["groups"]
crd = yaml.safe_load(open("config/prometheus/prometheusrule.yaml"))["spec"]["groups"]
if plain != crd:
    sys.exit("config/prometheus/prometheusrule.yaml differs from alerts.yaml; copy the groups over")
print("prometheusrule.yaml carries the groups of alerts.yaml")
PY
