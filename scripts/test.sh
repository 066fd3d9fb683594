#!/usr/bin/env bash
# The full test suite: fetches the default model (for the tests that check it against transformers), runs
# every test of the workspace in release mode (candle is far too slow unoptimised), then reads the
# TensorBoard files of a small training run back with TensorBoard's own reader (tests/python/, in the
# ignored virtual environment .venv-test).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo test --release --workspace "$@"

stamp=.venv-test/requirements.sha256
want=$(sha256sum tests/python/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv-test/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! python3 -m venv .venv-test 2>/dev/null; then
    # Debian splits venv out of the interpreter.
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y -q python3-venv > /dev/null
    python3 -m venv .venv-test
  fi
  .venv-test/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  echo "$want" > "$stamp"
fi
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
target/release/mtl train tests/python/tiny-run.toml --out "$run/mixed" \
  --set training.diagnostics_every=2 > /dev/null 2>&1 || { echo "the tiny training run failed"; exit 1; }
.venv-test/bin/python tests/python/check_tensorboard.py "$run/mixed"
target/release/mtl train tests/python/tiny-run.toml --out "$run/sampled" --set 'training.sampling.plan="sampled"' \
  --set 'training.sampling.sampler="annealed"' > /dev/null 2>&1 || { echo "the tiny training run failed"; exit 1; }
.venv-test/bin/python tests/python/check_tensorboard.py "$run/sampled"
