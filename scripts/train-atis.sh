#!/usr/bin/env bash
# The main job: fetches the default model and ATIS if missing, builds mtl, trains examples/atis (joint intent
# detection and slot filling) and prints the per-task report. The checkpoint and metrics.json go to
# runs/atis-DATE (or to the directory given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo build --release -q -p mtl-cli
out=${1:-runs/atis-$(date +%Y%m%d-%H%M%S)}
./target/release/mtl train examples/atis/config.toml --out "$out"
echo "metrics: $out/metrics.json"
