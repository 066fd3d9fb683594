#!/usr/bin/env bash
# Fuzzes the server's request parsing and checking (fuzz/fuzz_targets/request.rs) with cargo fuzz (libFuzzer,
# nightly Rust, or stable without AddressSanitizer where no nightly can be installed): scripts/fuzz.sh
# [SECONDS]. The test command runs it for 60 s; before a release, run it for an hour: scripts/fuzz.sh 3600.
# Seeds are in fuzz/seeds/request; what it finds grows fuzz/corpus/request (ignored by git), and a failing
# input lands in fuzz/artifacts/request/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_TO_RUN=${1:-60}
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
mkdir -p corpus/request
if cargo +nightly --version > /dev/null 2>&1 || rustup toolchain install nightly --profile minimal > /dev/null 2>&1; then
  cargo +nightly fuzz run request corpus/request seeds/request -- -max_total_time="$SECONDS_TO_RUN" -max_len=4096
else
  # No nightly toolchain and none to download (only the package registries reachable): libFuzzer on the
  # stable compiler, which takes cargo fuzz's -Z flags with RUSTC_BOOTSTRAP, without AddressSanitizer (the
  # target is safe Rust; panics and failed assertions are still caught).
  echo "no nightly toolchain: fuzzing on stable without AddressSanitizer" >&2
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --target-dir target/stable request corpus/request seeds/request \
    -- -max_total_time="$SECONDS_TO_RUN" -max_len=4096
fi
