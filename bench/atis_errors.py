"""Where ATIS slot errors are, across runs: which test entities every run misses (the floor of a recipe) and which
only some runs do (the seed-to-seed part), and what a vote over the runs would score. Not part of the tests.

    for r in runs/atis-mpnet-b runs/atis-mpnet-b13; do
        target/release/mtl predict -q --model $r --input assets/data/atis/test.jsonl > /tmp/$(basename $r).jsonl
    done
    .venv/bin/python bench/atis_errors.py /tmp/atis-mpnet-b.jsonl /tmp/atis-mpnet-b13.jsonl [--show shared|varying]

Entities are read from BIO tags by seqeval (its default mode, as `mtl eval` scores them), so each run's F1 here
equals `mtl eval`'s test slot F1. Prints JSON lines.
"""
import argparse
import json
from collections import Counter
from pathlib import Path

from seqeval.metrics.sequence_labeling import get_entities

TEST = Path("assets/data/atis/test.jsonl")
TRAIN = Path("assets/data/atis/train.jsonl")


def entities(tags):
    """(start, end, type) of each entity in a BIO sequence, as seqeval reads them (end exclusive)."""
    return {(start, end + 1, kind) for kind, start, end in get_entities(list(tags))}


def f1(tp, predicted, gold):
    p, r = tp / predicted, tp / gold
    return 2 * p * r / (p + r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("predictions", nargs="+", type=Path, help="`mtl predict` output on the test file, one per run")
    ap.add_argument("--show", choices=["shared", "varying"], help="list these errors, one JSON line each")
    a = ap.parse_args()
    gold = [json.loads(line) for line in TEST.read_text().splitlines() if line.strip()]
    gold_entities = [entities(g["slots"]) for g in gold]
    runs = []
    for path in a.predictions:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) != len(gold):
            raise SystemExit(f"{path}: {len(rows)} predictions for {len(gold)} test utterances")
        runs.append([entities(r["predictions"]["slots"]["tags"]) for r in rows])
    errors = []
    for path, run in zip(a.predictions, runs):
        tp = sum(len(g & p) for g, p in zip(gold_entities, run))
        wrong = {(kind, i, e) for i, (g, p) in enumerate(zip(gold_entities, run))
                 for kind, es in (("missed", g - p), ("spurious", p - g)) for e in es}
        errors.append(wrong)
        print(json.dumps({"run": str(path), "slot_f1": round(f1(tp, sum(map(len, run)), sum(map(len, gold_entities))), 4),
                          "errors": len(wrong)}))
    count = Counter(e for wrong in errors for e in wrong)
    print(json.dumps({"errors_in_k_runs": {k: sum(1 for c in count.values() if c == k) for k in range(1, len(runs) + 1)}}))
    # An entity kept when at least k runs predict it.
    for k in range(1, len(runs) + 1):
        tp = predicted = 0
        for i, g in enumerate(gold_entities):
            votes = Counter(e for run in runs for e in run[i])
            kept = {e for e, v in votes.items() if v >= k}
            tp += len(g & kept)
            predicted += len(kept)
        print(json.dumps({"vote_at_least": k, "slot_f1": round(f1(tp, predicted, sum(map(len, gold_entities))), 4)}))
    # The gold entities every run misses, by what training says of the same words: never an entity there, an
    # entity of other types only (training contradicts the test label), the gold type in a minority of cases.
    seen = {}
    for row in (json.loads(line) for line in TRAIN.read_text().splitlines() if line.strip()):
        for start, end, tag in entities(row["slots"]):
            seen.setdefault(" ".join(row["words"][start:end]), Counter())[tag] += 1
    floor = Counter()
    for i, g in enumerate(gold_entities):
        for start, end, tag in g:
            if all((start, end, tag) not in run[i] for run in runs):
                types = seen.get(" ".join(gold[i]["words"][start:end]), Counter())
                floor["missed_by_every_run"] += 1
                if not types:
                    floor["never_an_entity_in_training"] += 1
                elif types[tag] == 0:
                    floor["only_other_types_in_training"] += 1
                elif types[tag] < max(types.values()):
                    floor["a_minority_type_in_training"] += 1
    print(json.dumps(dict(floor)))
    if a.show:
        for (kind, i, (start, end, tag)), c in sorted(count.items(), key=lambda x: (x[0][1], x[0][2])):
            if (c == len(runs)) == (a.show == "shared"):
                words = gold[i]["words"]
                print(json.dumps({"runs": c, "error": kind, "utterance": i, "type": tag,
                                  "words": " ".join(words[start:end]), "text": " ".join(words)}))


if __name__ == "__main__":
    main()
