"""How complete `mtl explain`'s integrated gradients are on real runs, and what an explanation costs.

For each run and input file, explains the first N inputs at several step counts and prints, per task, the
median and the largest completeness error relative to the score's change (|sum of attributions - (score -
baseline score)| / |score - baseline score|, over outputs whose score changed by at least 0.01), and the
seconds per input (all tasks, every explained output).

    .venv/bin/python bench/explain_completeness.py RUN INPUTS.jsonl [N] [STEPS,...]

INPUTS is read as `mtl explain` reads it (JSON lines with "text" or "words", or plain text).
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    run, inputs = sys.argv[1], Path(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    steps = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "20,50,100").split(",")]
    lines = [line for line in inputs.read_text().splitlines() if line.strip()][:n]
    print(f"{run}: {len(lines)} inputs of {inputs}")
    print(f"{'steps':>5} {'task':<10} {'outputs':>7} {'median rel. error':>18} {'max rel. error':>15} {'s / input':>10}")
    for s in steps:
        started = time.perf_counter()
        out = subprocess.run(
            [str(ROOT / "target/release/mtl"), "explain", "--model", run, "--steps", str(s)],
            input="\n".join(lines), capture_output=True, text=True, check=True,
        ).stdout
        seconds = (time.perf_counter() - started) / len(lines)
        errors = {}
        for line in out.splitlines():
            for task, explained in json.loads(line)["explanations"].items():
                for x in explained:
                    change = abs(x["score"] - x["baseline_score"])
                    if change >= 0.01:
                        errors.setdefault(task, []).append(abs(x["completeness_error"]) / change)
        for task, e in sorted(errors.items()):
            print(f"{s:>5} {task:<10} {len(e):>7} {statistics.median(e):>18.2e} {max(e):>15.2e} {seconds:>10.2f}")


if __name__ == "__main__":
    main()
