#!/usr/bin/env bash
# Creates the ignored Python environment .venv with PyTorch, transformers, accelerate (for the Trainer recipe), peft,
# seqeval, scikit-learn, captum and cvxpy with ECOS (bench/requirements.txt), and LibMTL 1.1.5 without its
# dependencies (its weighting methods, for scripts/make_fixtures.py weighting; its package imports torchvision,
# which the fixtures do not load), used by the benchmarks, the PyTorch reference runs and scripts/make_fixtures.py. The tests do not need it. Idempotent: reinstalls when bench/requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/requirements.sha256
want=$(sha256sum bench/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! .venv/bin/python -c "import torch, transformers, accelerate, seqeval, sklearn, peft" 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
  echo "$want" > "$stamp"
fi
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('LibMTL') is None)"; then
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps libmtl==1.1.5
fi
