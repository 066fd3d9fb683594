"""Converts SQuAD 1.1 dev (as shipped in the PyPI sdist bigbench==1.0.0, under
bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json) into the JSONL that mtl's question_answering tasks read.

Usage: python3 scripts/convert_squad.py SQUAD_JSON OUT_DIR   (scripts/fetch.sh squad calls it)

SQuAD dev has 48 Wikipedia articles and 10,565 crowd-written questions (3 gold answers each). We split by
article, so that no context is shared between splits: the articles are shuffled with a fixed seed and taken in
that order into test (until 1,000 questions), dev (until 500) and train (until 4,000; a CPU-sized budget), whole
paragraphs at a time. Answers whose `answer_start` does not point at their text (15 in the file, mostly one
character off) are re-anchored at the occurrence nearest to the given offset. Lines:
  {"id", "title", "question", "context", "answers": {"text": [...], "answer_start": [...]}}
The file carries BIG-bench's canary string; the converted data stays in the ignored assets/ folder.
"""
import json
import random
import sys
from pathlib import Path

SEED = 20261129
BUDGET = {"test": 1000, "dev": 500, "train": 4000}


def anchored(context, text, start):
    if context[start:start + len(text)] == text:
        return start
    hits = [i for i in range(len(context)) if context.startswith(text, i)]
    return min(hits, key=lambda i: abs(i - start)) if hits else None


def main(src, out):
    data = json.loads(Path(src).read_text(encoding="utf-8"))["data"]
    articles = list(data)
    random.Random(SEED).shuffle(articles)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"fixed_offsets": 0, "dropped_answers": 0}
    order = ["test", "dev", "train"]
    split, counts, rows = 0, {k: 0 for k in order}, {k: [] for k in order}
    for article in articles:
        if split == len(order):
            break
        name = order[split]
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                texts, starts = [], []
                for a in qa["answers"]:
                    s = anchored(ctx, a["text"], a["answer_start"])
                    if s is None:
                        stats["dropped_answers"] += 1
                        continue
                    stats["fixed_offsets"] += int(s != a["answer_start"])
                    texts.append(a["text"])
                    starts.append(s)
                if texts:
                    rows[name].append({"id": qa["id"], "title": article["title"], "question": qa["question"].strip(),
                                       "context": ctx, "answers": {"text": texts, "answer_start": starts}})
        counts[name] = len(rows[name])
        if counts[name] >= BUDGET[name]:
            split += 1
    for name in order:
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows[name]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats.update({k: len(v) for k, v in rows.items()})
    stats["articles"] = {k: sorted({r["title"] for r in v}) for k, v in rows.items()}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "articles"}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
