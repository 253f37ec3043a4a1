# Shared by cores.sh and cluster-cores.sh (sourced): process pinning, ports, health checks,
# and the limits a run of thousands of connections needs.
ulimit -n 1000000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
sysctl -qw vm.max_map_count=1048576 2>/dev/null || true
export GATEWAY_JWT_SECRET=${GATEWAY_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
# Pinned on 16 or more cores; on fewer (trying a script out) everything shares them.
pinned() { (($(nproc) >= 16)) && command -v taskset >/dev/null; }
pin() {
    local cores=$1
    shift
    if pinned; then taskset -c "$cores" "$@"; else "$@"; fi
}
# spawn CORES LOG COMMAND...: in the background, so that $! is the command's own pid (a
# function run with & would leave $! pointing at a subshell, and kill would miss the server).
spawn() {
    local cores=$1 log=$2
    shift 2
    if pinned; then
        taskset -c "$cores" "$@" >"$log" 2>&1 &
    else
        "$@" >"$log" 2>&1 &
    fi
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
healthy() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)' "$1" 2>/dev/null; }
