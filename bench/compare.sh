#!/usr/bin/env bash
# The BENCHMARKS.md matrix: write-only and read-only workloads (or $WORKLOADS, keys
# chosen $DISTRIBUTION) at 1, 16, 64 and 256
# concurrent requests, 100-byte values over 100k keys, against a running shardkv
# playground and (if ETCD is set) a running etcd cluster. One JSON report per line
# goes to $OUT (default bench-results.jsonl).
#   target/release/shardctl playground &          # shardkv, default ports
#   bench/etcd-cluster.sh &                       # etcd, ports 2379/22379/32379
#   ETCD=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379 bench/compare.sh
set -euo pipefail
SHARDCTL=${SHARDCTL:-target/release/shardctl}
OUT=${OUT:-bench-results.jsonl}
DURATION=${DURATION:-20}
KEYS=${KEYS:-100000}
CONCURRENCY=${CONCURRENCY:-"1 16 64 256"}
WORKLOADS=${WORKLOADS:-"write-only read-only"}
DISTRIBUTION=${DISTRIBUTION:-uniform}
targets=("shardkv")
if [ -n "${ETCD:-}" ]; then targets+=("etcd"); fi
# run_bench TARGET BENCH-FLAGS...: one JSON report on stdout.
run_bench() {
  local target=$1 extra=()
  shift
  if [ "$target" = etcd ]; then extra=(--etcd "$ETCD"); fi
  "$SHARDCTL" --output json bench --keep "${extra[@]}" "$@" | tr -d '\n'
}
: >"$OUT"
for target in "${targets[@]}"; do
  # Load every key once so reads find data.
  run_bench "$target" --workload write-only --keys "$KEYS" --preload \
    --concurrency 64 --clients 4 --duration 1 --warmup 0 >/dev/null
done
# Each row runs against every target back to back, so a drift in the shared
# machine's speed (seen at ~25% within an hour) lands on both sides of a ratio.
for workload in $WORKLOADS; do
  for c in $CONCURRENCY; do
    clients=$(( c < 4 ? c : 4 ))
    for target in "${targets[@]}"; do
      run_bench "$target" --workload "$workload" --keys "$KEYS" --value-size 100 \
        --distribution "$DISTRIBUTION" --concurrency "$c" --clients "$clients" \
        --duration "$DURATION" --warmup 3 >>"$OUT"
      echo >>"$OUT"
      echo "$target $workload c=$c done" >&2
    done
  done
done
