# Sourced by the bench scripts that need a fresh playground of their own.
#
# start_playground BIN [CLEANUP]: starts `BIN/shardctl playground` in the current
# directory and waits until it is up. When the script exits, the playground is
# stopped and waited for (so its ports are free for the next run), then CLEANUP
# (a shell command) runs. PLAYGROUND_ARGS: more flags of `shardctl playground`
# (e.g. --tls).
start_playground() {
  # shellcheck disable=SC2086 # PLAYGROUND_ARGS is a list of flags
  "$1/shardctl" playground ${PLAYGROUND_ARGS:-} >pg.log 2>&1 &
  playground=$!
  # shellcheck disable=SC2064 # expand the pid and cleanup now
  trap "kill -INT $playground 2>/dev/null || true; wait $playground || true; ${2:-}" EXIT
  for _ in $(seq 1 60); do
    grep -q 'is up' pg.log && break
    kill -0 "$playground" 2>/dev/null || break
    sleep 1
  done
  # A playground left running elsewhere holds the ports: the bench would measure it.
  if ! grep -q 'is up' pg.log; then
    echo "the playground did not start (ports in use by another one?):" >&2
    tail -5 pg.log >&2
    exit 1
  fi
}
