#!/usr/bin/env bash
# Autonomous placement from empty: a fresh 3-group playground, SIZE_MB (default 1024)
# written under one prefix ("h", in [g, n)) while a mixed load runs on every other
# range; then the time until the scheduler has split the data and spread it so every
# group holds within ±20% of the mean bytes (shardctl query's range statistics), and
# the other ranges' latencies over the whole run.
#   bench/placement.sh                 # binaries from target/release
#   BIN=/path/to/bin SIZE_MB=256 bench/placement.sh
# Prints a line every 5 s (ranges, bytes per group), the times, then the load's report.
set -euo pipefail
# shellcheck source=bench/playground.sh
source "$(dirname "$0")/playground.sh"
bin=$(cd "${BIN:-target/release}" && pwd)
size_mb=${SIZE_MB:-1024}
value_size=10000
keys=$((size_mb * 1024 * 1024 / value_size))
dir=$(mktemp -d -t shardkv-placement-XXXX)
cd "$dir"
PLAYGROUND_ARGS="--groups 3 ${PLAYGROUND_ARGS:-}" start_playground "$bin" "rm -rf $dir"
"$bin/shardctl" --output json bench --keep --workload mixed --prefixes a,b,c,d,e,f,o,p,q,r,s,u,v,w,x,y,z \
  --keys 100000 --concurrency 16 --clients 4 --duration 3600 --warmup 0 >other.json &
load=$!
sleep 3
started=$(date +%s.%N)
"$bin/shardctl" bench --keep --workload write-only --prefixes h --keys "$keys" \
  --value-size "$value_size" --preload --concurrency 32 --clients 4 --duration 0.1 --warmup 0 \
  >/dev/null
written=$(date +%s.%N)
echo "wrote ${size_mb} MB ($keys keys of $value_size bytes) under \"h\" in $(echo "$written - $started" | bc) s"
# balanced: every group within ±20% of the mean bytes, every range's size known, no move under way.
balanced() {
  "$bin/shardctl" --output json query | python3 -c '
import json, sys
c = json.load(sys.stdin)
per = {g["gid"]: 0 for g in c["groups"]}
known = True
for r in c["ranges"]:
    if "stats" not in r:
        known = False
        continue
    per[r["gid"]] += r["stats"]["bytes"]
mean = sum(per.values()) / len(per)
ok = known and mean > 0 and all(abs(b - mean) <= 0.2 * mean for b in per.values())
print(len(c["ranges"]), " ".join(f"g{g}={b / 2**20:.0f}MiB" for g, b in sorted(per.items())), "balanced" if ok else "")
sys.exit(0 if ok else 1)'
}
deadline=$(($(date +%s) + ${TIMEOUT_SECS:-1800}))
until line=$(balanced); do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "not balanced after ${TIMEOUT_SECS:-1800} s: $line"; exit 1; }
  echo "  +$(echo "$(date +%s.%N) - $started" | bc | cut -d. -f1) s: $line ranges"
  sleep 5
done
ended=$(date +%s.%N)
kill -INT $load
wait $load
echo "balanced within ±20% $(echo "$ended - $started" | bc) s after the writes began ($(echo "$ended - $written" | bc) s after they ended): $line"
echo "scheduler decisions:"
"$bin/shardctl" scheduler history | tail -40
echo "requests to the other ranges over the whole run:"
cat other.json
