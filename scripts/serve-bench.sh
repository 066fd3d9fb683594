#!/usr/bin/env bash
# The serving benchmark of BENCHMARKS.md, all in one run on this machine (servers and client are separate
# processes on loopback; the client is mtl-load):
#   - one five-task server (MULTI) against five single-task servers of ours (SINGLES/TASK, the single-task
#     baselines of scripts/five-task-bench.sh), and against its int8 model (INT8, from `mtl quantize`);
#   - throughput, closed loop at CONC connections for DURATION s each: mixed-task traffic (each request one
#     input for one task, tasks at random) and, on the five-task server, single-task traffic (polarity only);
#     and "every task" requests (one input, all five tasks: one request to the five-task server, five to the
#     single-task ones);
#   - latency p50/p99 at a fixed offered load (open loop, half the five-task server's mixed throughput);
#   - resident memory of every server at the end (current and peak).
# Usage: scripts/serve-bench.sh [OUT_DIR]; writes OUT_DIR/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/serve-bench}
MULTI=${MULTI:-runs/strategies/intensity-x2}
SINGLES=${SINGLES:-runs/five-task-bench}
INT8=${INT8:-runs/deploy/five-task-int8}
DURATION=${DURATION:-40}
CONC=${CONC:-8}
TASKS="polarity trec wnut pos intensity"
cargo build --release --quiet -p mtl-cli -p mtl-bench
[ -d "$INT8" ] || target/release/mtl quantize --model "$MULTI" --out "$INT8" > /dev/null
mkdir -p "$OUT"
MTL=target/release/mtl
LOAD=target/release/mtl-load

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; }
trap cleanup EXIT
declare -A ADDR PID
start() { # name model
  "$MTL" serve "$2" --addr 127.0.0.1:0 2> "$OUT/server-$1.log" &
  PID[$1]=$!
  PIDS+=($!)
  for _ in $(seq 900); do
    local a
    a=$(sed -n 's/.*serving on http:\/\/\([0-9.:]*\).*/\1/p' "$OUT/server-$1.log" | head -1)
    if [ -n "$a" ]; then ADDR[$1]=$a; return 0; fi
    sleep 0.1
  done
  echo "server $1 did not start" >&2; cat "$OUT/server-$1.log" >&2; exit 1
}
start multi "$MULTI"
start int8 "$INT8"
for t in $TASKS; do start "$t" "$SINGLES/$t"; done

python3 - "$OUT" "${ADDR[multi]}" "${ADDR[int8]}" $(for t in $TASKS; do echo "$t=${ADDR[$t]}"; done) <<'PY'
import csv, json, random, sys
out, multi, int8, *singles = sys.argv[1:]
singles = dict(s.split("=") for s in singles)
tasks = list(singles)
texts = [json.loads(l)["text"] for l in open("assets/data/five-task/intensity/test.jsonl")][:100]
texts += [r["question"] for r in csv.DictReader(open("assets/data/five-task/trec/test.tsv"), delimiter="\t")][:100]
texts += [r["text"] for r in csv.DictReader(open("assets/data/five-task/polarity/test.csv"))][:100]
rng = random.Random(0)
def write(name, rows):
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
mixed = [(rng.choice(texts), rng.choice(tasks)) for _ in range(2000)]
one = lambda addr, text, task: {"addr": addr, "path": f"/v1/tasks/{task}/predict", "body": {"inputs": [text]}}
write("mixed-multi", [one(multi, x, t) for x, t in mixed])
write("mixed-int8", [one(int8, x, t) for x, t in mixed])
write("mixed-singles", [one(singles[t], x, t) for x, t in mixed])
write("polarity-multi", [one(multi, x, "polarity") for x, _ in mixed])
every = [rng.choice(texts) for _ in range(500)]
write("every-multi", [{"addr": multi, "path": "/v1/predict", "body": {"inputs": [x]}} for x in every])
write("every-singles", [one(singles[t], x, t) for x in every for t in tasks])
PY

