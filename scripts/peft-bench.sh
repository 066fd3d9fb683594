#!/usr/bin/env bash
# The parameter-efficient comparison of BENCHMARKS.md on examples/five-task: full fine-tuning against shared LoRA,
# per-task LoRA, per-task bottleneck adapters, per-task prefix tuning and per-task AdaLoRA (rank 12 pruned to an
# average of 8, the final budget of per-task LoRA's rank 8, PEFT's schedule of its GLUE examples: tinit 200,
# tfinal 500, deltaT 10; and the same at 3 times the adapters' learning rate, as AdaLoRA's A, B and E all start
# small and learn more slowly than LoRA's A and zero B; and pruned to 7 at that learning rate, so that the kept
# adapters are no larger than per-task LoRA's: the allocator favours the wide FFN matrices, and an average of 8
# keeps 8% more parameters than rank 8), one run after the other on this machine,
# each for 3 epochs of the same number of steps (full fine-tuning and shared LoRA with mixed batches, the per-task
# variants one task per step, every task equally often, as config-lora.toml says). The per-task LoRA and adapter
# rows keep each task's adapter and head from its own best dev evaluation (`--select per-task`: early stopping per
# task); lora-per-task-joint keeps the epoch of the best mean for all of them, and so does the prefix row (as it
# was measured). The table gives trainable parameters, the size of the
# saved weights, peak memory (maximum resident set, GNU time), time per optimiser step, test scores and mean,
# and the single-task baselines of scripts/five-task-bench.sh when runs/five-task-bench has them. The LoRA runs
# and AdaLoRA runs are then exported and checked against transformers and peft (tests/python/check_export.py,
# bench environment: PEFT loads each task's adapter onto the base model).
# Usage: scripts/peft-bench.sh [OUT_DIR] [NAME ...]   (default runs/peft, every variant; finished runs are kept,
# so an interrupted comparison resumes; TABLE_ONLY=1 prints the table of the finished runs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/peft}
shift || true
# name | config | --select | --set overrides (space-separated)
VARIANTS='
full|examples/five-task/config.toml|joint|
lora-shared|examples/five-task/config-lora.toml|joint|peft.per_task=false training.sampling.plan="mixed"
lora-per-task|examples/five-task/config-lora.toml|per-task|
lora-per-task-joint|examples/five-task/config-lora.toml|joint|
adapter-per-task|examples/five-task/config-lora.toml|per-task|peft.method="adapter"
prefix-per-task|examples/five-task/config-lora.toml|joint|peft.method="prefix" training.lr=5e-3
adalora-per-task|examples/five-task/config-lora.toml|per-task|peft.method="adalora" peft.r=12 peft.adalora.target_r=8 peft.adalora.tinit=200 peft.adalora.tfinal=500 peft.adalora.delta_t=10
adalora-per-task-lr3e-3|examples/five-task/config-lora.toml|per-task|peft.method="adalora" peft.r=12 peft.adalora.target_r=8 peft.adalora.tinit=200 peft.adalora.tfinal=500 peft.adalora.delta_t=10 training.lr=3e-3
adalora-per-task-r7|examples/five-task/config-lora.toml|per-task|peft.method="adalora" peft.r=12 peft.adalora.target_r=7 peft.adalora.tinit=200 peft.adalora.tfinal=500 peft.adalora.delta_t=10 training.lr=3e-3
'
if [ -z "${TABLE_ONLY:-}" ]; then
  bash scripts/fetch.sh
  if [ ! -x /usr/bin/time ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y -q time > /dev/null
  fi
  cargo build --release --quiet -p mtl-cli
  mkdir -p "$OUT"
  # A copy of the binary, so that rebuilding while the comparison runs cannot change it halfway.
  cp target/release/mtl "$OUT/mtl"
fi
NAMES=()
while IFS='|' read -r name config select sets; do
  [ -z "$name" ] && continue
  NAMES+=("$name")
  if [ -n "${TABLE_ONLY:-}" ]; then continue; fi
  if [ $# -gt 0 ] && [[ ! " $* " == *" $name "* ]]; then continue; fi
  if [ -f "$OUT/$name/metrics.json" ]; then continue; fi
  rm -rf "$OUT/$name"
  args=()
  for s in $sets; do args+=(--set "$s"); done
  echo "== $name ($(date -u +%H:%M:%S))" >&2
  MTL_LOG=info /usr/bin/time -f "%M" -o "$OUT/$name.maxrss" "$OUT/mtl" train "$config" --out "$OUT/$name" --select "$select" "${args[@]}" \
    > "$OUT/$name.log" 2>&1
done <<< "$VARIANTS"
# The exports of the LoRA and AdaLoRA runs, checked against transformers and peft in the bench environment.
if [ -z "${TABLE_ONLY:-}" ]; then
  bash scripts/bench-env.sh
  for name in lora-shared lora-per-task adalora-per-task adalora-per-task-lr3e-3 adalora-per-task-r7; do
    if [ -f "$OUT/$name/metrics.json" ] && [ ! -d "$OUT/$name-hf" ]; then
      "$OUT/mtl" export --model "$OUT/$name" --out "$OUT/$name-hf"
      .venv/bin/python tests/python/check_export.py "$OUT/mtl" "$OUT/$name" "$OUT/$name-hf" | tee "$OUT/$name-export.txt"
    fi
  done
fi
python3 - "$OUT" "${NAMES[@]}" <<'PY'
import json, re, sys, pathlib
out, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
tasks = ["polarity", "trec", "wnut", "pos", "intensity"]
main = {"polarity": "accuracy", "trec": "accuracy", "wnut": "f1", "pos": "accuracy", "intensity": "pearson"}
single = {}
for t in tasks:
    f = pathlib.Path("runs/five-task-bench") / t / "metrics.json"
    if f.exists():
        single[t] = json.loads(f.read_text())["test"][t][main[t]]
rows = ["| variant | trained params | saved weights | peak RSS | s / step | " + " | ".join(tasks) + " | mean | vs full |",
        "|---" * (len(tasks) + 7) + "|"]
if len(single) == len(tasks):
    rows.append("| single-task (five runs) | | | | | " + " | ".join(f"{single[t]:.4f}" for t in tasks)
                + f" | {sum(single.values()) / len(tasks):.4f} | |")
full_mean = None
for name in names:
    f = out / name / "metrics.json"
    if not f.exists():
        continue
    m = json.loads(f.read_text())
    scores = [m["test"][t][main[t]] for t in tasks]
    mean = sum(scores) / len(scores)
    full_mean = mean if name == "full" else full_mean
    log = re.sub(r"\x1b\[[0-9;]*m", "", (out / f"{name}.log").read_text())
    trained = re.search(r"trained\W+(\d+)", log)
    params = re.search(r"params\W+(\d+)", log)
    weights = sum(p.stat().st_size for p in (out / name).glob("*.safetensors"))
    rss = (out / f"{name}.maxrss").read_text().split()[-1] if (out / f"{name}.maxrss").exists() else "?"
    per_step = m["train_seconds"] / m["steps"]
    share = f"{int(trained.group(1)):,} ({int(trained.group(1)) / int(params.group(1)):.1%})" if trained and params else "?"
    delta = f"{mean - full_mean:+.4f}" if full_mean is not None else ""
    rows.append(f"| {name} | {share} | {weights / 1e6:.1f} MB | {int(rss) / 1024:.0f} MiB | {per_step:.3f} | "
                + " | ".join(f"{s:.4f}" for s in scores) + f" | {mean:.4f} | {delta} |")
table = "\n".join(rows) + "\n"
(out / "table.md").write_text(table)
print(table)
PY
