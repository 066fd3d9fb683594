"""Checks `mtl export` against transformers: every exported task directory loads with transformers' Auto classes
and predicts what `mtl predict` predicts for the task's test file (or, without one, its dev or train file).

    python tests/python/check_export.py MTL_BINARY CHECKPOINT_DIR EXPORT_DIR

- classification: the same label for every example, and the same probability of it within 1e-4;
- multi-label: every label's probability within 1e-4;
- regression: the same values within 1e-4 (relative, for values above 1);
- token classification: the same tag for every word (read at the word's first sub-token, as mtl reads it).
For classification, transformers' `pipeline("text-classification")` must also agree on the first
example. A LoRA run's PEFT-format adapter (TASK/peft/), loaded by peft onto the original
base model, must give the merged directory's logits within 1e-4 on the first 64 examples. Question answering
is not compared here. Run by scripts/test.sh when the bench environment (.venv, with
torch and transformers) is there. Exits non-zero on the first mismatch.
"""
import csv
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          AutoTokenizer, pipeline)
from transformers.utils import logging

logging.disable_progress_bar()
logging.set_verbosity_error()

TOL = 1e-4
# Per tokenizer: what goes before each pre-split word (see load_tokenizer).
WORD_PREFIX = {}


def read_inputs(task):
    """The inputs of the task's first data file among test, dev, train: (text, pair) strings or word lists."""
    data = task["data"]
    path = Path(data.get("test") or data.get("dev") or data["train"])
    fmt = task.get("format") or {".csv": "csv", ".tsv": "tsv", ".conll": "conll", ".conllu": "conllu"}.get(path.suffix, "jsonl")
    text_field, pair_field = task.get("text_field", "text"), task.get("pair_field")
    words_field = task.get("words_field")
    out = []
    if fmt == "jsonl":
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            # As mtl reads JSONL: pre-split words when the line has them, the text (and pair) otherwise.
            if (words_field or "words") in obj:
                out.append({"words": obj[words_field or "words"]})
            elif pair_field:
                out.append({"text": obj[text_field], "text_pair": obj[pair_field]})
            else:
                out.append({"text": obj[text_field]})
    elif fmt in ("csv", "tsv"):
        with path.open(newline="") as f:
            for row in csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"):
                out.append({"text": row[text_field], "text_pair": row[pair_field]} if pair_field else {"text": row[text_field]})
    else:
        column = task.get("word_column", 0) if fmt == "conll" else 1
        words = []
        for line in path.read_text().splitlines() + [""]:
            if (fmt == "conllu" and line.startswith("#")) or (fmt == "conll" and (line.startswith("# ") or line.startswith("-DOCSTART-"))):
                continue  # comments and document markers, as mtl skips them
            cols = line.split("\t") if fmt == "conllu" else line.split()
            if not cols or not line.strip():
                if words:
                    out.append({"words": words})
                words = []
                continue
            if fmt == "conllu" and not cols[0].isdigit():
                continue  # multi-word tokens (1-2) and empty nodes (1.1)
            words.append(cols[column])
    return out


def mtl_predictions(binary, checkpoint, inputs):
    lines = "".join(json.dumps(i) + "\n" for i in inputs)
    run = subprocess.run([binary, "predict", "--model", str(checkpoint), "--full-precision"], input=lines,
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"mtl predict failed: {run.stderr}")
    return [json.loads(line) for line in run.stdout.splitlines()]


def encode(tokenizer, batch, max_len):
    if "words" in batch[0]:
        prefix = WORD_PREFIX.get(id(tokenizer), "")
        return tokenizer([[prefix + w for w in b["words"]] for b in batch], is_split_into_words=True, truncation=True, max_length=max_len,
                         padding=True, return_tensors="pt")
    if "text_pair" in batch[0]:
        return tokenizer([b["text"] for b in batch], [b["text_pair"] for b in batch], truncation=True,
                         max_length=max_len, padding=True, return_tensors="pt")
    return tokenizer([b["text"] for b in batch], truncation=True, max_length=max_len, padding=True, return_tensors="pt")


def load_tokenizer(export_dir, words):
    """The exported directory's tokenizer; for words with a byte-level BPE (RoBERTa's), with
    `add_prefix_space=True`, as transformers asks for pre-split words and as mtl encodes them (every word
    with its leading space)."""
    byte_level = '"ByteLevel"' in (Path(export_dir) / "tokenizer.json").read_text()
    if words and byte_level:
        tokenizer = AutoTokenizer.from_pretrained(export_dir, add_prefix_space=True)
        # transformers' generic fast tokenizer (ModernBERT's) leaves its pre-tokenizer as it is: the words get
        # their leading space here.
        ids = tokenizer(["a"], is_split_into_words=True, add_special_tokens=False)["input_ids"]
        if not tokenizer.convert_ids_to_tokens(ids)[0].startswith("Ġ"):
            WORD_PREFIX[id(tokenizer)] = " "
        return tokenizer
    return AutoTokenizer.from_pretrained(export_dir)


