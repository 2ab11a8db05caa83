#!/usr/bin/env bash
# Strict schema validation of everything a cluster would receive: the CRD,
# every example rendered by `presence-operator render`, and the Kubernetes
# manifests under config/. (PresenceCluster objects themselves are checked
# against the CRD's schema and CEL rules by operator/tests/render.rs.)
set -euo pipefail
cd "$(dirname "$0")/.."

VALIDATE=.tools/venv/bin/kubernetes-validate
OPERATOR=${OPERATOR:-${CARGO_TARGET_DIR:-target}/debug/presence-operator}
[ -x "$VALIDATE" ] || scripts/install-tools.sh
[ -x "$OPERATOR" ] || cargo build -q -p presence-operator

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
files=(crds/presencecluster.yaml)
for example in examples/*.yaml; do
  if grep -q '^kind: PresenceCluster' "$example"; then
    out="$tmp/rendered-$(basename "$example")"
    "$OPERATOR" render -f "$example" > "$out"
    files+=("$out")
    # A manifest spread over clusters: also what each cluster's operator
    # applies.
    for cluster in $(sed -n 's/^ *cluster: *\([A-Za-z0-9.-]*\).*/\1/p' "$example" | sort -u); do
      out="$tmp/rendered-$cluster-$(basename "$example")"
      "$OPERATOR" render --cluster-name "$cluster" -f "$example" > "$out"
      files+=("$out")
    done
  else
    files+=("$example")
  fi
done
while IFS= read -r -d '' manifest; do
  # Only Kubernetes objects (not kustomizations or Argo CD health scripts).
  if grep -q '^apiVersion:' "$manifest" && ! grep -q '^kind: Kustomization' "$manifest"; then
    files+=("$manifest")
  fi
done < <(find config -name '*.yaml' -print0 2>/dev/null)

"$VALIDATE" --strict --quiet "${files[@]}"
echo "validate-manifests: ${#files[@]} files valid for Kubernetes $("$VALIDATE" --version 2>/dev/null | head -1)"
