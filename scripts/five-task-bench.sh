#!/usr/bin/env bash
# The five-task benchmark (BENCHMARKS.md): each task trained alone with the recipe of
# examples/five-task/config.toml, then all five jointly, one run after the other on this machine; prints a
# Markdown table of test scores, parameters and training wall time, and writes it to $OUT/table.md.
# Usage: scripts/five-task-bench.sh [OUT_DIR]   (default runs/five-task-bench; fetches data if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/five-task-bench}
CONFIG=examples/five-task/config.toml
TASKS="polarity trec wnut pos intensity"
bash scripts/fetch.sh
cargo build --release --quiet -p mtl-cli
MTL=target/release/mtl
mkdir -p "$OUT"
for t in $TASKS joint; do
  if [ -f "$OUT/$t/metrics.json" ]; then continue; fi
  rm -rf "$OUT/$t"
  echo "== $t ($(date -u +%H:%M:%S))" >&2
  # Equal loss weights, as the comparison of BENCHMARKS.md was made (the example now weighs intensity ×2).
  if [ "$t" = joint ]; then
    MTL_LOG=info "$MTL" train "$CONFIG" --out "$OUT/$t" --set 'training.weighting.weights={}' > "$OUT/$t.log" 2>&1
  else
    MTL_LOG=info "$MTL" train "$CONFIG" --tasks "$t" --out "$OUT/$t" --set 'training.weighting.weights={}' > "$OUT/$t.log" 2>&1
  fi
done
python3 - "$OUT" $TASKS <<'PY'
import json, re, sys, pathlib
out, tasks = pathlib.Path(sys.argv[1]), sys.argv[2:]
main = {"polarity": "accuracy", "trec": "accuracy", "wnut": "f1", "pos": "accuracy", "intensity": "pearson"}
def params(run):
    text = re.sub(r"\x1b\[[0-9;]*m", "", (out / f"{run}.log").read_text())
    m = re.search(r"params=(\d+)", text)
    return int(m.group(1))
single = {t: json.loads((out / t / "metrics.json").read_text()) for t in tasks}
joint = json.loads((out / "joint" / "metrics.json").read_text())
rows = ["| task (test metric) | single-task | joint | Δ |", "|---|---|---|---|"]
s_scores, j_scores = [], []
for t in tasks:
    s, j = single[t]["test"][t][main[t]], joint["test"][t][main[t]]
    s_scores.append(s); j_scores.append(j)
    rows.append(f"| {t} ({main[t]}) | {s:.4f} | {j:.4f} | {j - s:+.4f} |")
sm, jm = sum(s_scores) / len(s_scores), sum(j_scores) / len(j_scores)
rows.append(f"| **mean** | **{sm:.4f}** | **{jm:.4f}** | **{jm - sm:+.4f}** |")
sp = sum(params(t) for t in tasks)
rows.append(f"| parameters | {sp:,} (5 models) | {params('joint'):,} (1 model) | |")
st = sum(single[t]["train_seconds"] for t in tasks)
rows.append(f"| training wall time | {st:.0f} s (sum of 5 runs) | {joint['train_seconds']:.0f} s | ×{joint['train_seconds'] / st:.2f} |")
rows.append(f"| best epoch | {', '.join(str(single[t]['best_epoch']) for t in tasks)} | {joint['best_epoch']} | |")
table = "\n".join(rows) + "\n"
(out / "table.md").write_text(table)
print(table)
PY
