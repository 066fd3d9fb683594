#!/usr/bin/env bash
# The full test suite: checks formatting (rustfmt.toml) and lints (clippy, warnings are errors), fetches the
# default model (for the tests that check it against transformers), runs
# every test of the workspace in release mode (candle is far too slow unoptimised), then reads the
# TensorBoard files of a small training run back with TensorBoard's own reader, installs the Python package into
# a fresh virtual environment and runs its tests, and talks to `mtl serve` with OpenAI's client (tests/python/,
# in the ignored virtual environment .venv-test).
set -euo pipefail
cd "$(dirname "$0")/.."
# The gates: rustup installs the two components where the toolchain lacks them.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version > /dev/null 2>&1; then rustup component add "$component"; fi
done
cargo fmt --all -- --check || { echo "cargo fmt: the code above is not formatted; run cargo fmt --all"; exit 1; }
cargo clippy --workspace --all-targets --release --quiet -- -D warnings || { echo "clippy: fix the warnings above"; exit 1; }
python3 scripts/check-imports.py || { echo "import circles between modules (above): move what both use to the left"; exit 1; }
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

# The Python package (pyproject.toml): `pip install .` into a fresh virtual environment, then its tests
# (tests/python/test_package.py: training through Python, predictions equal to the command line's, Ctrl-C).
python3 -m venv "$run/package-venv"
"$run/package-venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/package-requirements.txt
"$run/package-venv/bin/pip" install --quiet --disable-pip-version-check . || { echo "pip install . failed"; exit 1; }
MTL_BINARY=target/release/mtl "$run/package-venv/bin/python" -m pytest -q -p no:cacheprovider tests/python/test_package.py \
  || { echo "the Python package's tests failed"; exit 1; }

# `mtl serve`'s OpenAI-compatible routes through OpenAI's own client (tests/python/check_openai.py), on the default
# decoder: the greedy chat answer must be `mtl generate --chat`'s.
model=assets/models/SmolLM2-135M-Instruct
prompt="What is the capital of France?"
target/release/mtl generate --model "$model" --chat --prompt "$prompt" --max-new-tokens 24 > "$run/answer.txt" 2> /dev/null
target/release/mtl serve "$model" --addr 127.0.0.1:0 --kv-cache-mb 256 2> "$run/serve.log" &
server=$!
trap 'kill "$server" 2> /dev/null || true; rm -rf "$run"' EXIT
addr=""
for _ in $(seq 600); do
  addr=$(sed -n 's/.*serving on http:\/\/\([0-9.:]*\).*/\1/p' "$run/serve.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$run/serve.log"; echo "mtl serve did not start"; exit 1; }
.venv-test/bin/python tests/python/check_openai.py "$addr" SmolLM2-135M-Instruct.Q4_1 "$run/answer.txt" \
  || { tail -20 "$run/serve.log"; echo "the OpenAI client check failed"; exit 1; }
kill "$server"

# `mtl export` against transformers (tests/python/check_export.py), when the bench environment (.venv, made by
# scripts/bench-env.sh: torch, transformers, peft) is there: a full fine-tune, shared LoRA, per-task LoRA and
# per-task AdaLoRA (12 steps, its pattern fixed for the last 3, so that PEFT's loader resizes pruned layers).
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, transformers" 2> /dev/null; then
  for variant in "full|" "lora|--set peft.method=\"lora\"" "per-task-lora|--set peft.method=\"lora\" --set peft.per_task=true" \
      "per-task-adalora|--set peft.method=\"adalora\" --set peft.per_task=true --set peft.adalora.tfinal=3 --set training.epochs=6"; do
    name=${variant%%|*}
    eval "sets=(${variant#*|})"
    target/release/mtl train tests/python/tiny-run.toml --out "$run/export-$name" --set training.epochs=2 "${sets[@]}" \
      > /dev/null 2>&1 || { echo "the tiny $name training run failed"; exit 1; }
    target/release/mtl export --model "$run/export-$name" --out "$run/hf-$name" > /dev/null
    echo "export check, $name:"
    .venv/bin/python tests/python/check_export.py target/release/mtl "$run/export-$name" "$run/hf-$name"
  done
  # The other encoder families, each exported under its own names and heads (tests/fixtures/tiny-*): a full
  # fine-tune of each, and per-task LoRA on the query, key and value projections where PEFT's module names differ
  # from BERT's (DistilBERT, MPNet, DeBERTa, whose relative positions also go through the query and key LoRA;
  # ModernBERT, whose packed Wqkv takes one).
  for variant in roberta xlm-roberta electra electra-small distilbert mpnet deberta modernbert modernbert-bias "distilbert|lora" "mpnet|lora" "deberta|lora" "modernbert|lora"; do
    family=${variant%%|*}
    name="$family"
    sets=()
    if [ "$variant" != "$family" ]; then
      name="$family-lora"
      sets=(--set 'peft.method="lora"' --set peft.per_task=true --set 'peft.target_modules=["query","key","value"]')
    fi
    target/release/mtl train tests/python/tiny-run.toml --out "$run/export-$name" --set training.epochs=2 \
      --set "model.path=\"tests/fixtures/tiny-$family\"" "${sets[@]}" > /dev/null 2>&1 \
      || { echo "the tiny $name training run failed"; exit 1; }
    target/release/mtl export --model "$run/export-$name" --out "$run/hf-$name" > /dev/null
    echo "export check, $name:"
    PYTHONWARNINGS=ignore .venv/bin/python tests/python/check_export.py target/release/mtl "$run/export-$name" "$run/hf-$name"
  done
else
  echo "export check skipped: no bench environment (.venv with torch and transformers; scripts/bench-env.sh makes it)"
fi

# The Dockerfile of `mtl serve`, built where a Docker daemon answers (not on the development machines).
if command -v docker > /dev/null 2>&1 && docker info > /dev/null 2>&1; then
  docker build --quiet --tag mtl-serve-test . > /dev/null || { echo "docker build failed"; exit 1; }
  docker run --rm mtl-serve-test --version || { echo "the image does not run mtl"; exit 1; }
  echo "docker: the image builds and runs"
else
  echo "docker build skipped: no Docker daemon here"
fi

# Fuzzing of the server's request parsing and checking (fuzz/, cargo fuzz on nightly Rust), a minute per target;
# a long run is scripts/fuzz.sh 3600.
if scripts/fuzz.sh 60 > "$run/fuzz.log" 2>&1; then
  echo "fuzz (request and generation parsing): $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$run/fuzz.log" | paste -sd ';')"
else
  tail -40 "$run/fuzz.log"
  echo "fuzzing failed: the input that failed is under fuzz/artifacts/TARGET/"
  exit 1
fi
