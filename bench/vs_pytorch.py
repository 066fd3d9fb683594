"""Driver of bench/vs-pytorch: runs W1 (train), W2 (infer) and W3 (train-lora) for PyTorch and for mtl
alternately, each in its own process, ROUNDS times (the engine that goes first alternates between rounds), and
prints each engine's median over all timed steps, peak RSS, the 1 -> 2 thread speed-up of W1, and the ratios
mtl / PyTorch. WORKLOADS=train-lora (comma-separated names) runs only those; MODEL=DIR another encoder than
MiniLM for both engines (e.g. assets/models/all-mpnet-base-v2; W3's LoRA targets BERT's module names).

Where the time goes: it prints the CPU and its vector flags, measures each engine's matrix-product rate at the
encoder's projection shapes (mtl-bench gemm, torch.matmul) at the start of every round, takes the best of each
round and the median over rounds as the machine's gemm peak, and gives
every workload's achieved GFLOP/s (from the model's shapes: projections and attention products, backward twice
the forward, none for frozen weights) and its share of that peak, with mtl's per-phase split of each step.
On a CPU with AMX it adds W1 and W2 in bf16 (train-bf16, infer-bf16: mtl's model.precision = "bf16" against
torch.autocast with bfloat16), their share of the bf16 gemm peak, and the bf16 speed-up of each engine."""
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MTL = os.path.join(ROOT, "target", "release", "mtl-bench")
WORKLOADS = {"train": ["--batch", "16", "--seq", "128"], "infer": ["--batch", "32", "--seq", "128"],
             "train-lora": ["--batch", "16", "--seq", "128", "--lora"],
             "train-bf16": ["--batch", "16", "--seq", "128", "--bf16"],
             "infer-bf16": ["--batch", "32", "--seq", "128", "--bf16"]}
NAMES = {"train": "W1 train", "infer": "W2 infer", "train-lora": "W3 train-lora", "train-bf16": "W1 bf16 train",
         "infer-bf16": "W2 bf16 infer"}
# CPU flags that decide which kernels can run.
FLAGS = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
         "amx_tile"]


