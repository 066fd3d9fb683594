#!/usr/bin/env bash
# The loss-weighting and sampling comparison of BENCHMARKS.md on examples/five-task: each strategy trains the
# five tasks jointly with the example's recipe, one run after the other on this machine (the mixed-plan runs
# also log gradient cosines every 200 steps, which costs about 1% of their time), and the table puts
# their test scores, mean, wall time (and the ratio to the first run's) beside the single-task baselines of
# scripts/five-task-bench.sh (read from runs/five-task-bench when there).
# Usage: scripts/strategies-bench.sh [OUT_DIR] [NAME ...]   (default runs/strategies, every strategy; runs
# that finished are kept and a run stopped halfway resumes from its last checkpoint, so an interrupted
# comparison goes on where it stopped; KEEP_BINARY=1 trains with the binary copied into OUT_DIR by an earlier
# invocation instead of today's build; TABLE_ONLY=1 prints the table of the finished runs and trains nothing;
# COST=1 times each named strategy's steps instead, ROUNDS=3 rounds, and prints their cost side by side)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/strategies}
shift || true
CONFIG=examples/five-task/config.toml
# name | --set overrides (space-separated). Every row but intensity-x2 sets equal static weights: the
# example's own weighting (intensity ×2) is the outcome of this comparison, not one of its inputs.
STRATEGIES='
equal-mixed|training.sampling.plan="mixed" training.diagnostics_every=200 training.weighting.weights={}
uncertainty|training.sampling.plan="mixed" training.weighting.method="uncertainty" training.diagnostics_every=200 training.weighting.weights={}
dwa|training.sampling.plan="mixed" training.weighting.method="dwa" training.weighting.period=100 training.diagnostics_every=200 training.weighting.weights={}
gradnorm|training.sampling.plan="mixed" training.weighting.method="grad_norm" training.diagnostics_every=200 training.weighting.weights={}
pcgrad|training.sampling.plan="mixed" training.surgery.method="pcgrad" training.diagnostics_every=200 training.weighting.weights={}
cagrad|training.sampling.plan="mixed" training.surgery.method="cagrad" training.diagnostics_every=200 training.weighting.weights={}
rlw|training.sampling.plan="mixed" training.weighting.method="rlw" training.diagnostics_every=200 training.weighting.weights={}
famo|training.sampling.plan="mixed" training.weighting.method="famo" training.diagnostics_every=200 training.weighting.weights={}
imtl|training.sampling.plan="mixed" training.weighting.method="imtl" training.surgery.method="imtl" training.diagnostics_every=200 training.weighting.weights={}
mgda|training.sampling.plan="mixed" training.surgery.method="mgda" training.diagnostics_every=200 training.weighting.weights={}
mgda-ub|training.sampling.plan="mixed" training.surgery.method="mgda" training.surgery.representation=true training.diagnostics_every=200 training.weighting.weights={}
aligned-mtl|training.sampling.plan="mixed" training.surgery.method="aligned_mtl" training.diagnostics_every=200 training.weighting.weights={}
nash-mtl|training.sampling.plan="mixed" training.surgery.method="nash_mtl" training.diagnostics_every=200 training.weighting.weights={}
db-mtl|training.sampling.plan="mixed" training.weighting.method="log" training.surgery.method="db_mtl" training.diagnostics_every=200 training.weighting.weights={}
auto-lambda|training.sampling.plan="mixed" training.weighting.method="auto_lambda" training.diagnostics_every=200 training.weighting.weights={}
intensity-x2|training.sampling.plan="mixed" training.weighting.weights.intensity=2.0 training.diagnostics_every=200
proportional|training.sampling.plan="sampled" training.sampling.sampler="proportional" training.weighting.weights={}
temperature-2|training.sampling.plan="sampled" training.sampling.sampler="temperature" training.sampling.temperature=2.0 training.weighting.weights={}
temperature-5|training.sampling.plan="sampled" training.sampling.sampler="temperature" training.sampling.temperature=5.0 training.weighting.weights={}
annealed|training.sampling.plan="sampled" training.sampling.sampler="annealed" training.weighting.weights={}
'
if [ -z "${TABLE_ONLY:-}" ]; then
bash scripts/fetch.sh
if [ -z "${KEEP_BINARY:-}" ] || [ ! -x "$OUT/mtl" ]; then cargo build --release --quiet -p mtl-cli; fi
fi
if [ -n "${COST:-}" ]; then
  # The cost of each strategy alone: `mtl check`'s timed training steps on a sample of the data (the median of
  # 6 steps after an untimed one), ROUNDS rounds over the strategies in turn, so that the machine's drift
  # spreads over all; the median per strategy and its ratio to the first named.
  mkdir -p "$OUT"
  : > "$OUT/cost.tsv"
  for round in $(seq "${ROUNDS:-3}"); do
    while IFS='|' read -r name sets; do
      [ -z "$name" ] && continue
      if [ $# -gt 0 ] && [[ ! " $* " == *" $name "* ]]; then continue; fi
      args=()
      for s in $sets; do args+=(--set "$s"); done
      secs=$(target/release/mtl check "$CONFIG" "${args[@]}" --json -q \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["estimate"]["seconds_per_step"])')
      printf '%s\t%s\t%s\n' "$round" "$name" "$secs" >> "$OUT/cost.tsv"
    done <<< "$STRATEGIES"
  done
  python3 - "$OUT/cost.tsv" "$@" <<'PY'
import statistics, sys, collections
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
by = collections.OrderedDict()
for _, name, secs in rows:
    by.setdefault(name, []).append(float(secs))
first = None
lines = ["| strategy | s/step (median of rounds) | × first |", "|---|---|---|"]
for name, v in by.items():
    m = statistics.median(v)
    first = first or m
    lines.append(f"| {name} | {m:.3f} | ×{m / first:.2f} |")
print("\n".join(lines))
PY
  exit 0
fi
mkdir -p "$OUT"
# A copy of the binary, so that rebuilding while the comparison runs cannot change it halfway. KEEP_BINARY=1
# keeps the copy an earlier invocation made, so that rows added later train with the same build as the rest.
if [ -z "${TABLE_ONLY:-}" ] && { [ -z "${KEEP_BINARY:-}" ] || [ ! -x "$OUT/mtl" ]; }; then
  cp target/release/mtl "$OUT/mtl"
fi
MTL=$OUT/mtl
NAMES=()
while IFS='|' read -r name sets; do
  [ -z "$name" ] && continue
  NAMES+=("$name")
  if [ -n "${TABLE_ONLY:-}" ]; then continue; fi
  if [ $# -gt 0 ] && [[ ! " $* " == *" $name "* ]]; then continue; fi
  if [ -f "$OUT/$name/metrics.json" ]; then continue; fi
  # Checkpoints every 200 steps: a run stopped halfway (a session's end) resumes from its last one.
  args=(--set training.checkpoint_every=200)
  for s in $sets; do args+=(--set "$s"); done
  if compgen -G "$OUT/$name/checkpoint-*" > /dev/null; then
    echo "== $name, resumed ($(date -u +%H:%M:%S))" >&2
    MTL_LOG=info "$MTL" train "$CONFIG" --out "$OUT/$name" "${args[@]}" --resume >> "$OUT/$name.log" 2>&1
  else
    rm -rf "$OUT/$name"
    echo "== $name ($(date -u +%H:%M:%S))" >&2
    MTL_LOG=info "$MTL" train "$CONFIG" --out "$OUT/$name" "${args[@]}" > "$OUT/$name.log" 2>&1
  fi
done <<< "$STRATEGIES"
python3 - "$OUT" "${NAMES[@]}" <<'PY'
import json, sys, pathlib
out, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
tasks = ["polarity", "trec", "wnut", "pos", "intensity"]
main = {"polarity": "accuracy", "trec": "accuracy", "wnut": "f1", "pos": "accuracy", "intensity": "pearson"}
singles = pathlib.Path("runs/five-task-bench")
single = {}
for t in tasks:
    f = singles / t / "metrics.json"
    if f.exists():
        single[t] = json.loads(f.read_text())["test"][t][main[t]]
rows = ["| strategy | " + " | ".join(f"{t} ({main[t]})" for t in tasks) + " | mean | worst Δ vs single | wall time | × first |",
        "|---" * (len(tasks) + 5) + "|"]
if len(single) == len(tasks):
    mean = sum(single.values()) / len(tasks)
    rows.append("| single-task (scripts/five-task-bench.sh) | " + " | ".join(f"{single[t]:.4f}" for t in tasks) + f" | {mean:.4f} | | | |")
first = None
for name in names:
    f = out / name / "metrics.json"
    if not f.exists():
        continue
    m = json.loads(f.read_text())
    scores = [m["test"][t][main[t]] for t in tasks]
    secs = m["train_seconds"]
    first = first or secs
    worst = min(s - single[t] for s, t in zip(scores, tasks)) if len(single) == len(tasks) else float("nan")
    rows.append(f"| {name} | " + " | ".join(f"{s:.4f}" for s in scores)
                + f" | {sum(scores) / len(scores):.4f} | {worst:+.4f} | {secs:.0f} s | ×{secs / first:.2f} |")
table = "\n".join(rows) + "\n"
(out / "table.md").write_text(table)
print(table)
PY
