#!/usr/bin/env bash
# Creates the ignored Python environment .venv with PyTorch, transformers, seqeval and scikit-learn
# (bench/requirements.txt), used by the benchmarks, the PyTorch reference runs and scripts/make_fixtures.py.
# The tests do not need it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, seqeval, sklearn" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
fi
