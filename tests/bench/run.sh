#!/usr/bin/env bash
# `make bench`: build the release gateway, the reference guest, the benchmark-only native
# build and the load generator, run the standard scenarios against fresh gateways on
# loopback, and write tests/bench/RESULTS.md (raw loadgen JSON and logs under target/bench/).
#
# Scenarios (see tests/bench/RESULTS.md for what each measures):
#   density   idle connections at 1k, 5k, 10k and the most one process admits; RSS each
#   storm     new connections as fast as possible at a few --max-inflight settings
#   delivery  10,000 connections (2,000 users x 5): as fast as the gateway takes events
#             (batches of 100), then 25 % and 50 % of that rate (steady, batches of 10)
#   native    the 100 % delivery runs alternate with the same runs on the handler compiled
#             natively (no Wasm), for the sandbox's cost; plus sandbox_calls, the per-call
#             cost without sockets
#   resume    a resume storm: 10,000 clients (2,000 users) miss 20 events each, then all
#             reconnect at once with ?since=; time to recovered, and the log's bytes per event
#   hibernate idle connections hibernated (at 10k and the most one process admits) against
#             the same connections live; a 90/10 blend (10 % of the connections receive
#             events, 90 % stay hibernated) against the same blend live and on the Node.js
#             peer; wake-up time from the gateway's gateway_wake_seconds histogram
#   cluster   cluster mode on a local nats-server (JetStream): the same delivery run against
#             one embedded-mode gateway, one cluster-mode gateway, and two cluster-mode
#             gateways each publishing to the other's users; publish-ack latency from the
#             gateway's histogram; a resume storm read from the stream
#   streams   AI output streams: STREAMS_CONNECTIONS connections of STREAMS_USERS users, one
#             message streaming per user at 50 appends/s, against the same tokens sent as
#             plain events; frames and bytes per second, CPU per append, publish-to-receipt
#             p99; a resume that gets a 2,000-token message as one snapshot
#   control   client calls (rpc) through the gateway against the same calls straight to the
#             backend, one at a time and from 50 connections at once; the delay from a close
#             to its user.offline webhook (control_bench)
#   sse       the same 10,000 connections of 2,000 users over WebSocket and over server-sent
#             events (GET /sse), alternating, with a light publish: memory per connection,
#             connect times and delivery; and, when density measured the capacity, the most
#             SSE connections one process admits
#   overload  latency under overload: server and load generator on their own cores, batches
#             published as fast as answered; the gateway with its queue-delay admission, the
#             same without it (queue_delay_ms = 0), and the Node.js peer, alternating
#   identities  what an identity a cluster node subscribes to costs: the same hibernated
#             connections as one user each and as five per user, on one cluster-mode gateway
#             and on the embedded log; the RSS difference over the identities more
#   multi     100,000 connections across several gateway processes, if time allows; in
#             cluster mode (one nats-server) when nats-server is installed
#
# Knobs (environment): BENCH_RUNS (3), BENCH_BUDGET_SECS (1500, the whole run including the
# builds; the multi-process scenario is skipped when it would not fit), BENCH_QUICK=1 (tiny
# numbers, for developing this script), BENCH_SKIP_BUILD=1, BENCH_GATEWAY (another gateway
# binary, say an older build, to measure against), BENCH_OUT (raw data; target/bench), BENCH_RESULTS (where the Markdown
# goes; default tests/bench/RESULTS.md), BENCH_SCENARIOS (space separated
# subset of: density storm delivery native resume streams control sse tls startup peer overload hibernate cluster identities multi).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
START_EPOCH=$(date +%s)

RUNS=${BENCH_RUNS:-3}
BUDGET=${BENCH_BUDGET_SECS:-1500}
QUICK=${BENCH_QUICK:-0}
SCENARIOS=${BENCH_SCENARIOS:-density storm delivery native resume streams control sse tls startup peer overload hibernate cluster identities multi}
CARGO=${CARGO:-cargo}
MAKE=${MAKE:-make}

GATEWAY=${BENCH_GATEWAY:-$ROOT/target/release/gateway}
NATIVE=$ROOT/target/release/gateway-bench-native
LOADGEN=$ROOT/target/release/loadgen
SANDBOX_CALLS=$ROOT/target/release/sandbox_calls
RESUME_STORM=$ROOT/target/release/resume_storm
NATS_SERVER=${NATS_SERVER:-$ROOT/target/tools/nats/bin/nats-server}
GUEST=$ROOT/target/components/handler.wasm
OUT=${BENCH_OUT:-$ROOT/target/bench}
LOGS=$OUT/logs
RESULTS=${BENCH_RESULTS:-$ROOT/tests/bench/RESULTS.md}

# Scenario sizes.
if [[ $QUICK == 1 ]]; then
    DENSITY_POINTS=(100 200)
    STORM_CONNECTIONS=200
    STORM_INFLIGHT=(16 64)
    DELIVERY_CONNECTIONS=200
    DELIVERY_USERS=40
    PUBLISH_SECS=2
    MULTI_GATEWAYS=2
    MULTI_PER_GATEWAY=200
    RESUME_CLIENTS=200
    STREAMS_CONNECTIONS=200
    STREAMS_USERS=40
    RESUME_USERS=40
    CLUSTER_CONNECTIONS=200
    CLUSTER_USERS=40
else
    DENSITY_POINTS=(1000 5000 10000)
    STORM_CONNECTIONS=5000
    STORM_INFLIGHT=(8 32 128)
    DELIVERY_CONNECTIONS=10000
    DELIVERY_USERS=2000
    PUBLISH_SECS=10
    MULTI_GATEWAYS=6
    MULTI_PER_GATEWAY=16667
    RESUME_CLIENTS=10000
    STREAMS_CONNECTIONS=10000
    STREAMS_USERS=2000
    RESUME_USERS=2000
    CLUSTER_CONNECTIONS=5000
    CLUSTER_USERS=1000
fi
RESUME_MISSED=20
DELIVERY_BATCH=100
STEADY_BATCH=10
DELIVERY_PUBLISHERS=4
# Connections the most-one-process point asks for beyond the advertised capacity, to show
# the cap is where the gateway says it is (the extra ones must be refused with 503).
OVER_CAPACITY=32
# Seconds the multi-process scenario is expected to take; skipped when less is left.
MULTI_ESTIMATE=${BENCH_MULTI_ESTIMATE_SECS:-150}

SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export GATEWAY_JWT_SECRET=$SECRET # loadgen reads it from here too; never on a command line

log() { printf '[bench %4ds] %s\n' "$(($(date +%s) - START_EPOCH))" "$*" >&2; }
note() { # a line for the results file's notes section
    printf '%s\n' "$*" >>"$OUT/notes.txt"
    log "NOTE: $*"
}

