#!/usr/bin/env bash
# The screenshot of `mtl explain`'s HTML page in docs/explain.png: a trained five-task run (MiniLM,
# examples/five-task; runs/five-f32 by default) explains two inputs, and headless Chromium (Debian's package,
# installed here when missing) renders the page.
#
#   scripts/explain-page.sh [RUN] [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/five-f32}
png=${2:-docs/explain.png}
if ! command -v chromium >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium fonts-dejavu-core
fi
[ -x target/release/mtl ] || cargo build --release -p mtl-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/inputs.txt" <<'INPUTS'
I absolutely love the new Star Wars trailer , cannot wait for December !
What is the capital of Australia ?
INPUTS
target/release/mtl explain --model "$run" --input "$work/inputs.txt" --tasks intensity,polarity,trec,wnut \
  --html "$work/explain.html" > "$work/explain.jsonl"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1000 \
  --screenshot="$png" "file://$work/explain.html" 2>/dev/null
echo "wrote $png"
