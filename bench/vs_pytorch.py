"""Driver of bench/vs-pytorch: runs W1 (train) and W2 (infer) for PyTorch and for mtl alternately, each in its
own process, and prints each engine's median step time, peak RSS, and the ratios mtl / PyTorch."""
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MTL = os.path.join(ROOT, "target", "release", "mtl-bench")
WORKLOADS = {"train": ["--batch", "16", "--seq", "128"], "infer": ["--batch", "32", "--seq", "128"]}


def run(cmd):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RAYON_NUM_THREADS=os.environ.get("RAYON_NUM_THREADS", "2")))
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def run_with_rss(cmd):
    # Peak RSS of the engine's process alone: a fresh wrapper process reports its only child's ru_maxrss.
    wrapper = ("import json,os,resource,subprocess,sys;"
               "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "sys.stderr.write(p.stderr);"
               "r=json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode==0 else {};"
               "r['peak_rss_mb']=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024;"
               "print(json.dumps(r));sys.exit(p.returncode)")
    return run([PY, "-c", wrapper] + cmd)


def main():
    steps = os.environ.get("STEPS", "5")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch and mtl with 2 threads; median of {steps} steps after 2 warm-up")
    results = {}
    for workload, shape in WORKLOADS.items():
        common = [workload] + shape + ["--steps", steps, "--warmup", "2"]
        for engine, cmd in [("pytorch", [PY, os.path.join(ROOT, "bench", "torch_workloads.py")] + common),
                            ("mtl", [MTL] + common)]:
            r = run_with_rss(cmd)
            results[(workload, engine)] = r
            print(f"{workload:5s} {engine:8s} median {r['median_ms']:8.1f} ms  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"steps {[round(t) for t in r['times_ms']]}", flush=True)
    for key, name in [("train", "W1 train"), ("infer", "W2 infer")]:
        m, t = results[(key, "mtl")], results[(key, "pytorch")]
        print(f"{name} peak RSS mtl={m['peak_rss_mb']:.0f}MB pytorch={t['peak_rss_mb']:.0f}MB")
    for key, name in [("train", "W1 train"), ("infer", "W2 infer")]:
        print(f"{name} ratio={results[(key, 'mtl')]['median_ms'] / results[(key, 'pytorch')]['median_ms']:.2f}")


if __name__ == "__main__":
    main()
