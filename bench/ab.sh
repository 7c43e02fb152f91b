#!/usr/bin/env bash
# A/B check of a hot-path change: runs one fixed, short sequence against a fresh
# playground started from the binaries in BIN_DIR, and prints one line per run
# (label, workload, in flight, ops/s, p50 ms, p99 ms). Run it for the build before
# and after a change, twice each, alternating: differences smaller than the spread
# between two runs of the same build are noise.
#   bench/ab.sh /tmp/before before; bench/ab.sh target/release after
set -euo pipefail
bin=$(cd "$1" && pwd)
label=$2
dir=$(mktemp -d -t "shardkv-ab-$label-XXXX")
cd "$dir"
"$bin/shardctl" playground >pg.log 2>&1 &
playground=$!
# Stop the playground and wait until it has stopped every server (and freed the
# ports), so the next run can start at once.
trap 'kill -INT $playground 2>/dev/null || true; wait $playground || true' EXIT
for _ in $(seq 1 60); do
  grep -q 'is up' pg.log && break
  kill -0 $playground 2>/dev/null || break
  sleep 1
done
# A playground left running elsewhere holds the ports: the bench would measure it.
if ! grep -q 'is up' pg.log; then
  echo "the playground did not start (ports in use by another one?):" >&2
  tail -5 pg.log >&2
  exit 1
fi
"$bin/shardctl" bench --workload write-only --keys 100000 --preload \
  --concurrency 64 --clients 4 --duration 1 --warmup 0 >/dev/null
sleep 10 # let the engine settle after the preload
for run in "write-only 1" "write-only 16" "write-only 64" "write-only 256" "read-only 1" "read-only 64"; do
  read -r workload c <<<"$run"
  clients=$((c < 4 ? c : 4))
  "$bin/shardctl" --output json bench --workload "$workload" --keys 100000 \
    --concurrency "$c" --clients "$clients" --duration 10 --warmup 2 |
    python3 -c "import json,sys; r=json.load(sys.stdin); o=r['operations'][0]; print('$label', r['workload'], r['concurrency'], round(r['ops_per_sec']), o['p50_ms'], o['p99_ms'])"
done
