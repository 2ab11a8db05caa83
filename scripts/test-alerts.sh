#!/usr/bin/env bash
# The alert rules: valid for Prometheus (promtool check), each alert firing
# and staying quiet where it should (promtool unit tests), and the
# PrometheusRule object carrying exactly the same groups as alerts.yaml.
# Then the docs: every alert has its runbook heading in docs/operator.md
# (the alerts' `runbook` links point at it), and every dashboard panel is
# described there by its title.
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
.tools/venv/bin/python - <<'PY'
import json, sys, yaml
doc = open("docs/operator.md").read()
headings = {line.strip() for line in doc.splitlines()}
alerts = [
    rule["alert"]
    for group in yaml.safe_load(open("config/prometheus/alerts.yaml"))["groups"]
    for rule in group["rules"]
    if "alert" in rule
]
panels = [
    panel["title"]
    for panel in json.load(open("config/grafana/presencecluster.json"))["panels"]
    if panel.get("type") != "row"
]
missing = [f"heading '#### {a}'" for a in alerts if f"#### {a}" not in headings]
missing += [f"'**{t}**'" for t in panels if f"**{t}**" not in doc]
if missing:
    sys.exit("docs/operator.md lacks:\n  " + "\n  ".join(missing))
print(f"docs/operator.md has a runbook for each of the {len(alerts)} alerts "
      f"and describes each of the {len(panels)} dashboard panels")
PY
