#!/usr/bin/env bash
# A/B check of a hot-path change: runs one fixed, short sequence against a fresh
# playground started from the binaries in BIN_DIR, and prints one line per run
# (label, workload, in flight, ops/s, p50 ms, p99 ms). Run it for the build before
# and after a change, twice each, alternating: differences smaller than the spread
# between two runs of the same build are noise.
#   bench/ab.sh /tmp/before before; bench/ab.sh target/release after
# AB_TLS=1 runs the playground with --tls (mutual TLS) and the bench over it;
# AB_RUNS="write-only 1,read-only 64" runs only those (workload, in flight) pairs.
set -euo pipefail
# shellcheck source=bench/playground.sh
source "$(dirname "$0")/playground.sh"
bin=$(cd "$1" && pwd)
label=$2
dir=$(mktemp -d -t "shardkv-ab-$label-XXXX")
cd "$dir"
if [ -n "${AB_TLS:-}" ]; then
  export PLAYGROUND_ARGS=--tls
fi
start_playground "$bin"
if [ -n "${AB_TLS:-}" ]; then
  # After the start: the playground makes these files, and would read the variables
  # as its own client settings before they exist.
  export SHARDKV_TLS_CA=$dir/playground/tls/ca.pem
  export SHARDKV_TLS_CERT=$dir/playground/tls/data.pem SHARDKV_TLS_KEY=$dir/playground/tls/data-key.pem
fi
"$bin/shardctl" bench --keep --workload write-only --keys 100000 --preload \
  --concurrency 64 --clients 4 --duration 1 --warmup 0 >/dev/null
sleep 10 # let the engine settle after the preload
IFS=, read -r -a runs <<<"${AB_RUNS:-write-only 1,write-only 16,write-only 64,write-only 256,read-only 1,read-only 64}"
for run in "${runs[@]}"; do
  read -r workload c <<<"$run"
  clients=$((c < 4 ? c : 4))
  "$bin/shardctl" --output json bench --keep --workload "$workload" --keys 100000 \
    --concurrency "$c" --clients "$clients" --duration 10 --warmup 2 |
    python3 -c "import json,sys; r=json.load(sys.stdin); o=r['operations'][0]; print('$label', r['workload'], r['concurrency'], round(r['ops_per_sec']), o['p50_ms'], o['p99_ms'])"
done
