#!/usr/bin/env bash
# The multi-core targets, on a machine with 16 or more cores: the delivery scenario with the
# gateway on 8 cores (0-7) and the load generator on the other 8 (8-15), the reference handler
# in the sandbox against the same handler compiled into the gateway (the benchmark-only
# native build), alternating so that both see the same machine; first with the default
# queue-delay admission, then with it off (the most the node delivers). Then, unless
# CLUSTER=0, tests/bench/cluster-cores.sh (one round, no steady-load round) for cluster mode
# against the embedded log.
#
# usage: tests/bench/cores.sh BIN_DIR OUT_DIR
#   BIN_DIR holds gateway, gateway-bench-native, loadgen, resume_storm, nats-server and
#   handler.wasm (tests/bench/cores.md says how to pack them for a machine without a build).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(cd "$1" && pwd)
OUT=$2
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-10000}
USERS=${USERS:-2000}
SECS=${SECS:-8}
PUBLISHERS=${PUBLISHERS:-16}
mkdir -p "$OUT"
# shellcheck source=tests/bench/cores-common.sh
. "$HERE/cores-common.sh"
SRC=0
# run LABEL BINARY [serve args]: one gateway on cores 0-7, one loadgen on 8-15.
run() {
    local label=$1 binary=$2 gp gpid i
    shift 2
    gp=$(port)
    GATEWAY_LISTEN=127.0.0.1:$gp GATEWAY_GUEST=$BIN/handler.wasm GATEWAY_LOG=warn \
        GATEWAY_LIMITS__HIBERNATE_AFTER_SECS=0 spawn 0-7 "$OUT/$label.gateway.log" "$binary" serve "$@"
    gpid=$!
    PIDS+=("$gpid")
    for i in $(seq 1 300); do healthy "$gp" && break; sleep 0.1; done
    pin 8-15 "$BIN/loadgen" --url "ws://127.0.0.1:$gp" --server-pid "$gpid" --json "$OUT/$label.json" \
        --connections "$CONNS" --users "$USERS" --source-ip-offset "$SRC" --max-inflight 256 \
        --publish-max --batch 100 --publishers "$PUBLISHERS" --publish-secs "$SECS" \
        --drain-secs 5 --max-secs 120 >"$OUT/$label.loadgen.out" 2>"$OUT/$label.loadgen.err" || true
    SRC=$((SRC + 2))
    kill "$gpid" 2>/dev/null || true
    wait "$gpid" 2>/dev/null || true
    python3 - "$OUT/$label.json" "$label" <<'PY' || echo "$label: no result"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
print(f"{sys.argv[2]}: delivered {r.get('events_per_sec', 0):,.0f}/s p50 {l['p50']:.1f} "
      f"p99 {l['p99']:.1f} ms losses {r.get('losses')} misdeliveries {r.get('misdeliveries')} "
      f"server CPU {r.get('server_cpu_percent_publish')} % loadgen CPU {r.get('loadgen_cpu_percent_publish')} %")
PY
}
echo "cores: $(nproc), taskset: $(command -v taskset || echo none), open files: $(ulimit -n), kernel: $(uname -r)"
for round in $(seq 1 "$ROUNDS"); do
    run "wasm-r$round" "$BIN/gateway"
    run "native-r$round" "$BIN/gateway-bench-native" --native-handler-for-benchmark
done
for round in 1; do
    GATEWAY_LIMITS__QUEUE_DELAY_MS=0 GATEWAY_LIMITS__USER_QUEUE_DELAY_MS=0 run "wasm-bytes-r$round" "$BIN/gateway"
    GATEWAY_LIMITS__QUEUE_DELAY_MS=0 GATEWAY_LIMITS__USER_QUEUE_DELAY_MS=0 \
        run "native-bytes-r$round" "$BIN/gateway-bench-native" --native-handler-for-benchmark
done
if [[ ${CLUSTER:-1} != 0 ]]; then
    ROUNDS=1 STEADY_ROUNDS=0 STREAMS=${STREAMS:-4} SRC_OFFSET=$SRC "$HERE/cluster-cores.sh" "$BIN" "$OUT/cluster"
fi
python3 "$HERE/cores_summary.py" "$OUT" --json "$OUT/summary.json" --date "$(date -u +%F)" \
    ${COMMIT:+--commit "$COMMIT"}
