#!/usr/bin/env bash
# Cluster mode against the embedded log on a machine with 16 or more cores, each process
# pinned to its own cores (nats-server 0-3, gateway A 4-7, gateway B 8-11, load generators
# 12-15), so the comparison is not one of processes fighting over two cores as in `make
# bench`. Runs, alternating, for ROUNDS rounds: the embedded log with one gateway; cluster
# mode with one gateway; two cluster-mode gateways each holding half the users, every event
# published to the other node. Then the same rounds at a steady 40 % of the embedded maximum
# (STEADY_ROUNDS of them, default ROUNDS), and a resume storm from each log. SRC_OFFSET skips
# loopback source addresses an earlier run in the same session left sockets on.
#
# usage: tests/bench/cluster-cores.sh BIN_DIR OUT_DIR
#   BIN_DIR holds gateway, loadgen, resume_storm, nats-server and handler.wasm.
set -euo pipefail
BIN=$(cd "$1" && pwd)
OUT=$2
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-10000}
USERS=${USERS:-2000}
SECS=${SECS:-10}
# Streams the identities are spread over in cluster mode.
STREAMS=${STREAMS:-1}
mkdir -p "$OUT"
# shellcheck source=tests/bench/cores-common.sh
. "$(dirname "$0")/cores-common.sh"
wait_http() { for _ in $(seq 1 200); do healthy "$1" && return 0; sleep 0.1; done; return 1; }
metrics() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())' "$1" || true; }
start_nats() {
    NATS_PORT=$(port)
    rm -rf "$OUT/store" && mkdir -p "$OUT/store"
    spawn 0-3 "$OUT/nats.log" "$BIN/nats-server" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$OUT/store"
    NATS_PID=$!
    PIDS+=("$NATS_PID")
    for _ in $(seq 1 100); do grep -q "Server is ready" "$OUT/nats.log" && return 0; sleep 0.1; done
    return 1
}
start_gw() { # start_gw CORES LABEL [cluster]; sets GP, GPID
    GP=$(port)
    local url=""
    [[ ${3:-} == cluster ]] && url=nats://127.0.0.1:$NATS_PORT
    GATEWAY_LISTEN=127.0.0.1:$GP GATEWAY_GUEST=$BIN/handler.wasm GATEWAY_LOG=warn \
        GATEWAY_LIMITS__HIBERNATE_AFTER_SECS=0 GATEWAY_CLUSTER__NATS_URL=$url \
        GATEWAY_CLUSTER__STREAMS=${STREAMS:-1} \
        spawn "$1" "$OUT/$2.gateway.log" "$BIN/gateway" serve
    GPID=$!
    PIDS+=("$GPID")
    wait_http "$GP"
}
# Source addresses already used (sockets in TIME_WAIT) by an earlier script in the same run.
SRC=${SRC_OFFSET:-0}
# The publishing: as fast as taken, or (STEADY set) that many events/s in batches of 10.
load() {
    if [[ -n ${STEADY:-} ]]; then
        echo --publish-rate "$STEADY" --batch 10 --publishers 32
    else
        echo --publish-max --batch 100 --publishers 16
    fi
}
lg() { # lg CORES LABEL PORT PID PUBLISH_PORT USER_OFFSET
    # shellcheck disable=SC2046 # load's words are separate arguments
    pin "$1" "$BIN/loadgen" --url "ws://127.0.0.1:$3" --publish-to "ws://127.0.0.1:$5" \
        --server-pid "$4" --json "$OUT/$2.json" --connections "$CONNS" --users "$USERS" \
        --user-offset "$6" --source-ip-offset "$SRC" --max-inflight 256 $(load) \
        --publish-secs "$SECS" --drain-secs 5 --max-secs 120 \
        >"$OUT/$2.loadgen.out" 2>"$OUT/$2.loadgen.err"
}
line() {
    python3 - "$OUT/$1.json" "$1" <<'PY' || echo "$1: no result"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
print(f"{sys.argv[2]}: delivered {r.get('events_per_sec', 0):,.0f}/s p50 {l['p50']:.2f} "
      f"p99 {l['p99']:.2f} ms losses {r.get('losses')} misdeliveries {r.get('misdeliveries')} "
      f"server CPU {r.get('server_cpu_percent_publish')} %")
PY
}
# One round: the embedded log, one cluster node, two cluster nodes publishing across.
one_round() {
    local round=$1
    start_gw 4-7 "embedded-r$round"
    lg 12-15 "embedded-r$round" "$GP" "$GPID" "$GP" 0; SRC=$((SRC + 2))
    kill "$GPID"; wait "$GPID" 2>/dev/null || true; line "embedded-r$round"

    start_nats
    start_gw 4-7 "cluster1-r$round" cluster
    lg 12-15 "cluster1-r$round" "$GP" "$GPID" "$GP" 0; SRC=$((SRC + 2))
    metrics "$GP" >"$OUT/cluster1-r$round.metrics"
    kill "$GPID"; wait "$GPID" 2>/dev/null || true; line "cluster1-r$round"

    start_gw 4-7 "cluster2a-r$round" cluster; A=$GP; APID=$GPID
    start_gw 8-11 "cluster2b-r$round" cluster; B=$GP; BPID=$GPID
    lg 12-13 "cluster2a-r$round" "$A" "$APID" "$B" 0 & L1=$!
    SRC=$((SRC + 2))
    lg 14-15 "cluster2b-r$round" "$B" "$BPID" "$A" "$USERS" & L2=$!
    SRC=$((SRC + 2))
    wait "$L1" "$L2" || true
    metrics "$A" >"$OUT/cluster2a-r$round.metrics"
    kill "$APID" "$BPID"; wait "$APID" "$BPID" 2>/dev/null || true
    line "cluster2a-r$round"; line "cluster2b-r$round"
    kill "$NATS_PID"; wait "$NATS_PID" 2>/dev/null || true
}
for round in $(seq 1 "$ROUNDS"); do one_round "$round"; done
# The same at a fixed offered load, 40 % of what the embedded log delivered as fast as it
# could (divided by the connections per user): delivered rate and latency at equal load.
full=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["events_per_sec"])' "$OUT/embedded-r1.json")
STEADY=$(python3 -c "print(max(1, round(0.4 * $full / ($CONNS / $USERS))))")
echo "steady: $STEADY events/s published per load generator"
for round in $(seq 1 "${STEADY_ROUNDS:-$ROUNDS}"); do one_round "steady$round"; done
start_gw 4-7 resume-embedded
pin 12-15 "$BIN/resume_storm" --addr "127.0.0.1:$GP" --clients "$CONNS" --users "$USERS" \
    --missed 20 --source-ips 4 --source-ip-offset "$SRC" --json "$OUT/resume-embedded.json" >"$OUT/resume-embedded.out" 2>&1 || true
