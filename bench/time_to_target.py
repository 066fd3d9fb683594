"""Time to target of an `mtl train` run, from its log (stderr): the seconds from the `training ...` line to the first
epoch whose dev `joint.frame_accuracy` (or another metric, --metric) reaches the target. This is the same clock as
bench/atis_reference.py's `time_to_target`: training plus dev evaluation, data and model loading excluded.

    .venv/bin/python bench/time_to_target.py runs/atis.log --target 0.92
"""
import argparse
import json
import re
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+)Z")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--metric", default="joint.frame_accuracy")
    a = p.parse_args()
    start, epochs = None, []
    for line in open(a.log, encoding="utf-8"):
        line = ANSI.sub("", line)
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.fromisoformat(m.group(1))
        if " training " in line and start is None:
            start = t
        e = re.search(r"epoch (\d+) dev: .*?" + re.escape(a.metric) + r"=([0-9.]+)", line)
        if e and start is not None:
            epochs.append({"epoch": int(e.group(1)), "elapsed": round((t - start).total_seconds(), 1), a.metric: float(e.group(2))})
    reached = next((e for e in epochs if e[a.metric] >= a.target), None)
    print(json.dumps({"target": a.target, "metric": a.metric, "time_to_target": reached and reached["elapsed"],
                      "epoch_of_target": reached and reached["epoch"], "epochs": epochs}))


if __name__ == "__main__":
    main()
