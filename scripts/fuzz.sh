#!/usr/bin/env bash
# Fuzzes the server's request parsing and checking with cargo fuzz (libFuzzer, nightly Rust, or stable without
# AddressSanitizer where no nightly can be installed), each target for SECONDS: `request` (the predict routes,
# fuzz/fuzz_targets/request.rs) and `generation` (/v1/generate and the OpenAI-compatible routes).
# scripts/fuzz.sh [SECONDS]. The test command runs it for 60 s a target; before a release, an hour:
# scripts/fuzz.sh 3600. Seeds are in fuzz/seeds/TARGET; what it finds grows fuzz/corpus/TARGET (ignored by
# git), and a failing input lands in fuzz/artifacts/TARGET/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_TO_RUN=${1:-60}
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
for target in request generation; do
  mkdir -p "corpus/$target"
  if cargo +nightly --version > /dev/null 2>&1 || rustup toolchain install nightly --profile minimal > /dev/null 2>&1; then
    cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$SECONDS_TO_RUN" -max_len=4096
  else
    # No nightly toolchain and none to download (only the package registries reachable): libFuzzer on the
    # stable compiler, which takes cargo fuzz's -Z flags with RUSTC_BOOTSTRAP, without AddressSanitizer (the
    # targets are safe Rust; panics and failed assertions are still caught).
    echo "no nightly toolchain: fuzzing on stable without AddressSanitizer" >&2
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --target-dir target/stable "$target" "corpus/$target" \
      "seeds/$target" -- -max_total_time="$SECONDS_TO_RUN" -max_len=4096
  fi
done
