#!/usr/bin/env bash
# Exact resume on a real run: trains CONFIG straight, then again killed with SIGKILL at a random moment after its
# first checkpoint and continued with `mtl train ... --resume`; the two must end with the same metrics.json (wall
# time aside), the same bytes in every weight file and the same log.jsonl (wall-clock times aside). The engine's
# test does the same on a tiny model (crates/mtl-cli/tests/it/engine.rs); this is the check on examples/atis.
# Usage: scripts/resume-check.sh [CONFIG] [OUT_DIR] [--set key=value ...]
#   (default examples/atis/config.toml and runs/resume-check; KILL_SEED=N fixes the random moment)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-examples/atis/config.toml}
OUT=${2:-runs/resume-check}
shift $(( $# < 2 ? $# : 2 ))
bash scripts/fetch.sh
cargo build --release --quiet -p mtl-cli
mkdir -p "$OUT"
# A copy of the binary, so that rebuilding meanwhile cannot change it between the two runs.
cp target/release/mtl "$OUT/mtl"
MTL=$OUT/mtl
rm -rf "$OUT/straight" "$OUT/killed"

echo "== straight run ($(date -u +%H:%M:%S))" >&2
start=$(date +%s)
"$MTL" train "$CONFIG" --out "$OUT/straight" "$@" > "$OUT/straight.log" 2>&1
total=$(( $(date +%s) - start ))

echo "== run to kill ($(date -u +%H:%M:%S))" >&2
start=$(date +%s)
"$MTL" train "$CONFIG" --out "$OUT/killed" "$@" > "$OUT/killed.log" 2>&1 &
pid=$!
until compgen -G "$OUT/killed/checkpoint-*" > /dev/null; do
  kill -0 "$pid" 2> /dev/null || { echo "the run ended before its first checkpoint" >&2; exit 1; }
  sleep 1
done
first=$(( $(date +%s) - start ))
# A moment between the first checkpoint and 90% of the straight run's time.
RANDOM=${KILL_SEED:-$$}
span=$(( total * 9 / 10 - first ))
[ "$span" -gt 1 ] || span=1
delay=$(( RANDOM % span ))
sleep "$delay"
kill -0 "$pid" 2> /dev/null || { echo "the run finished before it could be killed" >&2; exit 1; }
kill -9 "$pid"
wait "$pid" 2> /dev/null || true
echo "killed at $(( first + delay )) s (first checkpoint at $first s, straight run $total s); checkpoints left:" \
  $(cd "$OUT/killed" && ls -d checkpoint-* 2> /dev/null) >&2

echo "== resume ($(date -u +%H:%M:%S))" >&2
"$MTL" train "$CONFIG" --out "$OUT/killed" --resume "$@" > "$OUT/resumed.log" 2>&1

python3 - "$OUT/straight" "$OUT/killed" <<'PY'
import hashlib, json, pathlib, sys
a, b = map(pathlib.Path, sys.argv[1:])
def metrics(d):
    m = json.loads((d / "metrics.json").read_text())
    m.pop("train_seconds")
    return m
def log(d):
    rows = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time", None)
    return rows
def weights(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*.safetensors"))}
ok = True
for what, f in [("metrics.json", metrics), ("log.jsonl", log), ("weight files", weights)]:
    same = f(a) == f(b)
    ok &= same
    print(f"{what}: {'identical' if same else 'DIFFERENT'}")
w = weights(a)
print(f"{len(w)} weight files, {len(log(a))} log records; test scores:",
      json.dumps(metrics(a)["test"], sort_keys=True)[:300])
sys.exit(0 if ok else 1)
PY
