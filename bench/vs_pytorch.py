"""Driver of bench/vs-pytorch: runs W1 (train), W2 (infer) and W3 (train-lora) for PyTorch and for mtl
alternately, each in its own process, ROUNDS times (the engine that goes first alternates between rounds), and
prints each engine's median over all timed steps, peak RSS, the 1 -> 2 thread speed-up of W1, and the ratios
mtl / PyTorch. WORKLOADS=train-lora (comma-separated names) runs only those; MODEL=DIR another encoder than
MiniLM for both engines (e.g. assets/models/all-mpnet-base-v2; W3's LoRA targets BERT's module names)."""
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MTL = os.path.join(ROOT, "target", "release", "mtl-bench")
WORKLOADS = {"train": ["--batch", "16", "--seq", "128"], "infer": ["--batch", "32", "--seq", "128"],
             "train-lora": ["--batch", "16", "--seq", "128", "--lora"]}


def run(cmd, threads=2):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RAYON_NUM_THREADS=str(threads)))
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def run_with_rss(cmd, threads=2):
    # Peak RSS of the engine's process alone: a fresh wrapper process reports its only child's ru_maxrss.
    wrapper = ("import json,os,resource,subprocess,sys;"
               "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "sys.stderr.write(p.stderr);"
               "r=json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode==0 else {};"
               "r['peak_rss_mb']=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024;"
               "print(json.dumps(r));sys.exit(p.returncode)")
    return run([PY, "-c", wrapper] + cmd, threads)


def median(values):
    v = sorted(values)
    return v[len(v) // 2]


def main():
    selected = os.environ.get("WORKLOADS", ",".join(WORKLOADS)).split(",")
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; valid: {', '.join(WORKLOADS)}")
    steps = os.environ.get("STEPS", "5")
    rounds = int(os.environ.get("ROUNDS", "3"))
    print(f"model: {os.environ.get('MODEL') or 'assets/models/all-MiniLM-L6-v2'}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch and mtl with 2 threads; {rounds} alternating "
          f"rounds of {steps} timed steps after 2 warm-up per engine and workload; medians over all timed steps")

    def command(engine, workload, threads):
        common = [workload.split("-")[0]] + WORKLOADS[workload] + ["--steps", steps, "--warmup", "2"]
        if os.environ.get("MODEL"):
            common += ["--model", os.environ["MODEL"]]
        if engine == "pytorch":
            return [PY, os.path.join(ROOT, "bench", "torch_workloads.py")] + common + ["--threads", str(threads)]
        return [MTL] + common

    times, rss = {}, {}
    for r in range(rounds):
        for workload in selected:
            engines = ["pytorch", "mtl"] if r % 2 == 0 else ["mtl", "pytorch"]
            for engine in engines:
                res = run_with_rss(command(engine, workload, 2))
                times.setdefault((workload, engine), []).extend(res["times_ms"])
                rss[(workload, engine)] = max(rss.get((workload, engine), 0), res["peak_rss_mb"])
                print(f"round {r + 1} {workload:10s} {engine:8s} median {res['median_ms']:8.1f} ms  peak RSS "
                      f"{res['peak_rss_mb']:7.0f} MB  steps {[round(t) for t in res['times_ms']]}", flush=True)
    scaling = {}
    for engine in ["pytorch", "mtl"] if "train" in selected else []:
        one = run_with_rss(command(engine, "train", 1), threads=1)
        scaling[engine] = one["median_ms"] / median(times[("train", engine)])
        print(f"1 thread train {engine:8s} median {one['median_ms']:8.1f} ms", flush=True)
    for workload in selected:
        for engine in ["pytorch", "mtl"]:
            t = times[(workload, engine)]
            print(f"{workload:10s} {engine:8s} median {median(t):8.1f} ms over {len(t)} steps  peak RSS {rss[(workload, engine)]:7.0f} MB")
    if scaling:
        print(f"W1 threads 1->2 speed-up mtl={scaling['mtl']:.2f} pytorch={scaling['pytorch']:.2f}")
    names = [(k, n) for k, n in [("train", "W1 train"), ("infer", "W2 infer"), ("train-lora", "W3 train-lora")]
             if k in selected]
    for key, name in names:
        print(f"{name} peak RSS mtl={rss[(key, 'mtl')]:.0f}MB pytorch={rss[(key, 'pytorch')]:.0f}MB")
    for key, name in names:
        print(f"{name} ratio={median(times[(key, 'mtl')]) / median(times[(key, 'pytorch')]):.2f}")


if __name__ == "__main__":
    main()
