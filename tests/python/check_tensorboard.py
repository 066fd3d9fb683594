"""Reads the TensorBoard event files of an mtl run with TensorBoard's own reader and checks every scalar
against the run's log.jsonl: same tags, same steps, same values (as float32).

    python tests/python/check_tensorboard.py RUN_DIR

scripts/test.sh trains a small run with the tiny model and calls this; it exits non-zero on any mismatch.
"""
import json
import math
import struct
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def expected(log):
    want = {}
    def add(tag, step, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            want.setdefault(tag, []).append((step, f32(value)))
    for r in log:
        step = r["step"]
        if r["type"] == "step":
            for group, key in (("loss", "losses"), ("weight", "weights"), ("sampling", "sampling")):
                for task, v in r.get(key, {}).items():
                    add(f"{group}/{task}", step, v)
            for a, b, v in r.get("grad_cosines", []):
                add(f"grad_cosine/{a}-{b}", step, v)
            add("train/lr", step, r["lr"])
            add("train/grad_norm", step, r["grad_norm"])
        elif r["type"] == "eval":
            for group, metrics in r["scores"].items():
                for metric, v in metrics.items():
                    add(f"dev/{group}/{metric}", step, v)
            if r.get("selection") is not None:
                add("dev/selection_score", step, r["selection"])
    return want


def main(run):
    run = Path(run)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = expected(log)
    assert tags == set(want), f"tags differ: only in events {sorted(tags - set(want))}, only in log {sorted(set(want) - tags)}"
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert len(got) == len(points), f"{tag}: {len(got)} events, {len(points)} log values"
        for (gs, gv), (ws, wv) in zip(got, points):
            assert gs == ws and (gv == wv or (math.isnan(gv) and math.isnan(wv))), f"{tag}: {gs}={gv} vs {ws}={wv}"
    print(f"tensorboard: {len(tags)} scalar tags, {sum(len(p) for p in want.values())} values match log.jsonl")


if __name__ == "__main__":
    main(sys.argv[1])
