# Sourced by the scripts that drive `mtl serve` from another process (load-test.sh, chaos.sh): one server at a
# time, started on a free loopback port, its address read from its log.
#   start_server LOG MODEL [FLAGS...]  starts "$MTL" serve; sets SERVER (its pid) and ADDR (host:port)
#   stop_server                        SIGTERM, then waits for it (also on exit)
SERVER=
stop_server() { if [ -n "$SERVER" ]; then kill -TERM "$SERVER" 2> /dev/null || true; wait "$SERVER" 2> /dev/null || true; SERVER=; fi; }
trap stop_server EXIT
start_server() {
  local log=$1 model=$2
  shift 2
  "$MTL" serve "$model" --addr 127.0.0.1:0 "$@" 2> "$log" &
  SERVER=$!
  for _ in $(seq 600); do
    ADDR=$(sed -n 's/.*serving on http:\/\/\([0-9.:]*\).*/\1/p' "$log" | head -1)
    [ -n "$ADDR" ] && return 0
    sleep 0.1
  done
  echo "the server did not start:" >&2; cat "$log" >&2; exit 1
}
