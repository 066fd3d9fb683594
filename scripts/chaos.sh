#!/usr/bin/env bash
# Hostile clients and a stopping server, on loopback and bounded in time (issue 24): each row starts `mtl serve`
# on the default decoder (SmolLM2-135M-Instruct, no training needed) and runs one row of scripts/chaos.py
# against it from another process:
#   slowloris  500 half-sent requests held open, reopened as the server closes them (--header-timeout-s 10);
#              a normal client meanwhile: every answer 200, p99 under 1 s;
#   sigterm    16 long streams, then SIGTERM (--shutdown-timeout-s 5): the server exits within 5 s (+2), and
#              every accepted request ends whole, with 503, or with the `shutting_down` error event;
#   flood      16 streams keep the queue full (--max-sequences 8 --queue-bound 8), then 2 MiB bodies flood in at
#              10 a second: the p99 latency of the streams' answers at most doubles, no 5xx;
#   kill -9 during checkpoint writes  a small training run (tiny-bert on 800 ATIS sentences, a checkpoint every
#              step) killed 50 times while it writes a checkpoint, resumed each time: every resume starts, and
#              the run ends with the metrics of a straight run;
#   truncated newest checkpoint  the newest checkpoint of a killed run cut in half: the resume falls back to
#              the one before, says so, and ends with the straight run's metrics.
# Prints a table; exits 0 only when every row holds. Usage: scripts/chaos.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/chaos}
MODEL=assets/models/SmolLM2-135M-Instruct
scripts/fetch.sh > /dev/null
cargo build --release --quiet -p mtl-cli
mkdir -p "$OUT"
MTL=target/release/mtl

# shellcheck source=scripts/serve-lib.sh
source scripts/serve-lib.sh
serve() { # log, flags...
  local log=$1
  shift
  start_server "$log" "$MODEL" --kv-cache-mb 256 "$@"
}

status=0
run_row() { # name, python args...
  local name=$1
  shift
  if python3 scripts/chaos.py "$@" > "$OUT/$name.json"; then :; else status=1; fi
  cat "$OUT/$name.json"
}

serve "$OUT/slowloris-server.log" --header-timeout-s 10
run_row slowloris slowloris "$ADDR"
stop_server

serve "$OUT/sigterm-server.log" --shutdown-timeout-s 5
pid=$SERVER
run_row sigterm sigterm "$ADDR" "$pid" 5
wait "$pid" 2> /dev/null || true
SERVER=

serve "$OUT/flood-server.log" --max-sequences 8 --queue-bound 8
run_row flood flood "$ADDR"
stop_server

TRAIN=(examples/atis/config.toml --set 'model.path="tests/fixtures/tiny-bert"' --set model.max_len=32
  --set training.epochs=12 --set training.batch_size=8 --set tasks.intent.train_limit=800
  --set tasks.slots.train_limit=800 --set training.checkpoint_every=1 --set training.keep_checkpoints=2)
run_row checkpoints checkpoints "$OUT/train" "$MTL" "${TRAIN[@]}"
run_row truncated truncated "$OUT/train" "$MTL" "${TRAIN[@]}"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.load(open(f"{out}/{name}.json")) for name in ("slowloris", "sigterm", "flood", "checkpoints", "truncated")]
print("| row | result | holds |")
print("|---|---|---|")
for r in rows:
    detail = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("row", "ok"))
    print(f"| {r['row']} | {detail} | {'✓' if r['ok'] else '✗'} |")
PY
exit $status