# ---------------------------------------------------------------------------------------
# Processes we start, and cleanup.
GW_PIDS=()
LG_PIDS=()
MAP_COUNT_ORIG=""
cleanup() {
    local pid
    for pid in "${LG_PIDS[@]}" "${GW_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 0.5
    for pid in "${LG_PIDS[@]}" "${GW_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ -n $MAP_COUNT_ORIG ]]; then
        sysctl -q -w vm.max_map_count="$MAP_COUNT_ORIG" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() { # remove $1 from GW_PIDS / LG_PIDS
    local pid=$1 p keep=()
    for p in "${GW_PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    GW_PIDS=("${keep[@]}")
    keep=()
    for p in "${LG_PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    LG_PIDS=("${keep[@]}")
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_gateway LABEL BINARY [serve args...]; per-scenario limits come from the caller's
# environment (GATEWAY_LIMITS__*). Sets GW_PID and GW_PORT.
start_gateway() {
    local label=$1 binary=$2
    shift 2
    GW_PORT=$(free_port)
    GATEWAY_LISTEN=127.0.0.1:$GW_PORT GATEWAY_GUEST=$GUEST GATEWAY_LOG=warn \
        GATEWAY_LIMITS__SHUTDOWN_GRACE_SECS=${GATEWAY_LIMITS__SHUTDOWN_GRACE_SECS:-3} \
        ${SERVER_PIN:+taskset -c "$SERVER_PIN"} "$binary" serve "$@" >"$LOGS/$label.gateway.log" 2>&1 &
    GW_PID=$!
    GW_PIDS+=("$GW_PID")
    local i scheme=http
    [[ -n ${GATEWAY_TLS__CERT_FILE:-} ]] && scheme=https
    for i in $(seq 1 300); do
        # -k: the health check only; loadgen verifies the certificate.
        if curl -sfk -o /dev/null "$scheme://127.0.0.1:$GW_PORT/healthz"; then
            return 0
        fi
        if ! kill -0 "$GW_PID" 2>/dev/null; then
            log "gateway $label exited at start-up:"
            tail -20 "$LOGS/$label.gateway.log" >&2
            return 1
        fi
        sleep 0.1
    done
    log "gateway $label did not answer /healthz within 30 s"
    return 1
}

stop_gateway() { # stop_gateway PID LABEL
    local pid=$1 label=$2 i
    if ! kill -0 "$pid" 2>/dev/null; then
        note "gateway of $label had exited before the end of its run (see target/bench/logs/$label.gateway.log)"
        forget_pid "$pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        note "gateway of $label did not stop within 10 s of SIGTERM; killed"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

readyz() { curl -s "http://127.0.0.1:$1/readyz" || true; }
json_field() { # json_field FIELD < json
    python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"
}

# Every loadgen run gets its own source addresses: client sockets bound to an address keep
# its ports in TIME_WAIT for a minute after they close, so consecutive runs must not share.
SRC_NEXT=0
source_ips_for() { echo $((($1 + 19999) / 20000 + 1)); }

# run_loadgen LABEL GW_PID GW_PORT [loadgen args...]: one run, JSON to $OUT/LABEL.json.
run_loadgen() {
    local label=$1 pid=$2 port=$3
    shift 3
    local n=0 a prev=""
    for a in "$@"; do
        [[ $prev == --connections ]] && n=$a
        prev=$a
    done
    local ips
    ips=$(source_ips_for "$n")
    local rc=0
    ${LOADGEN_PIN:+taskset -c "$LOADGEN_PIN"} "$LOADGEN" --url "${LOADGEN_URL_BASE:-ws://127.0.0.1}:$port" --server-pid "$pid" --json "$OUT/$label.json" \
        --source-ips "$ips" --source-ip-offset "$SRC_NEXT" "$@" \
        >"$LOGS/$label.loadgen.out" 2>"$LOGS/$label.loadgen.err" || rc=$?
    SRC_NEXT=$((SRC_NEXT + ips))
    if [[ $rc -ne 0 ]]; then
        note "loadgen $label exited with status $rc (see target/bench/logs/$label.loadgen.err)"
    fi
    if [[ -f $OUT/$label.json ]]; then
        python3 "$ROOT/tests/bench/summarize.py" --line "$OUT/$label.json" | sed "s/^/[bench] $label: /" >&2
    fi
    return 0
}

# one_run LABEL BINARY "SERVE ARGS" [loadgen args...]: fresh gateway, one loadgen run, stop.
one_run() {
    local label=$1 binary=$2 serve_args=$3
    shift 3
    # shellcheck disable=SC2086 # serve_args is a word list on purpose
    if ! start_gateway "$label" "$binary" $serve_args; then
        note "$label: the gateway did not start; run skipped"
        return 0
    fi
    local pid=$GW_PID port=$GW_PORT
    run_loadgen "$label" "$pid" "$port" "$@"
    stop_gateway "$pid" "$label"
}

# start_peer LABEL: the Node.js peer (tests/bench/peers/node-ws) on a free port. Sets GW_PID
# and GW_PORT, as start_gateway does, so run_loadgen and stop_gateway work on it.
start_peer() {
    local label=$1 i
    GW_PORT=$(free_port)
    (cd "$PEER_DIR" && PORT=$GW_PORT exec ${SERVER_PIN:+taskset -c "$SERVER_PIN"} node server.mjs) >"$LOGS/$label.peer.log" 2>&1 &
    GW_PID=$!
    GW_PIDS+=("$GW_PID")
    for i in $(seq 1 300); do
        curl -sf -o /dev/null "http://127.0.0.1:$GW_PORT/healthz" && return 0
        kill -0 "$GW_PID" 2>/dev/null || { tail -5 "$LOGS/$label.peer.log" >&2; return 1; }
        sleep 0.1
    done
    return 1
}

# peer_run LABEL [loadgen args...]: fresh peer, one loadgen run, stop.
peer_run() {
    local label=$1
    shift
    if ! start_peer "$label"; then
        note "$label: the Node.js peer did not start; run skipped"
        return 0
    fi
    local pid=$GW_PID port=$GW_PORT
    run_loadgen "$label" "$pid" "$port" "$@"
    stop_gateway "$pid" "$label"
}

elapsed() { echo $(($(date +%s) - START_EPOCH)); }

median_of() { # median_of FIELD FILE... (numbers; missing ones ignored)
    python3 - "$@" <<'EOF'
import json, statistics, sys
field, files = sys.argv[1], sys.argv[2:]
vals = []
for f in files:
    try:
        v = json.load(open(f)).get(field)
    except (OSError, ValueError):
        continue
    if isinstance(v, (int, float)):
        vals.append(v)
print(statistics.median(vals) if vals else "")
EOF
}

# ---------------------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$LOGS"
: >"$OUT/notes.txt"

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building (release, --locked): gateway, loadgen, reference guest, native benchmark build"
    $CARGO build --release --locked -p gateway -p gateway-tests
    $MAKE --no-print-directory guest guests
    # Both builds write target/release/gateway: the native one is copied aside, then the
    # normal binary is rebuilt (from cache) so that target/release/gateway stays the product.
    $CARGO build --release --locked -p gateway --features native-handler
    cp "$GATEWAY" "$NATIVE"
    $CARGO build --release --locked -p gateway
fi
for f in "$GATEWAY" "$NATIVE" "$LOADGEN" "$SANDBOX_CALLS" "$RESUME_STORM" "$ROOT/target/release/streams_bench" "$ROOT/target/release/control_bench" "$ROOT/target/release/benchplot" "$GUEST"; do
    [[ -e $f ]] || { log "missing $f (run without BENCH_SKIP_BUILD)"; exit 2; }
done
if "$GATEWAY" serve --help | grep -q native-handler-for-benchmark; then
    log "target/release/gateway is the native-handler build; refusing to benchmark it as the product"
    exit 2
fi
"$NATIVE" serve --help | grep -q native-handler-for-benchmark || {
    log "$NATIVE was not built with --features native-handler"
    exit 2
}
BUILD_SECS=$(elapsed)
log "builds done in ${BUILD_SECS} s"

# ---------------------------------------------------------------------------------------
# Machine limits: raise vm.max_map_count when we may (restored on exit); the fd hard limit
# is what it is (loadgen and the gateway raise their soft limits to it themselves).
MAP_COUNT_BEFORE=$(cat /proc/sys/vm/max_map_count)
MAP_COUNT_WANTED=262144
SYSCTL_RESULT="unchanged (already >= $MAP_COUNT_WANTED)"
if ((MAP_COUNT_BEFORE < MAP_COUNT_WANTED)); then
    if err=$(sysctl -w vm.max_map_count=$MAP_COUNT_WANTED 2>&1 >/dev/null); then
        MAP_COUNT_ORIG=$MAP_COUNT_BEFORE
        SYSCTL_RESULT="raised from $MAP_COUNT_BEFORE to $MAP_COUNT_WANTED for the run (restored afterwards)"
    else
        SYSCTL_RESULT="could not raise it from $MAP_COUNT_BEFORE: ${err//$'\n'/ }"
        note "sysctl -w vm.max_map_count=$MAP_COUNT_WANTED failed: ${err//$'\n'/ }; capacity is bounded by $MAP_COUNT_BEFORE mappings"
    fi
fi
MAP_COUNT_USED=$(cat /proc/sys/vm/max_map_count)
FD_HARD=$(ulimit -Hn)
FD_SOFT=$(ulimit -Sn)
# Only the hard limit matters (both programs raise their soft limit to it); see whether it
# could be raised, in a subshell so nothing here changes.
if err=$( (ulimit -Hn $((FD_HARD * 2))) 2>&1); then
    FD_RESULT="hard limit $FD_HARD; a process could raise it (not done: the gateway and loadgen use what they are given)"
else
    FD_RESULT="hard limit $FD_HARD, cannot be raised here (${err##*: })"
fi
log "vm.max_map_count: $SYSCTL_RESULT; fd limit soft $FD_SOFT, $FD_RESULT"

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$([[ -n $(git status --porcelain 2>/dev/null) ]] && echo true || echo false)

has() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------
# Density: idle connections, 5 per user (the default per-user limit), RSS per connection.
CAPACITY=""
if has density; then
    start_gateway density-probe "$GATEWAY"
    CAPACITY=$(readyz "$GW_PORT" | json_field capacity)
    stop_gateway "$GW_PID" density-probe
    log "gateway capacity (/readyz): $CAPACITY"
    # The loadgen needs one fd per connection plus some; both share the same hard limit.
    max_n=$((CAPACITY + OVER_CAPACITY))
    lg_room=$((FD_HARD - 64 - 8 - 8))
    ((max_n > lg_room)) && max_n=$lg_room
    [[ $QUICK == 1 ]] && max_n=300
    points=("${DENSITY_POINTS[@]}")
    for p in "${DENSITY_POINTS[@]}"; do ((p >= CAPACITY)) && note "density point $p is at or above the capacity $CAPACITY"; done
    points+=("max:$max_n")
    for run in $(seq 1 "$RUNS"); do
        for p in "${points[@]}"; do
            n=${p#max:}
            name=$([[ $p == max:* ]] && echo max || echo "$n")
            users=$(((n + 4) / 5))
            log "density $name ($n connections, $users users) run $run"
            one_run "density-$name-r$run" "$GATEWAY" "" \
                --connections "$n" --users "$users" --max-inflight 128 \
                --connect-timeout-secs 20 --max-secs 120
        done
    done
fi

# ---------------------------------------------------------------------------------------
# Connect storm: N new connections as fast as loadgen starts them, at a few in-flight caps.
if has storm; then
    for run in $(seq 1 "$RUNS"); do
        for inflight in "${STORM_INFLIGHT[@]}"; do
            log "storm $STORM_CONNECTIONS connections, max-inflight $inflight, run $run"
            one_run "storm-i$inflight-r$run" "$GATEWAY" "" \
                --connections "$STORM_CONNECTIONS" --users $((STORM_CONNECTIONS / 5)) \
                --max-inflight "$inflight" --max-secs 60
        done
    done
fi

# ---------------------------------------------------------------------------------------
# Delivery: 10,000 connections, 2,000 users x 5. First as fast as the gateway takes the
# events (100 %), then 25 % and 50 % of the delivered rate found.
delivery_args=(--connections "$DELIVERY_CONNECTIONS" --users "$DELIVERY_USERS"
    --max-inflight 128 --publish-secs "$PUBLISH_SECS" --batch "$DELIVERY_BATCH"
    --publishers "$DELIVERY_PUBLISHERS" --drain-secs 5 --max-secs 120)
# At a steady rate a publisher sends small batches often: one batch of 100 events for 500
# connections is a burst whose last frame waits for the 499 before it.
steady_args=(--connections "$DELIVERY_CONNECTIONS" --users "$DELIVERY_USERS"
    --max-inflight 128 --publish-secs "$PUBLISH_SECS" --batch "$STEADY_BATCH"
    --publishers "$DELIVERY_PUBLISHERS" --drain-secs 5 --max-secs 120)
FULL_RATE=""
if has delivery; then
    # Wasm and native runs alternate, so that both see the same machine (it is shared and
    # its speed drifts); the ratio is taken per pair.
    for run in $(seq 1 "$RUNS"); do
        log "delivery 100 % (as fast as it takes them) run $run"
        one_run "delivery-wasm-100-r$run" "$GATEWAY" "" "${delivery_args[@]}" --publish-max
        if has native; then
            log "delivery 100 % with the native handler (no sandbox) run $run"
            one_run "delivery-native-100-r$run" "$NATIVE" "--native-handler-for-benchmark" \
                "${delivery_args[@]}" --publish-max
        fi
    done
    delivered=$(median_of events_per_sec "$OUT"/delivery-wasm-100-r*.json)
    published=$(median_of events_published "$OUT"/delivery-wasm-100-r*.json)
    expected=$(median_of events_expected "$OUT"/delivery-wasm-100-r*.json)
    if [[ -n $delivered && -n $published && -n $expected ]] && python3 -c "import sys; sys.exit(not ($published > 0 and $expected > 0))"; then
        # Offered publish rate = fraction x delivered rate / fan-out (connections per event).
        fanout=$(python3 -c "print($expected / $published)")
        FULL_RATE=$delivered
        log "100 %: $delivered events/s delivered (fan-out $fanout)"
        for pct in 25 50; do
            rate=$(python3 -c "print(max(1, round($pct / 100 * $delivered / $fanout)))")
            for run in $(seq 1 "$RUNS"); do
                log "delivery $pct % ($rate events/s published, batches of $STEADY_BATCH) run $run"
                one_run "delivery-wasm-$pct-r$run" "$GATEWAY" "" "${steady_args[@]}" --publish-rate "$rate"
            done
        done
    else
        note "delivery: the 100 % runs produced no delivery rate; 25 % and 50 % not run"
    fi
fi

# ---------------------------------------------------------------------------------------
# Sandbox cost per call, without sockets: the reference handler's on-event through the
# sandbox and natively, with full and with compact memory reservations.
if has native; then
    for instances in 1 1000000; do
        log "sandbox_calls --instances $instances"
        "$SANDBOX_CALLS" --guest "$GUEST" --instances "$instances" --calls 200000 --rounds 5 \
            --json "$OUT/sandbox-calls-$instances.json" >"$LOGS/sandbox-calls-$instances.log" 2>&1 ||
            note "sandbox_calls --instances $instances failed (see target/bench/logs/sandbox-calls-$instances.log)"
    done
fi

# ---------------------------------------------------------------------------------------
# Resume storm: every client reconnects at once with ?since= after missing a burst.
# resume_storm LABEL PORT: the storm against the gateway on PORT, JSON to $OUT/LABEL.json.
resume_storm() {
    local label=$1 port=$2 ips
    # Each client connects twice: twice the source addresses of one loadgen run.
    ips=$(($(source_ips_for "$RESUME_CLIENTS") * 2))
    "$RESUME_STORM" --addr "127.0.0.1:$port" --clients "$RESUME_CLIENTS" \
        --users "$RESUME_USERS" --missed "$RESUME_MISSED" \
        --source-ips "$ips" --source-ip-offset "$SRC_NEXT" --json "$OUT/$label.json" \
        >"$LOGS/$label.out" 2>"$LOGS/$label.err" ||
        note "resume_storm $label failed (see target/bench/logs/$label.out and .err)"
    SRC_NEXT=$((SRC_NEXT + ips))
}
if has resume; then
    for run in $(seq 1 "$RUNS"); do
        label=resume-r$run
        log "resume storm: $RESUME_CLIENTS clients, $RESUME_USERS users, $RESUME_MISSED missed each, run $run"
        if ! start_gateway "$label" "$GATEWAY"; then
            note "$label: the gateway did not start; run skipped"
            continue
        fi
        resume_storm "$label" "$GW_PORT"
        stop_gateway "$GW_PID" "$label"
    done
fi

# ---------------------------------------------------------------------------------------
# AI output streams: messages against plain events, one fresh gateway each (streams_bench
# starts them itself and checks every token arrived once, in order).
if has streams; then
    for run in $(seq 1 "$RUNS"); do
        label=streams-r$run
        log "streams: $STREAMS_CONNECTIONS connections, $STREAMS_USERS messages at 50 appends/s, run $run"
        "$ROOT/target/release/streams_bench" --gateway "$GATEWAY" --guest "$GUEST" \
            --port "$(free_port)" --connections "$STREAMS_CONNECTIONS" --users "$STREAMS_USERS" \
            --rate 50 --secs "$PUBLISH_SECS" --report "$OUT/$label.json" \
            >"$LOGS/$label.out" 2>"$LOGS/$label.err" ||
            note "streams_bench $label failed (see target/bench/logs/$label.out and .err)"
    done
fi

# ---------------------------------------------------------------------------------------
# Control path and presence: rpc round trips through the gateway and direct, and close to
# user.offline (control_bench starts the gateway and the backend itself, and checks every
# answer).
if has control; then
    for run in $(seq 1 "$RUNS"); do
        label=control-r$run
        log "control: rpc through the gateway and direct, close to user.offline, run $run"
        "$ROOT/target/release/control_bench" --gateway "$GATEWAY" --guest "$GUEST" \
            --port "$(free_port)" --report "$OUT/$label.json" \
            >"$LOGS/$label.out" 2>"$LOGS/$label.err" ||
            note "control_bench $label failed (see target/bench/logs/$label.out and .err)"
    done
fi

# ---------------------------------------------------------------------------------------
# SSE against WebSocket: the same connections and publish, alternating transports; then, if
# density found the capacity, the most SSE connections one process admits.
if has sse; then
    sse_n=10000
    [[ $QUICK == 1 ]] && sse_n=300
    for run in $(seq 1 "$RUNS"); do
        for transport in ws sse; do
            flag=()
            [[ $transport == sse ]] && flag=(--sse)
            log "sse: $sse_n connections over $transport, run $run"
            one_run "sse-$transport-r$run" "$GATEWAY" "" "${flag[@]}" \
                --connections "$sse_n" --users $(((sse_n + 4) / 5)) --max-inflight 128 \
                --connect-timeout-secs 20 --publish-rate 2000 --publish-secs 5 --max-secs 120
        done
    done
    if [[ -n $CAPACITY ]]; then
        max_n=$((CAPACITY + OVER_CAPACITY))
        lg_room=$((FD_HARD - 64 - 8 - 8))
        ((max_n > lg_room)) && max_n=$lg_room
        [[ $QUICK == 1 ]] && max_n=300
        log "sse: the most SSE connections one process admits ($max_n asked)"
        one_run "sse-max-r1" "$GATEWAY" "" --sse \
            --connections "$max_n" --users $(((max_n + 4) / 5)) --max-inflight 128 \
            --connect-timeout-secs 20 --max-secs 120
    fi
fi

# ---------------------------------------------------------------------------------------
# TLS: the same connect storm over wss:// (loadgen verifying a generated certificate) and
# over ws://, alternating; connect rate, connect time and memory per connection.
if has tls; then
    TLS_DIR=$OUT/tls
    mkdir -p "$TLS_DIR"
    if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -addext "basicConstraints=critical,CA:FALSE" >"$LOGS/tls-cert.log" 2>&1; then
        for run in $(seq 1 "$RUNS"); do
            log "tls: $STORM_CONNECTIONS connections over ws://, max-inflight 32, run $run"
            one_run "tls-plain-r$run" "$GATEWAY" "" \
                --connections "$STORM_CONNECTIONS" --users $((STORM_CONNECTIONS / 5)) \
                --max-inflight 32 --max-secs 60
            log "tls: $STORM_CONNECTIONS connections over wss://, max-inflight 32, run $run"
            GATEWAY_TLS__CERT_FILE=$TLS_DIR/cert.pem GATEWAY_TLS__KEY_FILE=$TLS_DIR/key.pem \
                LOADGEN_URL_BASE=wss://localhost \
                one_run "tls-wss-r$run" "$GATEWAY" "" \
                --connections "$STORM_CONNECTIONS" --users $((STORM_CONNECTIONS / 5)) \
                --max-inflight 32 --max-secs 60 --ca "$TLS_DIR/cert.pem"
        done
    else
        note "tls: openssl could not make a certificate (see target/bench/logs/tls-cert.log); not run"
    fi
fi

# ---------------------------------------------------------------------------------------
# Guest start-up: compiling each reference handler (Rust, JavaScript, Python) as a start or
# reload does, without and then with the compile cache (guest_cache_dir).
if has startup; then
    STARTUP_CACHE=$OUT/guest-cache
    printf 'guest_cache_dir = "%s"\n[limits]\nguest_memory_bytes = 33554432\nguest_max_instances = 64\n' \
        "$STARTUP_CACHE" >"$OUT/startup.toml"
    for lang in rust js py; do
        component=$GUEST
        [[ $lang != rust ]] && component=$ROOT/target/components/handler-$lang.wasm
        for run in $(seq 1 "$RUNS"); do
            rm -rf "$STARTUP_CACHE"
            for phase in compile cached; do
                label=startup-$lang-$phase-r$run
                log "startup: $lang guest, $phase, run $run"
                "$GATEWAY" guest check "$component" --config "$OUT/startup.toml" \
                    >"$LOGS/$label.out" 2>&1 || note "startup $label failed (see target/bench/logs/$label.out)"
            done
        done
    done
fi

# ---------------------------------------------------------------------------------------
# The peer: a hand-written Node.js `ws` server speaking the same protocol
# (tests/bench/peers/node-ws), driven by the same loadgen with the same arguments as the
# gateway's density (largest fixed point), storm (the middle in-flight cap) and delivery
# (100 %) runs.
PEER_DIR=$ROOT/target/bench-peers/node-ws
install_peer() { # the Node.js peer's packages, once; fails when npm does
    [[ -n ${PEER_READY:-} ]] && return 0
    mkdir -p "$PEER_DIR"
    cp "$ROOT"/tests/bench/peers/node-ws/{package.json,package-lock.json,server.mjs} "$PEER_DIR/"
    (cd "$PEER_DIR" && npm ci --no-audit --no-fund --loglevel=error) >"$LOGS/peer-install.log" 2>&1 || return 1
    PEER_READY=1
}
if has peer; then
    if install_peer; then
        peer_density=${DENSITY_POINTS[-1]}
        peer_inflight=${STORM_INFLIGHT[1]}
        for run in $(seq 1 "$RUNS"); do
            log "peer: Node.js ws, density $peer_density, run $run"
            peer_run "peer-density-r$run" --connections "$peer_density" \
                --users $(((peer_density + 4) / 5)) --max-inflight 128 \
                --connect-timeout-secs 20 --max-secs 120
            log "peer: Node.js ws, storm $STORM_CONNECTIONS at $peer_inflight in flight, run $run"
            peer_run "peer-storm-i$peer_inflight-r$run" --connections "$STORM_CONNECTIONS" \
                --users $((STORM_CONNECTIONS / 5)) --max-inflight "$peer_inflight" --max-secs 60
            log "peer: Node.js ws, delivery 100 %, run $run"
            peer_run "peer-delivery-r$run" "${delivery_args[@]}" --publish-max
        done
    else
        note "peer: npm ci failed (see target/bench/logs/peer-install.log); not run"
    fi
fi

# ---------------------------------------------------------------------------------------
# Latency under overload: the server on one core, the load generator on the other (when
# there are two), 10,000 connections of 2,000 users, batches of 100 published as fast as
# they are answered. Alternating in each run: the gateway as configured (publishers held
# to limits.queue_delay_ms), the same gateway with queue_delay_ms = user_queue_delay_ms = 0
# (backlog bounded by bytes only, as before the queue-delay admission), and the Node.js peer.
if has overload; then
    if [[ $(nproc) -ge 2 ]]; then
        export SERVER_PIN=0 LOADGEN_PIN=1
    fi
    for run in $(seq 1 "$RUNS"); do
        log "overload: gateway, queue-delay admission, run $run"
        one_run "overload-paced-r$run" "$GATEWAY" "" "${delivery_args[@]}" --publish-max
        log "overload: gateway, bytes only (queue_delay_ms = 0), run $run"
        GATEWAY_LIMITS__QUEUE_DELAY_MS=0 GATEWAY_LIMITS__USER_QUEUE_DELAY_MS=0 \
            one_run "overload-bytes-r$run" "$GATEWAY" "" \
            "${delivery_args[@]}" --publish-max
        if install_peer; then
            log "overload: Node.js ws, run $run"
            peer_run "overload-peer-r$run" "${delivery_args[@]}" --publish-max
        else
            note "overload: the Node.js peer's npm ci failed (see target/bench/logs/peer-install.log)"
        fi
    done
    unset SERVER_PIN LOADGEN_PIN
fi

# ---------------------------------------------------------------------------------------
# Hibernation: the same idle connections hibernated (hibernate_after_secs 2, memory sampled
# once /metrics shows every session hibernated) and live (hibernation off), alternating;
# then the 90/10 blend: 10,000 connections, all hibernate, then 10 % of the users (so 10 %
# of the connections) get events at a steady rate for PUBLISH_SECS, memory sampled halfway
# (the active ones are awake then, the rest hibernated); the same blend live and on the
# Node.js peer. The gateway's /metrics is kept after each run for the wake-up histogram.
# hib_run LABEL HIBERNATE_AFTER_SECS [loadgen args...]
hib_run() {
    local label=$1 after=$2
    shift 2
    if ! GATEWAY_LIMITS__HIBERNATE_AFTER_SECS=$after start_gateway "$label" "$GATEWAY"; then
        note "$label: the gateway did not start; run skipped"
        return 0
    fi
    local pid=$GW_PID port=$GW_PORT
    run_loadgen "$label" "$pid" "$port" "$@"
    curl -s "http://127.0.0.1:$port/metrics" >"$OUT/$label.metrics" || true
    stop_gateway "$pid" "$label"
}
if has hibernate; then
    hib_n=${DENSITY_POINTS[-1]}
    hib_max=$hib_n
    if [[ -n $CAPACITY ]]; then
        hib_max=$((CAPACITY < FD_HARD - 80 ? CAPACITY : FD_HARD - 80))
        [[ $QUICK == 1 ]] && hib_max=300
    fi
    # A tenth of the users, each with 5 connections: a tenth of the connections. Each active
    # connection gets 10 events a second, so it never idles long enough to hibernate again.
    blend_users=$(((hib_n + 4) / 5))
    blend_active=$(((blend_users + 9) / 10))
    blend_rate=$((blend_active * 10))
    blend_args=(--connections "$hib_n" --users "$blend_users" --max-inflight 128
        --active-users "$blend_active" --publish-rate "$blend_rate" --batch 10
        --publish-secs "$PUBLISH_SECS" --publishers 2 --drain-secs 5 --max-secs 120)
    for run in $(seq 1 "$RUNS"); do
        for n in "$hib_n" "$hib_max"; do
            name=$([[ $n == "$hib_n" ]] && echo "$n" || echo max)
            [[ $name == max && $hib_max == "$hib_n" ]] && continue
            log "hibernate: $n idle connections, hibernated, run $run"
            hib_run "hibernate-idle-$name-r$run" 2 --connections "$n" --users $(((n + 4) / 5)) \
                --max-inflight 128 --connect-timeout-secs 20 --max-secs 120 \
                --wait-metric "gateway_sessions_hibernated=$n" \
                --smaps-dir "$OUT/smaps-idle-$name-r$run"
            log "hibernate: $n idle connections, live (hibernation off), run $run"
            hib_run "hibernate-live-$name-r$run" 0 --connections "$n" --users $(((n + 4) / 5)) \
                --max-inflight 128 --connect-timeout-secs 20 --max-secs 120 \
                --smaps-dir "$OUT/smaps-live-$name-r$run"
        done
        log "hibernate: 90/10 blend ($blend_active of $blend_users users active, $blend_rate events/s), run $run"
        hib_run "hibernate-blend-r$run" 2 "${blend_args[@]}" \
            --wait-metric "gateway_sessions_hibernated=$hib_n"
        log "hibernate: 90/10 blend, live (hibernation off), run $run"
        hib_run "hibernate-blend-live-r$run" 0 "${blend_args[@]}"
        if [[ ${PEER_READY:-0} == 1 ]]; then
            log "hibernate: 90/10 blend on the Node.js peer, run $run"
            peer_run "hibernate-blend-peer-r$run" "${blend_args[@]}"
        fi
    done
fi

# ---------------------------------------------------------------------------------------
# Cluster mode: gateways sharing one JetStream stream on a local nats-server.
# start_nats LABEL: a fresh single server with JetStream. Sets NATS_PID and NATS_URL.
start_nats() {
    local label=$1 port i store=$OUT/nats-store-$1
    port=$(free_port)
    rm -rf "$store"
    mkdir -p "$store"
    "$NATS_SERVER" -js -a 127.0.0.1 -p "$port" -sd "$store" >"$LOGS/$label.nats.log" 2>&1 &
    NATS_PID=$!
    GW_PIDS+=("$NATS_PID")
    NATS_URL=nats://127.0.0.1:$port
    for i in $(seq 1 100); do
        grep -q "Server is ready" "$LOGS/$label.nats.log" 2>/dev/null && return 0
        kill -0 "$NATS_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "nats-server $label did not start"
    return 1
}
stop_nats() { # stop_nats LABEL
    kill -TERM "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
    forget_pid "$NATS_PID"
    rm -rf "$OUT/nats-store-$1"
}
scrape() { curl -s "http://127.0.0.1:$1/metrics" >"$OUT/$2.metrics" || true; }
# cluster_node_run LABEL run_loadgen|resume_storm [loadgen args...]: a fresh nats-server and
# one cluster-mode gateway, the run, the gateway's metrics kept, both stopped.
cluster_node_run() {
    local label=$1 what=$2 pid port
    shift 2
    if start_nats "$label" && GATEWAY_CLUSTER__NATS_URL=$NATS_URL start_gateway "$label" "$GATEWAY"; then
        pid=$GW_PID port=$GW_PORT
        case $what in
        run_loadgen) run_loadgen "$label" "$pid" "$port" "$@" ;;
        resume_storm) resume_storm "$label" "$port" ;;
        esac
        scrape "$port" "$label"
        stop_gateway "$pid" "$label"
    else
        note "$label: nats-server or the gateway did not start"
    fi
    stop_nats "$label"
}
if has cluster && [[ ! -x $NATS_SERVER ]]; then
    note "cluster scenario not run: no nats-server at $NATS_SERVER (make nats installs it)"
elif has cluster; then
    cluster_args=(--connections "$CLUSTER_CONNECTIONS" --users "$CLUSTER_USERS" --max-inflight 128
        --batch "$DELIVERY_BATCH" --publishers "$DELIVERY_PUBLISHERS" --publish-max
        --publish-secs "$PUBLISH_SECS" --drain-secs 5 --max-secs 120)
    for run in $(seq 1 "$RUNS"); do
        log "cluster: embedded-mode gateway, $CLUSTER_CONNECTIONS connections, run $run"
        one_run "cluster-embedded-r$run" "$GATEWAY" "" "${cluster_args[@]}"

        log "cluster: one cluster-mode gateway, run $run"
        cluster_node_run "cluster-1node-r$run" run_loadgen "${cluster_args[@]}"

        # Two nodes, each holding half the users and publishing to the other's: every
        # event crosses from one node through the stream to the other.
        log "cluster: two cluster-mode gateways, cross-node publishing, run $run"
        label=cluster-2node-r$run
        if start_nats "$label" &&
            GATEWAY_CLUSTER__NATS_URL=$NATS_URL start_gateway "cluster-2node-a-r$run" "$GATEWAY" &&
            pid_a=$GW_PID port_a=$GW_PORT &&
            GATEWAY_CLUSTER__NATS_URL=$NATS_URL start_gateway "cluster-2node-b-r$run" "$GATEWAY"; then
            pid_b=$GW_PID port_b=$GW_PORT
            ips=$(source_ips_for "$CLUSTER_CONNECTIONS")
            lg=()
            for side in a b; do
                if [[ $side == a ]]; then
                    me=$port_a other=$port_b mypid=$pid_a offset=0
                else
                    me=$port_b other=$port_a mypid=$pid_b offset=$CLUSTER_USERS
                fi
                "$LOADGEN" --url "ws://127.0.0.1:$me" --publish-to "ws://127.0.0.1:$other" \
                    --server-pid "$mypid" --json "$OUT/cluster-2node-$side-r$run.json" \
                    --user-offset "$offset" --source-ips "$ips" --source-ip-offset "$SRC_NEXT" \
                    "${cluster_args[@]}" >"$LOGS/cluster-2node-$side-r$run.loadgen.out" \
                    2>"$LOGS/cluster-2node-$side-r$run.loadgen.err" &
                lg+=($!)
                LG_PIDS+=($!)
                SRC_NEXT=$((SRC_NEXT + ips))
            done
            for p in "${lg[@]}"; do
                wait "$p" || note "loadgen of $label exited with an error (see target/bench/logs/cluster-2node-*-r$run.loadgen.err)"
                forget_pid "$p"
            done
            for side in a b; do
                [[ -f $OUT/cluster-2node-$side-r$run.json ]] &&
                    python3 "$ROOT/tests/bench/summarize.py" --line "$OUT/cluster-2node-$side-r$run.json" |
                    sed "s/^/[bench] cluster-2node-$side-r$run: /" >&2
            done
            scrape "$port_a" "cluster-2node-a-r$run"
            scrape "$port_b" "cluster-2node-b-r$run"
            stop_gateway "$pid_a" "cluster-2node-a-r$run"
            stop_gateway "$pid_b" "cluster-2node-b-r$run"
        else
            note "$label: nats-server or a gateway did not start"
        fi
        stop_nats "$label"

        log "cluster: resume storm from JetStream, $RESUME_CLIENTS clients, run $run"
        cluster_node_run "cluster-resume-r$run" resume_storm
    done
    # The same offered load on both: a quarter of what the embedded log delivered as fast as
    # it could (the cluster-mode gateway's maximum here, with nats-server on the same cores,
    # is lower): delivered events and latency at equal load.
    full=$(median_of events_per_sec "$OUT"/cluster-embedded-r*.json)
    if [[ -n $full ]]; then
        rate=$(python3 -c "print(max(1, round(0.25 * $full / ($CLUSTER_CONNECTIONS / $CLUSTER_USERS))))")
        steady_cluster_args=(--connections "$CLUSTER_CONNECTIONS" --users "$CLUSTER_USERS"
            --max-inflight 128 --batch "$STEADY_BATCH" --publishers 16 --publish-rate "$rate"
            --publish-secs "$PUBLISH_SECS" --drain-secs 5 --max-secs 120)
        for run in $(seq 1 "$RUNS"); do
            log "cluster: equal load ($rate events/s published), embedded log, run $run"
            one_run "cluster-steady-embedded-r$run" "$GATEWAY" "" "${steady_cluster_args[@]}"
            log "cluster: equal load ($rate events/s published), one cluster-mode gateway, run $run"
            cluster_node_run "cluster-steady-1node-r$run" run_loadgen "${steady_cluster_args[@]}"
        done
    fi
fi

# ---------------------------------------------------------------------------------------
# Cost per subscribed identity (issue 23): IDENTITY_CONNECTIONS hibernated connections as
# that many users (one connection each) and as a fifth of them (five each), on one
# cluster-mode gateway and on the embedded log; what the identities more add to RSS,
# divided by how many more there are. The embedded pair is the router's own share.
IDENTITY_CONNECTIONS=${IDENTITY_CONNECTIONS:-10000}
[[ $QUICK == 1 ]] && IDENTITY_CONNECTIONS=300
if has identities && [[ ! -x $NATS_SERVER ]]; then
    note "identities scenario not run: no nats-server at $NATS_SERVER (make nats installs it)"
elif has identities; then
    for run in $(seq 1 "$RUNS"); do
        for per in 1 5; do
            users=$(((IDENTITY_CONNECTIONS + per - 1) / per))
            ids_args=(--connections "$IDENTITY_CONNECTIONS" --users "$users" --max-inflight 128
                --connect-timeout-secs 20 --max-secs 120)
            log "identities: $IDENTITY_CONNECTIONS hibernated connections of $users users, cluster mode, run $run"
            GATEWAY_LIMITS__HIBERNATE_AFTER_SECS=0 \
                cluster_node_run "identities-cluster-$per-r$run" run_loadgen "${ids_args[@]}"
            log "identities: $IDENTITY_CONNECTIONS hibernated connections of $users users, embedded log, run $run"
            hib_run "identities-embedded-$per-r$run" 0 "${ids_args[@]}"
        done
    done
fi

# ---------------------------------------------------------------------------------------
# 100,000 connections on the machine: several gateways, one loadgen process each (disjoint
# users and source addresses), all held open together; totals sampled while they are.
multi_skip() {
    python3 - "$OUT/multi.json" "$1" <<'EOF'
import json, sys
json.dump({"skipped": True, "reason": sys.argv[2]}, open(sys.argv[1], "w"), indent=2)
EOF
    note "100,000-connection scenario not run: $1"
}
run_multi() {
    local k pids=() ports=() lgs=() label release=$OUT/multi.release
    local total_target=$((MULTI_GATEWAYS * MULTI_PER_GATEWAY))
    rm -f "$release"
    # Nodes of one cluster when nats-server is at hand: each holds a feed per user it has
    # connections of.
    local cluster_url=""
    if [[ -x $NATS_SERVER ]] && start_nats multi; then
        cluster_url=$NATS_URL
    fi
    for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
        # Live, as the density points: idle ones would hibernate after 30 s of the hold.
        if ! GATEWAY_LIMITS__HIBERNATE_AFTER_SECS=0 GATEWAY_CLUSTER__NATS_URL=$cluster_url \
            start_gateway "multi-g$k" "$GATEWAY"; then
            note "multi: gateway $k did not start"
            return 1
        fi
        pids+=("$GW_PID")
        ports+=("$GW_PORT")
    done
    local users=$(((MULTI_PER_GATEWAY + 4) / 5)) ips
    ips=$(source_ips_for "$MULTI_PER_GATEWAY")
    log "multi: $MULTI_GATEWAYS gateways x $MULTI_PER_GATEWAY connections ($total_target), $MULTI_GATEWAYS loadgen processes"
    for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
        label=multi-g$k
        "$LOADGEN" --url "ws://127.0.0.1:${ports[$k]}" --server-pid "${pids[$k]}" \
            --json "$OUT/$label.json" --connections "$MULTI_PER_GATEWAY" --users "$users" \
            --user-offset $((k * users)) --source-ips "$ips" --source-ip-offset "$SRC_NEXT" \
            --max-inflight 64 --connect-timeout-secs 30 --hold-secs 120 \
            --release-file "$release" --max-secs 240 \
            >"$LOGS/$label.loadgen.out" 2>"$LOGS/$label.loadgen.err" &
        lgs+=($!)
        LG_PIDS+=($!)
        SRC_NEXT=$((SRC_NEXT + ips))
    done
    # Sample until every loadgen has finished its connect phase (or 150 s pass).
    local t0 t peak=0 peak_rss=0 peak_at=0 done_count live rss line
    t0=$(date +%s)
    : >"$OUT/multi.samples"
    # One sample: seconds since t0, then live:rss per gateway; the peak keeps its own copy.
    # $1 = ge also takes a sample equal to the peak (the last one, with everything connected).
    sample() {
        local k l r
        t=$(($(date +%s) - t0))
        live=0
        rss=0
        line="$t"
        for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
            l=$(curl -s "http://127.0.0.1:${ports[$k]}/metrics" | awk '$1=="gateway_sessions_live"{print $2}')
            r=$(awk '/^VmRSS:/{print $2}' "/proc/${pids[$k]}/status" 2>/dev/null || echo 0)
            live=$((live + ${l:-0}))
            rss=$((rss + ${r:-0}))
            line+=" ${l:-0}:${r:-0}"
        done
        echo "$line" >>"$OUT/multi.samples"
        if ((live > peak)) || [[ ${1:-} == ge && $live -eq $peak ]]; then
            peak=$live
            peak_rss=$rss
            peak_at=$t
            printf '%s\n' "$line" >"$OUT/multi.peak"
        fi
    }
    while :; do
        sleep 1
        sample
        done_count=0
        for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
            if grep -q '^connected:' "$LOGS/multi-g$k.loadgen.err" 2>/dev/null ||
                ! kill -0 "${lgs[$k]}" 2>/dev/null; then
                done_count=$((done_count + 1))
            fi
        done
        if ((done_count == MULTI_GATEWAYS)) || ((t >= 150)); then
            break
        fi
    done
    # One more sample with everything connected, then release the holds.
    sleep 2
    sample ge
    local mem_avail feeds=0 f nats_rss=0
    mem_avail=$(awk '/^MemAvailable:/{print $2}' /proc/meminfo)
    for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
        f=$(curl -s "http://127.0.0.1:${ports[$k]}/metrics" | awk '$1=="gateway_cluster_feeds"{print $2}')
        feeds=$((feeds + ${f:-0}))
    done
    if [[ -n $cluster_url ]]; then
        nats_rss=$(awk '/^VmRSS:/{print $2}' "/proc/$NATS_PID/status" 2>/dev/null || echo 0)
    fi
    touch "$release"
    local rcs=()
    for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
        local rc=0
        wait "${lgs[$k]}" || rc=$?
        forget_pid "${lgs[$k]}"
        rcs+=("$rc")
        ((rc == 0)) || note "multi: loadgen $k exited with status $rc (see target/bench/logs/multi-g$k.loadgen.err)"
    done
    for k in $(seq 0 $((MULTI_GATEWAYS - 1))); do
        stop_gateway "${pids[$k]}" "multi-g$k"
    done
    [[ -n $cluster_url ]] && stop_nats multi
    python3 - "$OUT/multi.json" "$OUT/multi.peak" "$total_target" "$peak" "$peak_rss" "$peak_at" \
        "$mem_avail" "${rcs[*]}" "$feeds" "$nats_rss" "${cluster_url:+1}" <<'EOF'
import json, sys
out, peak_file, target, peak, peak_rss, peak_at, mem_avail, rcs, feeds, nats_rss, cluster = sys.argv[1:]
per = []
for item in open(peak_file).read().split()[1:]:
    live, rss = item.split(":")
    per.append({"connections": int(live), "rss_kib": int(rss)})
json.dump({
    "skipped": False,
    "target_connections": int(target),
    "peak_connections": int(peak),
    "peak_rss_kib_total": int(peak_rss),
    "peak_at_secs": int(peak_at),
    "mem_available_kib_at_peak": int(mem_avail),
    "gateways": per,
    "loadgen_exit_codes": [int(r) for r in rcs.split()],
    "cluster": cluster == "1",
    "cluster_feeds": int(feeds),
    "nats_rss_kib": int(nats_rss),
}, open(out, "w"), indent=2)
EOF
    log "multi: peak $peak connections at the same time, total gateway RSS ${peak_rss} KiB"
}
if has multi; then
    left=$((BUDGET - $(elapsed)))
    if ((left < MULTI_ESTIMATE)); then
        multi_skip "time budget: $(elapsed) s of the ${BUDGET} s budget used, the scenario needs about ${MULTI_ESTIMATE} s"
    elif ! run_multi; then
        multi_skip "the gateways did not start (see target/bench/logs/multi-g*.gateway.log)"
    fi
fi

# ---------------------------------------------------------------------------------------
WALL=$(elapsed)
python3 - "$OUT/meta.json" <<EOF
import json, os, platform, sys
mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
json.dump({
    "nproc": os.cpu_count(),
    "cpu_model": cpu,
    "mem_total_kib": int(mem),
    "kernel": platform.release(),
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "commit": "$COMMIT",
    "dirty": $([[ $DIRTY == true ]] && echo True || echo False),
    "command": "make bench",
    "runs": $RUNS,
    "quick": $([[ $QUICK == 1 ]] && echo True || echo False),
    "scenarios": "$SCENARIOS".split(),
    "wall_secs": $WALL,
    "build_secs": $BUILD_SECS,
    "budget_secs": $BUDGET,
    "max_map_count_before": $MAP_COUNT_BEFORE,
    "max_map_count_used": $MAP_COUNT_USED,
    "sysctl_result": """$SYSCTL_RESULT""",
    "fd_soft": "$FD_SOFT",
    "fd_hard": "$FD_HARD",
    "fd_result": """$FD_RESULT""",
    "capacity": "$CAPACITY",
    "storm_connections": $STORM_CONNECTIONS,
    "delivery_connections": $DELIVERY_CONNECTIONS,
    "delivery_users": $DELIVERY_USERS,
    "publish_secs": $PUBLISH_SECS,
    "delivery_batch": $DELIVERY_BATCH,
    "steady_batch": $STEADY_BATCH,
    "full_rate": "$FULL_RATE",
}, open(sys.argv[1], "w"), indent=2)
EOF
python3 "$ROOT/tests/bench/summarize.py" "$OUT" -o "$RESULTS"
# The plots' labels need a TrueType font; Debian's fonts-dejavu-core has the default one.
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if [[ ! -e $FONT ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    log "installing fonts-dejavu-core for the plots' labels"
    apt-get install -y -qq fonts-dejavu-core >"$LOGS/apt-fonts.log" 2>&1 ||
        (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core) >>"$LOGS/apt-fonts.log" 2>&1 || true
fi
if ! "$ROOT/target/release/benchplot" --data "$OUT/plots.json" --out "$ROOT/tests/bench" --font "$FONT" \
    >"$LOGS/benchplot.log" 2>&1; then
    log "plots not drawn: $(tail -1 "$LOGS/benchplot.log")"
fi
log "done in ${WALL} s; results in ${RESULTS#"$ROOT"/}"
