#!/usr/bin/env bash
# Fuzzes the server's request parsing and checking (fuzz/fuzz_targets/request.rs) with cargo fuzz (libFuzzer,
# nightly Rust): scripts/fuzz.sh [SECONDS]. The test command runs it for 60 s; before a release, run it for an
# hour: scripts/fuzz.sh 3600. Seeds are in fuzz/seeds/request; what it finds grows fuzz/corpus/request
# (ignored by git), and a failing input lands in fuzz/artifacts/request/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_TO_RUN=${1:-60}
if ! cargo +nightly --version > /dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
mkdir -p corpus/request
cargo +nightly fuzz run request corpus/request seeds/request -- -max_total_time="$SECONDS_TO_RUN" -max_len=4096
