#!/usr/bin/env bash
# The full test suite: fetches the default model (for the tests that check it against transformers), then
# runs every test of the workspace in release mode (candle is far too slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo test --release --workspace "$@"
