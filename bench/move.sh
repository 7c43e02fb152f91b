#!/usr/bin/env bash
# Time to move a range holding SIZE_MB (default 1024) of data between the groups of a
# fresh playground, and the latency of requests meanwhile: to the other ranges, and to
# the moving range itself (reads and writes, MOVING_CONCURRENCY in flight, default 4;
# a live move keeps it serving until a short cutover).
#   bench/move.sh                      # binaries from target/release
#   BIN=/path/to/bin SIZE_MB=256 MOVING_CONCURRENCY=16 bench/move.sh
# First the same two loads run for BASELINE_SECS (default 10) with no move, so the
# move's numbers can be read against what this machine does without one. Requests to
# the moving range slower than SLOW_MS (default 100) are listed with the time they
# started, beside the cutover's log lines. Prints a summary, then the bench reports
# (JSON) of every load.
set -euo pipefail
# shellcheck source=bench/playground.sh
source "$(dirname "$0")/playground.sh"
bin=$(cd "${BIN:-target/release}" && pwd)
summary=$(cd "$(dirname "$0")" && pwd)/move_summary.py
size_mb=${SIZE_MB:-1024}
baseline_secs=${BASELINE_SECS:-10}
value_size=10000
keys=$((size_mb * 1024 * 1024 / value_size))
dir=$(mktemp -d -t shardkv-move-XXXX)
cd "$dir"
start_playground "$bin" "rm -rf $dir"
# The placement scheduler would split the loaded range and move its pieces itself:
# this measures one operator's move of the whole range.
"$bin/shardctl" scheduler set --paused true >/dev/null
# The playground splits at g, n and t: load [g, n) through the prefix "h".
"$bin/shardctl" bench --keep --workload write-only --prefixes h --keys "$keys" \
  --value-size "$value_size" --preload --concurrency 32 --clients 4 --duration 0.1 --warmup 0 \
  >/dev/null
owner=$("$bin/shardctl" --output json query |
  python3 -c "import json,sys; c=json.load(sys.stdin); print(next(r['gid'] for r in c['ranges'] if r['start'] <= 'h' and (r['end'] is None or 'h' < r['end'])))")
dest=$((owner == 1 ? 2 : 1))
echo "loaded ${size_mb} MB ($keys keys of $value_size bytes) into [g, n) of group $owner; data dirs:"
du -sh "$dir"/playground/* 2>/dev/null | sed 's/^/  /' || true

# start_loads NAME: reads and writes (100-byte values) to every other range, 16 in
# flight, into NAME-other.json, and to the moving range on keys of their own (prefix
# "hz") into NAME-moving.json, until stop_loads.
start_loads() {
  "$bin/shardctl" --output json bench --keep --workload mixed --prefixes a,b,c,d,e,f,o,p,q,r,s,u,v,w,x,y,z \
    --keys 100000 --concurrency 16 --clients 4 --duration 3600 --warmup 0 >"$1-other.json" &
  load=$!
  "$bin/shardctl" --output json bench --keep --workload mixed --prefixes hz --slow-ms "${SLOW_MS:-100}" \
    --keys 10000 --concurrency "${MOVING_CONCURRENCY:-4}" --clients 1 --duration 3600 --warmup 0 \
    >"$1-moving.json" &
  moving=$!
  sleep 3 # connections up, load steady
}
stop_loads() {
  kill -INT $load $moving
  wait $load $moving
}

# Bytes the playground's servers have written to disk so far (write_bytes of each
# one's /proc/PID/io: what it sent to the block layer, whatever else the machine does).
# CPU seconds each server has used so far, one "pid seconds args" line each.
cpu_secs() {
  local pid
  for pid in $(pgrep -P "$playground"); do
    echo "$pid $(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$pid/stat") $(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-90)"
  done
}
disk_mb() {
  local total=0 pid
  for pid in $(pgrep -P "$playground"); do
    total=$((total + $(awk '$1 == "write_bytes:" { print $2 }' "/proc/$pid/io" 2>/dev/null || echo 0)))
  done
  echo $((total / 1048576))
}

# Let the loaded data's flushes and compactions finish first: left running, they
# fall in the baseline or the move and are counted as the move's. Settled once the
# servers write under 4 MB in 2 s (bounded: 120 s).
for _ in $(seq 1 60); do
  mark=$(disk_mb)
  sleep 2
  [ $(($(disk_mb) - mark)) -lt 4 ] && break
done

start_loads baseline
before=$(disk_mb)
sleep "$baseline_secs"
echo "disk written with no move: $(($(disk_mb) - before)) MB in ${baseline_secs} s"
stop_loads

start_loads move
started=$(date +%s.%N)
before=$(disk_mb)
cpu_secs >cpu-before.txt
"$bin/shardctl" --timeout 1800 move h "$dest" --wait
written=$(($(disk_mb) - before))
cpu_secs >cpu-after.txt
ended=$(date +%s.%N)
stop_loads
# Memtable flushes and compactions of the moved data go on after the move.
sleep "${SETTLE_SECS:-20}"
settled=$(($(disk_mb) - before))
echo "moved ${size_mb} MB from group $owner to group $dest in $(echo "$ended - $started" | bc) s"
echo "disk written during the move: $written MB ($(echo "scale=1; $written / $size_mb" | bc)x the range)," \
  "and until ${SETTLE_SECS:-20} s after it (loads stopped): $settled MB"
python3 "$summary" "$started" "$ended" baseline-other.json baseline-moving.json \
  move-other.json move-moving.json playground/logs
echo "CPU seconds each server used during the move:"
awk 'NR == FNR { t[$1] = $2; next } { $2 = sprintf("%6.1f", $2 - t[$1]); print "  " $0 }' cpu-before.txt cpu-after.txt
for f in baseline-other baseline-moving move-other move-moving; do
  echo "$f:"
  cat "$f.json"
done
