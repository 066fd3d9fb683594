#!/usr/bin/env bash
# Load, disconnects and soak for `mtl serve` on a decoder (issue 23), from a separate process on loopback (the
# client is mtl-llm-load, streamed OpenAI completions):
#   1. 100 clients that leave mid-stream (after 3 pieces of text), 16 at a time: the server must cancel their
#      generations, and the KV blocks in use must come back to 0 (read from /metrics);
#   2. an overload burst: 64 streams at once against --queue-bound 16: 429s are allowed, 5xx are not;
#   3. a soak: 16 streams, closed loop, SOAK_S seconds (300), the server's resident memory sampled every
#      10 s: it must stay flat (the last minute's samples within 5% of the first minute's).
# Usage: scripts/llm-load-test.sh [OUT_DIR] (env: MODEL, SOAK_S). Prints each phase's report and a verdict;
# exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/llm-load-test}
MODEL=${MODEL:-assets/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
SOAK_S=${SOAK_S:-300}
scripts/fetch.sh > /dev/null
# curl asks the server for /health and /metrics.
if ! command -v curl > /dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q curl > /dev/null
fi
cargo build --release -q -p mtl-cli -p mtl-bench
mkdir -p "$OUT"
python3 - "$OUT/prompts.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("assets/data/atis/test.jsonl", encoding="utf-8")][:256]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps({"prompt": "Request: " + " ".join(r["words"]) + "\nIntent:"}) + "\n")
PY
URL=http://127.0.0.1:18090
target/release/mtl serve "$MODEL" --addr 127.0.0.1:18090 --max-sequences 16 --queue-bound 16 --timeout-s 120 \
  2> "$OUT/server.log" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2> /dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "$URL/health" > /dev/null 2>&1 && break; sleep 0.2; done
metric() { curl -s "$URL/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$SERVER/status"; }
load() { target/release/mtl-llm-load --url "$URL" --prompts "$OUT/prompts.jsonl" --max-tokens 64 "$@"; }
fail=0

# 1. Clients that leave mid-stream.
load --label disconnects --concurrency 16 --count 100 --drop-after 3 | tee "$OUT/disconnects.json"
for _ in $(seq 100); do [ "$(metric mtl_kv_blocks_used)" = 0 ] && [ "$(metric mtl_running_sequences)" = 0 ] && break; sleep 0.1; done
used=$(metric mtl_kv_blocks_used)
echo "after 100 disconnects: KV blocks in use $used of $(metric mtl_kv_blocks_total), running $(metric mtl_running_sequences)"
[ "$used" = 0 ] || { echo "FAIL: blocks did not come back"; fail=1; }

# 2. Overload over the queue bound.
load --label overload --concurrency 64 --count 128 | tee "$OUT/overload.json"
python3 - "$OUT/overload.json" <<'PY' || fail=1
import json, sys
r = json.load(open(sys.argv[1]))
bad = {s: n for s, n in r["statuses"].items() if s.startswith("5") or s == "0"}
print(f"overload: statuses {r['statuses']}")
if bad:
    print(f"FAIL: {bad}"); sys.exit(1)
PY

# 3. Soak.
load --label soak --concurrency 16 --count 100000000 --duration-s "$SOAK_S" > "$OUT/soak.json" &
LOADER=$!
: > "$OUT/rss.txt"
while kill -0 "$LOADER" 2> /dev/null; do echo "$(date +%s) $(rss)" >> "$OUT/rss.txt"; sleep 10; done
wait "$LOADER"
cat "$OUT/soak.json"
python3 - "$OUT/soak.json" "$OUT/rss.txt" <<'PY' || fail=1
import json, sys
r = json.load(open(sys.argv[1]))
samples = [int(l.split()[1]) for l in open(sys.argv[2]) if len(l.split()) == 2]
first, last = samples[:6], samples[-6:]
a, b = sum(first) / len(first), sum(last) / len(last)
bad = {s: n for s, n in r["statuses"].items() if s != "200"}
print(f"soak: {r['requests']} requests, {r['tokens_per_s']:.1f} tokens/s, statuses {r['statuses']}; "
      f"RSS first minute {a / 1024:.0f} MiB, last minute {b / 1024:.0f} MiB ({(b - a) / a * 100:+.1f}%), "
      f"peak {max(samples) / 1024:.0f} MiB over {len(samples)} samples")
ok = not bad and abs(b - a) / a <= 0.05
if not ok:
    print("FAIL: errors in the soak or RSS not flat"); sys.exit(1)
PY
echo "5xx and errors by kind: $(curl -s "$URL/metrics" | grep -E '^mtl_errors_total' | tr '\n' ' ')"
[ "$fail" = 0 ] && echo "llm-load-test: ok" || { echo "llm-load-test: FAILED"; exit 1; }
