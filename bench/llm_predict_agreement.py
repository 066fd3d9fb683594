"""Does `mtl serve` answer a decoder run's tasks as `mtl predict` and `mtl eval` do?

Runs `mtl predict` (the batched greedy decoding that `mtl eval` scores) and `mtl serve`'s `POST /v1/predict`
(each input and task one generation in the continuous-batching engine) on the same sentences, and compares
each task's answer: the generated text, and what it maps to (the label, or the (type, value) spans). Also
scores the served labels against the gold ones, to set beside `mtl eval`'s numbers.

    python bench/llm_predict_agreement.py --run runs/llm-multitask-3ep --data assets/data/atis/test.jsonl \
        --tasks intent slots

Prints one line per task, `TASK: same answer N/M, same mapped answer N/M`, then `agreement=X` (the share of
(input, task) pairs whose mapped answers are the same). Standard library only.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request


def start_server(mtl, run, threads):
    server = subprocess.Popen(
        [mtl, "serve", run, "--addr", "127.0.0.1:0", "--timeout-s", "3600", "--max-inputs", "1024"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "MTL_LOG": "info", "RAYON_NUM_THREADS": str(threads)},
    )
    for line in server.stderr:
        found = re.search(r"serving on http://([0-9.:]+)", line)
        if found:
            return server, found.group(1)
    raise SystemExit(f"mtl serve exited before it listened (status {server.wait()})")


def post(addr, path, body):
    request = urllib.request.Request(
        f"http://{addr}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.load(response)


def mapped(answer):
    """What an answer maps to, without the generated text."""
    return {k: v for k, v in answer.items() if k != "generated"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True, help="JSON lines with `words` (or `text`)")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--gold", nargs="*", default=["intent"], help="classification tasks whose gold label field has the task's name")
    parser.add_argument("--mtl", default="target/release/mtl")
    parser.add_argument("--limit", type=int, default=0, help="the first N sentences only")
    parser.add_argument("--chunk", type=int, default=64, help="inputs per served request")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    rows = [json.loads(l) for l in open(args.data, encoding="utf-8") if l.strip()]
    if args.limit:
        rows = rows[: args.limit]
    inputs = [{"words": r["words"]} if "words" in r else {"text": r["text"]} for r in rows]

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i in inputs:
            f.write(json.dumps(i) + "\n")
        path = f.name
    print(f"mtl predict on {len(inputs)} inputs ...", file=sys.stderr, flush=True)
    out = subprocess.run(
        [args.mtl, "predict", "--model", args.run, "--input", path],
        capture_output=True,
        text=True,
        env={**os.environ, "RAYON_NUM_THREADS": str(args.threads)},
    )
    os.unlink(path)
    if out.returncode != 0:
        raise SystemExit(f"mtl predict failed:\n{out.stderr}")
    expected = [json.loads(l)["predictions"] for l in out.stdout.splitlines() if l.strip()]
    assert len(expected) == len(inputs), (len(expected), len(inputs))

    print("mtl serve /v1/predict ...", file=sys.stderr, flush=True)
    server, addr = start_server(args.mtl, args.run, args.threads)
    try:
        served = []
        for at in range(0, len(inputs), args.chunk):
            body = {"inputs": inputs[at : at + args.chunk], "tasks": args.tasks}
            served.extend(post(addr, "/v1/predict", body)["predictions"])
    finally:
        server.terminate()
        server.wait()

    pairs = 0
    agreeing = 0
    for task in args.tasks:
        same_text = sum(s[task]["generated"] == e[task]["generated"] for s, e in zip(served, expected))
        same = sum(mapped(s[task]) == mapped(e[task]) for s, e in zip(served, expected))
        pairs += len(inputs)
        agreeing += same
        line = f"{task}: same answer {same_text}/{len(inputs)}, same mapped answer {same}/{len(inputs)}"
        if task in args.gold:
            right = sum(s[task].get("label") == r[task] for s, r in zip(served, rows))
            line += f", served accuracy {right / len(inputs):.4f}"
        print(line)
        for n, (s, e) in enumerate(zip(served, expected)):
            if mapped(s[task]) != mapped(e[task]):
                print(f"  input {n}: served {s[task]['generated']!r}, mtl predict {e[task]['generated']!r}")
    print(f"agreement={agreeing / pairs:.4f}")


if __name__ == "__main__":
    main()
