#!/usr/bin/env bash
# Starts a 3-member etcd cluster on loopback for `shardctl bench --etcd`, the way
# BENCHMARKS.md compares against it: Debian's etcd-server (3.4), default settings
# (fsync on every commit, like shardkv). Data and logs go to $DIR (default
# ./etcd-bench); Ctrl-C stops all three members.
#   sudo apt-get install etcd-server
#   bench/etcd-cluster.sh
#   shardctl bench --etcd 127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379 ...
set -euo pipefail
DIR=${DIR:-etcd-bench}
mkdir -p "$DIR"
cluster="e1=http://127.0.0.1:2380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
for spec in e1:2379:2380 e2:22379:22380 e3:32379:32380; do
  IFS=: read -r name client peer <<<"$spec"
  etcd --name "$name" --data-dir "$DIR/$name" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token shardkv-bench \
    >"$DIR/$name.log" 2>&1 &
  pids+=($!)
done
echo "etcd members: 127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379 (pids ${pids[*]}, logs in $DIR)"
wait
