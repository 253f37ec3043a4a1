#!/usr/bin/env bash
# Packs what tests/bench/cores.sh needs for a machine with more cores and no build tools:
# the release gateway, its benchmark-only native-handler build, loadgen, resume_storm (all
# stripped), nats-server and the reference guest, into target/cores/bins.tar.xz (about 25 MB).
# `make bench` (or BENCH_SCENARIOS=native make bench) builds them first.
#
# There: mkdir -p /tmp/b && tar xJf target/cores/bins.tar.xz -C /tmp/b && tests/bench/cores.sh /tmp/b OUT
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
R=$ROOT/target/release
DIR=$ROOT/target/cores/bin
rm -rf "$DIR" && mkdir -p "$DIR"
for b in gateway gateway-bench-native loadgen resume_storm; do
    [[ -x $R/$b ]] || { echo "missing $R/$b (run make bench first)" >&2; exit 2; }
    strip -o "$DIR/$b" "$R/$b"
done
cp "$ROOT/target/tools/nats/bin/nats-server" "$ROOT/target/components/handler.wasm" "$DIR/"
tar cJf "$ROOT/target/cores/bins.tar.xz" -C "$DIR" .
ls -l "$ROOT/target/cores/bins.tar.xz"
