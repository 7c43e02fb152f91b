#!/usr/bin/env python3
"""Summarises bench/move.sh's runs: per load (other ranges, moving range) with and
without the move, ops/s, p99, p99.9, max and errors; the other ranges' p99 during the
move against the baseline; and each slow request to the moving range, placed against
the move's start and its cutover (the kvnodes' "move cutover" log lines)."""
import datetime
import glob
import json
import re
import sys

started, ended = float(sys.argv[1]), float(sys.argv[2])
base_other, base_moving, move_other, move_moving = (json.load(open(p)) for p in sys.argv[3:7])
logs = sys.argv[7]


def worst(report, field):
    return max((o[field] for o in report["operations"]), default=0.0)


def line(name, r):
    ops = {o["op"]: o for o in r["operations"]}
    p99 = " / ".join(f"{ops[op]['p99_ms']:.1f}" for op in ("get", "put") if op in ops)
    errors = sum(r["errors"].values())
    return (f"  {name:<28} {r['ops_per_sec']:>7.0f} ops/s  get/put p99 {p99} ms  "
            f"p99.9 {worst(r, 'p999_ms'):.1f} ms  max {worst(r, 'max_ms'):.1f} ms  errors {errors}")


print("summary (latencies: the slower of get and put):")
print(line("other ranges, no move", base_other))
print(line("other ranges, during move", move_other))
print(line("moving range, no move", base_moving))
print(line("moving range, during move", move_moving))
ratio = worst(move_other, "p99_ms") / max(worst(base_other, "p99_ms"), 1e-9)
print(f"  other ranges' p99 during the move: {ratio:.2f}x no move (target: within 2x)")
print(f"  moving range's max during the move: {worst(move_moving, 'max_ms'):.1f} ms (target: under 100 ms)")

# slog-term stamps records with the local time, without a year: "Dec 02 15:40:17.123".
year = datetime.datetime.fromtimestamp(started).year
cutover = []
for path in sorted(glob.glob(f"{logs}/*.log")):
    for text in open(path, errors="replace"):
        if "move cutover" not in text:
            continue
        m = re.match(r"(\w{3} \d{2} \d{2}:\d{2}:\d{2}\.\d{3})", text)
        if m:
            at = datetime.datetime.strptime(f"{year} {m.group(1)}", "%Y %b %d %H:%M:%S.%f").timestamp()
            cutover.append((at, text.split(m.group(1), 1)[1].strip()[:100]))
cutover.sort()
print("cutover (seconds after the move started):")
for at, text in cutover:
    print(f"  +{at - started:7.3f} s  {text}")
slow = move_moving.get("slow_requests") or []
frozen = [at for at, text in cutover if "source frozen" in text]
ours = [at for at, text in cutover if "range is ours" in text]
if frozen and ours:
    begin, end = min(frozen), max(ours)
    caught = [s["ms"] for s in slow
              if s["started_unix_ms"] / 1000 <= end and s["started_unix_ms"] / 1000 + s["ms"] / 1000 >= begin]
    worst_caught = f"the slowest {max(caught):.1f} ms" if caught else "none"
    print(f"cutover window {1000 * (end - begin):.1f} ms; requests over --slow-ms that overlap it: "
          f"{len(caught)}, {worst_caught}")
print(f"requests to the moving range over --slow-ms during the move's run: {len(slow)}")
for s in slow:
    at = s["started_unix_ms"] / 1000
    print(f"  +{at - started:7.3f} s  {s['op']} {s['ms']:.1f} ms {s['error'] or ''}")
