#!/usr/bin/env python3
"""Turns bench/compare.sh's JSON lines into the Markdown table of BENCHMARKS.md:
shardkv and etcd side by side per workload and concurrency, with ratios."""
import json
import sys

rows = {}
for line in open(sys.argv[1] if len(sys.argv) > 1 else "bench-results.jsonl"):
    if not line.strip():
        continue
    r = json.loads(line)
    # Mixed workloads: the slower operation type's latencies.
    ops = r["operations"] or [{"p50_ms": 0, "p99_ms": 0}]
    rows[(r["workload"], r["distribution"], r["concurrency"], r["target"])] = (
        r["ops_per_sec"], max(o["p50_ms"] for o in ops), max(o["p99_ms"] for o in ops),
        sum(r["errors"].values()))

print("| workload | keys | in flight | shardkv ops/s | etcd ops/s | ratio | shardkv p50 / p99 ms | etcd p50 / p99 ms | errors (s/e) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for (workload, dist, c, target) in sorted(k for k in rows if k[3] == "shardkv"):
    s = rows[(workload, dist, c, "shardkv")]
    e = rows.get((workload, dist, c, "etcd"))
    ratio = f"{s[0] / e[0]:.2f}x" if e and e[0] else "-"
    etcd_ops = f"{e[0]:.0f}" if e else "-"
    etcd_lat = f"{e[1]:.2f} / {e[2]:.2f}" if e else "-"
    errors = f"{s[3]}/{e[3] if e else '-'}"
    print(f"| {workload} | {dist} | {c} | {s[0]:.0f} | {etcd_ops} | {ratio} | {s[1]:.2f} / {s[2]:.2f} | {etcd_lat} | {errors} |")