def cpu():
    """The CPU's model name and the flags in FLAGS it has (Linux /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return name, [f for f in FLAGS if f in flags]


def gflop(model_dir, workload):
    """GFLOP of one step: the four projections and the two attention products of every layer, forward; the
    backward pass twice that (input and weight gradients), or once with frozen weights (LoRA)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    args = WORKLOADS[workload]
    b, s = int(args[args.index("--batch") + 1]), int(args[args.index("--seq") + 1])
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    forward = layers * b * s * (2 * (4 * h * h + 2 * h * i) + 4 * s * h)
    passes = {"train": 3, "train-bf16": 3, "train-lora": 2}.get(workload, 1)
    return passes * forward / 1e9


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
    name, flags = cpu()
    amx = "amx_bf16" in flags
    default = [w for w in WORKLOADS if amx or not w.endswith("bf16")]
    selected = os.environ.get("WORKLOADS", ",".join(default)).split(",")
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; valid: {', '.join(WORKLOADS)}")
    steps = os.environ.get("STEPS", "5")
    rounds = int(os.environ.get("ROUNDS", "3"))
    model_dir = os.environ.get("MODEL") or "assets/models/all-MiniLM-L6-v2"
    print(f"model: {model_dir}")
    print(f"cpu: {name}; flags: {' '.join(flags)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch and mtl with 2 threads; {rounds} alternating "
          f"rounds of {steps} timed steps after 2 warm-up per engine and workload; medians over all timed steps")

    def command(engine, workload, threads):
        if workload.startswith("gemm"):
            common = ["gemm", "--batch", "32", "--seq", "128", "--steps", steps, "--warmup", "2"]
            common += ["--bf16"] if workload.endswith("bf16") else []
        else:
            common = [workload.split("-")[0]] + WORKLOADS[workload] + ["--steps", steps, "--warmup", "2"]
        common += ["--model", model_dir] if os.environ.get("MODEL") else []
        if engine == "pytorch":
            return [PY, os.path.join(ROOT, "bench", "torch_workloads.py")] + common + ["--threads", str(threads)]
        return [MTL] + common

    # The machine's matrix-product peak at the encoder's shapes: the better engine's best shape, measured at the
    # start of every round and taken as the median over rounds, so that the peak and the workloads are measured
    # over the same stretch of time (on a shared machine one burst of the peak alone moved by 13% between runs).
    precisions = ["f32", "bf16"] if any(w.endswith("bf16") for w in selected) else ["f32"]
    round_peaks = {}

    def measure_peaks(r):
        for precision in precisions:
            workload = "gemm" if precision == "f32" else "gemm-bf16"
            rates = {engine: run(command(engine, workload, 2))["peak_gflops"] for engine in ["pytorch", "mtl"]}
            round_peaks.setdefault(precision, []).append(max(rates.values()))
            print(f"round {r + 1} gemm peak {precision}: {max(rates.values()):.0f} GFLOP/s (mtl {rates['mtl']:.0f}, "
                  f"pytorch {rates['pytorch']:.0f}) at {model_dir}'s projection shapes, 32 x 128 tokens", flush=True)

    times, rss, phases = {}, {}, {}
    for r in range(rounds):
        measure_peaks(r)
        for workload in selected:
            engines = ["pytorch", "mtl"] if r % 2 == 0 else ["mtl", "pytorch"]
            for engine in engines:
                res = run_with_rss(command(engine, workload, 2))
                times.setdefault((workload, engine), []).extend(res["times_ms"])
                rss[(workload, engine)] = max(rss.get((workload, engine), 0), res["peak_rss_mb"])
                if engine == "mtl":
                    for k, v in res.get("phases_ms", {}).items():
                        phases.setdefault(workload, {}).setdefault(k, []).append(v)
                print(f"round {r + 1} {workload:10s} {engine:8s} median {res['median_ms']:8.1f} ms  peak RSS "
                      f"{res['peak_rss_mb']:7.0f} MB  steps {[round(t) for t in res['times_ms']]}", flush=True)
    scaling = {}
    for engine in ["pytorch", "mtl"] if "train" in selected else []:
        one = run_with_rss(command(engine, "train", 1), threads=1)
        scaling[engine] = one["median_ms"] / median(times[("train", engine)])
        print(f"1 thread train {engine:8s} median {one['median_ms']:8.1f} ms", flush=True)

    peaks = {precision: median(v) for precision, v in round_peaks.items()}
    for precision, v in round_peaks.items():
        print(f"gemm peak {precision}: {peaks[precision]:.0f} GFLOP/s, the median of the rounds' "
              f"{', '.join(f'{x:.0f}' for x in v)}")

    def rate(workload, engine):
        return gflop(model_dir, workload) / (median(times[(workload, engine)]) / 1e3)

    def share(workload, engine):
        return rate(workload, engine) / peaks["bf16" if workload.endswith("bf16") else "f32"]

    for workload in selected:
        for engine in ["pytorch", "mtl"]:
            t = times[(workload, engine)]
            print(f"{workload:10s} {engine:8s} median {median(t):8.1f} ms over {len(t)} steps  peak RSS "
                  f"{rss[(workload, engine)]:7.0f} MB  {rate(workload, engine):6.1f} GFLOP/s = "
                  f"{100 * share(workload, engine):4.1f}% of the gemm peak")
    for workload, split in phases.items():
        parts = ", ".join(f"{k} {median(v):.0f}" for k, v in sorted(split.items()))
        print(f"mtl phases {workload} (ms, medians over rounds): {parts}")
    if scaling:
        print(f"W1 threads 1->2 speed-up mtl={scaling['mtl']:.2f} pytorch={scaling['pytorch']:.2f}")
    for key in selected:
        print(f"{NAMES[key]} peak RSS mtl={rss[(key, 'mtl')]:.0f}MB pytorch={rss[(key, 'pytorch')]:.0f}MB")
    for key in [k for k in selected if k.endswith("bf16")]:
        print(f"{NAMES[key]} share of bf16 gemm peak mtl={share(key, 'mtl'):.2f} pytorch={share(key, 'pytorch'):.2f}")
        print(f"{NAMES[key]} ratio={median(times[(key, 'mtl')]) / median(times[(key, 'pytorch')]):.2f}")
        base = key[: -len("-bf16")]
        if base in selected:
            print(f"{NAMES[key]} speed-up over f32 mtl={median(times[(base, 'mtl')]) / median(times[(key, 'mtl')]):.2f} "
                  f"pytorch={median(times[(base, 'pytorch')]) / median(times[(key, 'pytorch')]):.2f}")
    for key in [k for k in selected if not k.endswith("bf16")]:
        print(f"{NAMES[key]} ratio={median(times[(key, 'mtl')]) / median(times[(key, 'pytorch')]):.2f}")
    for key in [k for k in ["train", "infer"] if k in selected]:
        print(f"{NAMES[key].split()[0]} share of gemm peak={share(key, 'mtl'):.2f} (pytorch {share(key, 'pytorch'):.2f})")


if __name__ == "__main__":
    main()
