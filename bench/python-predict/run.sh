#!/usr/bin/env bash
# The Python package's overhead: `run.predict` of 1,000 ATIS sentences (test, then dev) against
# `mtl predict` of the same sentences, alternating, ROUNDS times each in one run; prints the medians and the
# ratio. Python's time is `mtl.Run.open` + `run.predict` (records parsed into dicts) inside the interpreter;
# the binary's is the whole process (it opens the run too), its JSON lines written to /dev/null. The Python
# process's whole time (interpreter start and import included) is printed too.
# Usage: bench/python-predict/run.sh [RUN_DIR] [ROUNDS]   (default runs/atis-facade, a trained ATIS run, and 5)
# The package is installed into bench/python-predict/.venv (ignored) with `pip install .`.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/atis-facade}
ROUNDS=${2:-5}
[ -f "$RUN/run.json" ] || { echo "$RUN: not a run; train one: mtl train examples/atis/config.toml --out $RUN" >&2; exit 1; }
cargo build --release --quiet -p mtl-cli
venv=bench/python-predict/.venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check .
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/inputs.txt" <<'PY'
import json, sys
texts = []
for split in ("test", "dev"):
    with open(f"assets/data/atis/{split}.jsonl") as f:
        texts += [json.loads(line)["text"] for line in f]
with open(sys.argv[1], "w") as f:
    f.write("".join(t + "\n" for t in texts[:1000]))
PY
for i in $(seq "$ROUNDS"); do
  start=$(date +%s.%N)
  target/release/mtl predict --model "$RUN" --input "$work/inputs.txt" > /dev/null 2>&1
  end=$(date +%s.%N)
  echo "cli $(echo "$end - $start" | bc)" >> "$work/times"
  start=$(date +%s.%N)
  "$venv/bin/python" - "$RUN" "$work/inputs.txt" >> "$work/times" <<'PY'
import sys, time
import mtl
texts = open(sys.argv[2]).read().splitlines()
start = time.perf_counter()
run = mtl.Run.open(sys.argv[1])
records = run.predict(texts)
total = time.perf_counter() - start
assert len(records) == len(texts)
print(f"python {total:.4f}")
PY
  end=$(date +%s.%N)
  echo "python-process $(echo "$end - $start" | bc)" >> "$work/times"
done
python3 - "$work/times" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    name, t = line.split()
    times.setdefault(name, []).append(float(t))
cli, py = statistics.median(times["cli"]), statistics.median(times["python"])
print(f"mtl predict (process): median {cli:.3f} s of {times['cli']}")
print(f"Run.open + run.predict: median {py:.3f} s of {times['python']}")
proc = statistics.median(times["python-process"])
print(f"python process (interpreter, import, open, predict): median {proc:.3f} s")
print(f"python / cli: {py / cli:.3f} (whole processes: {proc / cli:.3f})")
PY