def check_task(binary, checkpoint, export_dir, name, task, max_len, split_text):
    inputs = read_inputs(task)
    if split_text:
        # mtl predict splits raw text on whitespace when the model tags words; both sides get the words.
        inputs = [{"words": i["text"].split()} if "text_pair" not in i and "text" in i else i for i in inputs]
    mtl = mtl_predictions(binary, checkpoint, inputs)
    assert len(mtl) == len(inputs), (len(mtl), len(inputs))
    kind = task["kind"]
    token = kind == "token_classification"
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    model = auto.from_pretrained(export_dir).eval()
    tokenizer = load_tokenizer(export_dir, split_text or "words" in inputs[0])
    id2label = model.config.id2label
    compared, worst = 0, 0.0
    for start in range(0, len(inputs), 32):
        batch = inputs[start:start + 32]
        enc = encode(tokenizer, batch, max_len)
        with torch.no_grad():
            logits = model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        for i, ex in enumerate(batch):
            got = mtl[start + i]["predictions"][name]
            where = f"{name}: example {start + i + 1} ({json.dumps(ex)[:80]})"
            if kind == "classification":
                probs = logits[i].softmax(-1)
                label = id2label[int(probs.argmax())]
                worst = max(worst, abs(float(probs.max()) - got["score"]))
                if label != got["label"] or abs(float(probs.max()) - got["score"]) > TOL:
                    sys.exit(f"{where}: transformers {label} {float(probs.max()):.6f}, mtl {got['label']} {got['score']:.6f}")
            elif kind == "multi_label":
                probs = logits[i].sigmoid()
                for j, p in enumerate(probs.tolist()):
                    worst = max(worst, abs(p - got["scores"][id2label[j]]))
                    if abs(p - got["scores"][id2label[j]]) > TOL:
                        sys.exit(f"{where}: {id2label[j]} transformers {p:.6f}, mtl {got['scores'][id2label[j]]:.6f}")
            elif kind == "regression":
                values = logits[i].tolist()
                want = [got["value"]] if "value" in got else [got["values"][id2label[j]] for j in range(len(values))]
                for v, w in zip(values, want):
                    worst = max(worst, abs(v - w))
                    if abs(v - w) > TOL * max(1.0, abs(w)):
                        sys.exit(f"{where}: transformers {v:.6f}, mtl {w:.6f}")
            elif token:
                word_ids = enc.word_ids(i)
                firsts = {}
                for pos, w in enumerate(word_ids):
                    if w is not None and w not in firsts:
                        firsts[w] = pos
                for w, tag in enumerate(got["tags"]):
                    if w not in firsts:
                        continue  # truncated away
                    label = id2label[int(logits[i, firsts[w]].argmax())]
                    if label != tag:
                        sys.exit(f"{where}: word {w + 1}: transformers {label}, mtl {tag}")
            compared += 1
    # And transformers' own pipeline loads the directory and agrees on the first text example.
    # (Words are joined with spaces: BERT's pre-tokenizer splits them again the same way.)
    if kind == "classification" and "text_pair" not in inputs[0]:
        text = inputs[0].get("text") or WORD_PREFIX.get(id(tokenizer), "") + " ".join(inputs[0]["words"])
        top = pipeline("text-classification", model=str(export_dir), tokenizer=tokenizer, device="cpu")(text, truncation=True)[0]
        want = mtl[0]["predictions"][name]
        if top["label"] != want["label"] or abs(top["score"] - want["score"]) > TOL:
            sys.exit(f"{name}: pipeline says {top}, mtl {want}")
    # A LoRA run's PEFT adapter, on the original base model, gives the merged directory's logits.
    peft_note = ""
    if (export_dir / "peft").is_dir():
        from peft import PeftModel

        base_path = json.loads((export_dir / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = auto.from_pretrained(base_path, num_labels=len(id2label))
        with_adapter = PeftModel.from_pretrained(base, export_dir / "peft").eval()
        largest = 0.0
        for start in range(0, min(len(inputs), 64), 32):
            enc = encode(tokenizer, inputs[start:start + 32], max_len)
            args = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                a, b = model(**args).logits, with_adapter(**args).logits
            if token:
                keep = enc["attention_mask"].bool()
                a, b = a[keep], b[keep]
            largest = max(largest, float((a - b).abs().max()))
        if largest > TOL:
            sys.exit(f"{name}: the PEFT adapter's logits differ from the merged model's by {largest:.2e}")
        peft_note = f"; PEFT adapter on the base model: logits within {largest:.1e} of the merged model's"
    diff = f", largest probability/value difference {worst:.1e}" if not token else ""
    print(f"{name}: {kind}, {compared} examples: transformers and mtl agree{diff}{peft_note}")


def main():
    binary, checkpoint, export = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    config = tomllib.loads((checkpoint / "mtl.toml").read_text())
    max_len = config["model"].get("max_len", 128)
    has_token_task = any(t["kind"] == "token_classification" for t in config["tasks"].values())
    checked = 0
    for name, task in config["tasks"].items():
        if task["kind"] == "question_answering" or not (export / name).is_dir():
            continue
        check_task(binary, checkpoint, export / name, name, task, max_len, has_token_task)
        checked += 1
    if checked == 0:
        sys.exit("no exported task to check")


if __name__ == "__main__":
    main()