SRC=$((SRC + 4)); kill "$GPID"; wait "$GPID" 2>/dev/null || true
start_nats
start_gw 4-7 resume-cluster cluster
pin 12-15 "$BIN/resume_storm" --addr "127.0.0.1:$GP" --clients "$CONNS" --users "$USERS" \
    --missed 20 --source-ips 4 --source-ip-offset "$SRC" --json "$OUT/resume-cluster.json" >"$OUT/resume-cluster.out" 2>&1 || true
kill "$GPID" "$NATS_PID"; wait 2>/dev/null || true
for f in resume-embedded resume-cluster; do
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], "recovered", r["recovered"], "failures", r["failures"], "storm s", r["storm_secs"], "p99 ms", r["recover_ms"]["p99"])' "$OUT/$f.json" "$f" || echo "$f: no result"
done
grep -h 'nats_round_trip_seconds_count\|nats_round_trip_seconds_sum' "$OUT"/cluster1-r*.metrics || true
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def rate(path):
    try:
        return json.load(open(path)).get("events_per_sec") or 0
    except (OSError, ValueError):
        return 0
for e in sorted(glob.glob(os.path.join(out, "embedded-r*.json"))):
    c = e.replace("embedded-", "cluster1-")
    if rate(e) and rate(c):
        print(f"{os.path.basename(c)[:-5]}: one cluster node at {100 * rate(c) / rate(e):.1f} % of the embedded log "
              f"({rate(c):,.0f} against {rate(e):,.0f} delivered/s)")
PY
