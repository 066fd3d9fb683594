#!/usr/bin/env bash
# The serving load test of BENCHMARKS.md, from separate processes on loopback (`mtl serve` and our client
# `mtl-load`, crates/mtl-bench/src/load.rs), on a trained five-task model:
#   1. correctness: closed loop at concurrency 4, mixed-task requests; every answer must hold what
#      `mtl predict` prints for the same input (numbers within 1e-4: batches of other shapes may round the 4th
#      decimal differently), no error.
#   2. overload: a server with --queue-bound 4 under 32 connections: 429s, no 5xx, no dropped connection,
#      every 200 still right.
#   3. soak: SOAK_S seconds (default 300) of open-loop traffic at half the rate measured in 1, with the
#      server's resident memory sampled every second.
# Usage: scripts/load-test.sh [MODEL_DIR] [OUT_DIR]; prints a JSON report per phase and exits non-zero when a
# check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-runs/strategies/intensity-x2}
OUT=${2:-runs/load-test}
SOAK_S=${SOAK_S:-300}
cargo build --release --quiet -p mtl-cli -p mtl-bench
mkdir -p "$OUT"
MTL=target/release/mtl
LOAD=target/release/mtl-load

# 200 inputs from the five-task test files, and what `mtl predict` answers for each.
python3 - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
texts = [json.loads(l)["text"] for l in open("assets/data/five-task/intensity/test.jsonl")][:80]
texts += [r["question"] for r in csv.DictReader(open("assets/data/five-task/trec/test.tsv"), delimiter="\t")][:60]
texts += [r["text"] for r in csv.DictReader(open("assets/data/five-task/polarity/test.csv"))][:60]
with open(f"{out}/inputs.txt", "w") as f:
    f.write("\n".join(t.replace("\n", " ") for t in texts) + "\n")
PY
"$MTL" predict --model "$MODEL" --input "$OUT/inputs.txt" > "$OUT/predict.jsonl"
python3 - "$OUT" <<'PY'
import json, random, sys
out = sys.argv[1]
inputs = open(f"{out}/inputs.txt").read().splitlines()
answers = [json.loads(l)["predictions"] for l in open(f"{out}/predict.jsonl")]
tasks = sorted(answers[0])
rng = random.Random(0)
with open(f"{out}/requests.jsonl", "w") as f:
    for i in range(400):
        picks = rng.sample(range(len(inputs)), rng.randint(1, 4))
        if rng.random() < 0.5:
            wanted = rng.sample(tasks, rng.randint(1, len(tasks)))
            body = {"inputs": [inputs[p] for p in picks], "tasks": wanted}
            path = "/v1/predict"
        else:
            wanted = [rng.choice(tasks)]
            body = {"inputs": [inputs[p] for p in picks]}
            path = f"/v1/tasks/{wanted[0]}/predict"
        expect = [{t: answers[p][t] for t in wanted} for p in picks]
        f.write(json.dumps({"path": path, "body": body, "expect": expect}) + "\n")
PY

# shellcheck source=scripts/serve-lib.sh
source scripts/serve-lib.sh
check() { # report.json python-condition message
  python3 -c "import json,sys; r=json.load(open('$1')); sys.exit(0 if ($2) else 1)" || { echo "FAILED: $3 ($1)" >&2; exit 1; }
}

start_server "$OUT/server.log" "$MODEL"
"$LOAD" --addr "$ADDR" --requests "$OUT/requests.jsonl" --concurrency 4 --count 1200 > "$OUT/1-correctness.json"
cat "$OUT/1-correctness.json"
check "$OUT/1-correctness.json" "r['statuses'] == {'200': 1200} and r['transport_errors'] == 0 and r['checked']['agree'] == 1200" \
  "every request answered 200 and agreeing with mtl predict"
stop_server

start_server "$OUT/server.log" "$MODEL" --queue-bound 4 --max-wait-ms 20
"$LOAD" --addr "$ADDR" --requests "$OUT/requests.jsonl" --concurrency 32 --count 1500 > "$OUT/2-overload.json"
cat "$OUT/2-overload.json"
check "$OUT/2-overload.json" "r['statuses'].get('429', 0) > 0 and r['server_errors'] == 0 and r['transport_errors'] == 0 \
  and r['answered'] == 1500 and r['checked']['agree'] == r['statuses'].get('200', 0)" \
  "over the queue bound: 429s, no 5xx, every request answered, every 200 right"
stop_server

start_server "$OUT/server.log" "$MODEL"
RATE=$(python3 -c "import json; print(round(json.load(open('$OUT/1-correctness.json'))['ok_per_second'] / 2, 1))")
"$LOAD" --addr "$ADDR" --requests "$OUT/requests.jsonl" --concurrency 8 --rate "$RATE" --duration-s "$SOAK_S" \
  --watch-pid "$SERVER" > "$OUT/3-soak.json"
python3 - "$OUT/3-soak.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss = r["rss_kib"]
first = [k for s, k in rss if 50 <= s <= 70] or [rss[0][1]]
last = [k for s, k in rss if s >= rss[-1][0] - 20]
summary = {k: r[k] for k in ("offered_rate", "seconds", "answered", "statuses", "server_errors", "transport_errors", "latency_ms")}
summary["agree"] = r["checked"]["agree"]
summary["rss_mib_at_1_min"] = max(first) / 1024
summary["rss_mib_last_20_s"] = max(last) / 1024
summary["rss_mib_max"] = max(k for _, k in rss) / 1024
print(json.dumps(summary))
ok = r["server_errors"] == 0 and r["transport_errors"] == 0 and max(last) <= 1.05 * max(first) and r["checked"]["agree"] == r["statuses"].get("200", 0)
sys.exit(0 if ok else 1)
PY
echo "load test passed; reports in $OUT" >&2