run() { # report-name requests extra-flags...
  local name=$1 requests=$2
  shift 2
  "$LOAD" --addr "${ADDR[multi]}" --requests "$OUT/$requests.jsonl" --duration-s "$DURATION" "$@" > "$OUT/$name.json"
  echo "$name: $(python3 -c "import json; r=json.load(open('$OUT/$name.json')); print(r['statuses'], round(r['ok_per_second'], 1), 'ok/s', r['latency_ms'])")" >&2
}
# Warm every server up (first batches allocate).
for r in mixed-multi mixed-int8 mixed-singles; do "$LOAD" --addr "${ADDR[multi]}" --requests "$OUT/$r.jsonl" --count 100 --concurrency 4 > /dev/null; done
run closed-mixed-multi mixed-multi --concurrency "$CONC"
run closed-mixed-singles mixed-singles --concurrency "$CONC"
run closed-polarity-multi polarity-multi --concurrency "$CONC"
run closed-mixed-int8 mixed-int8 --concurrency "$CONC"
run closed-every-multi every-multi --concurrency "$CONC"
run closed-every-singles every-singles --concurrency "$CONC"
RATE=$(python3 -c "import json; print(round(json.load(open('$OUT/closed-mixed-multi.json'))['ok_per_second'] / 2, 1))")
run open-mixed-multi mixed-multi --concurrency 16 --rate "$RATE"
run open-mixed-singles mixed-singles --concurrency 16 --rate "$RATE"
run open-mixed-int8 mixed-int8 --concurrency 16 --rate "$RATE"
for name in multi int8 $TASKS; do
  grep -E "VmRSS|VmHWM" "/proc/${PID[$name]}/status" | awk -v n="$name" '{print n, $1, $2}'
done > "$OUT/memory.txt"

python3 - "$OUT" "$TASKS" <<'PY'
import json, sys
out, tasks = sys.argv[1], sys.argv[2].split()
r = lambda n: json.load(open(f"{out}/{n}.json"))
mem = {}
for line in open(f"{out}/memory.txt"):
    name, key, kib = line.split()
    mem.setdefault(name, {})[key.rstrip(":")] = int(kib) / 1024
singles_rss = sum(mem[t]["VmRSS"] for t in tasks)
one_single = max(mem[t]["VmRSS"] for t in tasks)
rows = ["| setting | answered 200 / other | throughput (req/s) | p50 ms | p99 ms |", "|---|---|---|---|---|"]
for n, label in [("closed-mixed-multi", "five-task server, mixed-task traffic, closed loop"),
                 ("closed-mixed-singles", "five single-task servers, same traffic"),
                 ("closed-polarity-multi", "five-task server, single-task traffic (polarity)"),
                 ("closed-mixed-int8", "five-task int8 server, mixed-task traffic"),
                 ("closed-every-multi", "five-task server, every task per request (1 request)"),
                 ("closed-every-singles", "five single-task servers, every task (5 requests)"),
                 ("open-mixed-multi", "five-task server, offered load fixed"),
                 ("open-mixed-singles", "five single-task servers, offered load fixed"),
                 ("open-mixed-int8", "five-task int8 server, offered load fixed")]:
    x = r(n)
    ok = x["statuses"].get("200", 0)
    other = x["answered"] - ok + x["transport_errors"]
    rate = f" at {x['offered_rate']} req/s offered" if x["offered_rate"] else f", {x['concurrency']} connections"
    rows.append(f"| {label}{rate} | {ok} / {other} | {x['ok_per_second']:.1f} | {x['latency_ms']['p50']:.0f} | {x['latency_ms']['p99']:.0f} |")
ratios = {
    "mixed / single-task traffic (five-task server)": r("closed-mixed-multi")["ok_per_second"] / r("closed-polarity-multi")["ok_per_second"],
    "five-task server / five single-task servers, mixed traffic": r("closed-mixed-multi")["ok_per_second"] / r("closed-mixed-singles")["ok_per_second"],
    "every-task inputs per second, five-task server / five single-task servers":
        r("closed-every-multi")["ok_per_second"] / (r("closed-every-singles")["ok_per_second"] / 5),
    "int8 / f32 throughput (mixed)": r("closed-mixed-int8")["ok_per_second"] / r("closed-mixed-multi")["ok_per_second"],
}
rows.append("")
rows.append("| memory (resident, MiB, at the end) | current | peak |")
rows.append("|---|---|---|")
for name in ["multi", "int8"] + tasks:
    rows.append(f"| {name} server | {mem[name]['VmRSS']:.0f} | {mem[name]['VmHWM']:.0f} |")
rows.append(f"| five single-task servers together | {singles_rss:.0f} | {sum(mem[t]['VmHWM'] for t in tasks):.0f} |")
rows.append("")
for k, v in ratios.items():
    rows.append(f"- {k}: ×{v:.2f}")
rows.append(f"- five-task server / one single-task server, resident memory: ×{mem['multi']['VmRSS'] / one_single:.2f}")
rows.append(f"- five-task server / five single-task servers, resident memory: ×{mem['multi']['VmRSS'] / singles_rss:.2f}")
rows.append(f"- int8 / f32 five-task server, resident memory: ×{mem['int8']['VmRSS'] / mem['multi']['VmRSS']:.2f}")
table = "\n".join(rows) + "\n"
open(f"{out}/table.md", "w").write(table)
print(table)
PY
