#!/usr/bin/env bash
# No Docker engine runs here, so the Dockerfiles are checked against the
# workspace instead: every member's manifest and sources are copied (cargo
# refuses a workspace with a missing member), its stub is made and removed,
# and each real library source is touched so the dependency-caching stage
# can't leave a stub's build in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

members=$(sed -n '/^members/,/]/p' Cargo.toml | grep -o '"[a-z-]*"' | tr -d '"')
status=0
for dockerfile in Dockerfile.operator Dockerfile.dataplane; do
  for m in $members; do
    for needle in "COPY $m/Cargo.toml $m/Cargo.toml" "COPY $m $m" "rm -rf.* $m/src"; do
      grep -Eq "$needle" "$dockerfile" || { echo "$dockerfile: missing '$needle'" >&2; status=1; }
    done
    grep -Eq "for crate in .*\\b$m\\b" "$dockerfile" || { echo "$dockerfile: no stub for $m" >&2; status=1; }
  done
  # Libraries the binary links must be rebuilt from the real sources.
  for lib in contract dataplane; do
    grep -Eq "^RUN touch .*$lib/src/lib.rs" "$dockerfile" || { echo "$dockerfile: $lib/src/lib.rs is not touched" >&2; status=1; }
  done
done
[ $status -eq 0 ] && echo "check-dockerfiles: both Dockerfiles build every workspace member from its real sources"
exit $status
