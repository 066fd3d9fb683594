#!/usr/bin/env bash
# Builds the Python package's wheel (pyproject.toml: the module `mtl` and the `mtl` command) into DIR (dist/ by
# default): `pip install dist/mtl-*.whl` installs it elsewhere. One wheel serves CPython 3.9 and later (abi3).
# Usage: scripts/wheel.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "${1:-dist}" .
ls "${1:-dist}"/mtl-*.whl
