"""Hostile clients against a running `mtl serve` (loopback only, bounded in time): the rows of scripts/chaos.sh.

    python3 scripts/chaos.py slowloris ADDR          500 half-sent requests held open (reopened when closed)
                                                      while a normal client asks; its p99 must stay under 1 s
    python3 scripts/chaos.py sigterm ADDR PID DEADLINE  16 long streams, then SIGTERM: the server must exit
                                                      within DEADLINE seconds (plus 2), and every request it
                                                      accepted must end whole, with a 503, or with the
                                                      `shutting_down` error event (none cut off silently)
    python3 scripts/chaos.py flood ADDR               16 streams keep the queue full; the p99 latency of their
                                                      answers, without and then with 2 MiB bodies flooding in
                                                      (10 a second); the flood must not double it
    python3 scripts/chaos.py checkpoints OUT MTL ARGS...  a training run (checkpoints every step) killed with
                                                      SIGKILL 50 times at random moments, each time resumed;
                                                      then run to its end: every resume must start, and the
                                                      metrics equal a straight run's
    python3 scripts/chaos.py truncated OUT MTL ARGS...  the newest checkpoint of a killed run cut in half: the
                                                      resume falls back to the one before, says so, and ends
                                                      with the straight run's metrics

Each prints one JSON line (`row`, `ok`, and what was measured) and exits 0 when the row holds. Standard library
only: raw sockets, so that half-sent requests and the flood are exactly what is written.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import socket
import sys
import threading
import time

PROMPT = "Request: show me the flights from boston to denver\nIntent:"


def request_bytes(host, path, body, extra=""):
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + data


def exchange(addr, payload, timeout=60.0):
    """Sends a request on a new connection and reads until the server closes it: (status or None, text)."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", "replace")
    status = int(text.split(" ", 2)[1]) if text.startswith("HTTP/1.1 ") else None
    return status, text


def completion(addr, max_tokens, stream=False, ignore_eos=False):
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if ignore_eos:
        body["ignore_eos"] = True
    return request_bytes(addr, "/v1/completions", body)


def p99(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else None


def slowloris(addr, sockets=500, seconds=25.0):
    host, port = addr.rsplit(":", 1)
    held, reopened, stop = [], [0], threading.Event()

    def open_one():
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n".encode())
        return s

    for _ in range(sockets):
        held.append(open_one())

    def trickle():
        # One more header line per socket every 2 s; a socket the server closed is opened again.
        while not stop.is_set():
            for i, s in enumerate(held):
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    s.close()
                    try:
                        held[i] = open_one()
                        reopened[0] += 1
                    except OSError:
                        pass
            stop.wait(2.0)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    latencies, statuses, start = [], {}, time.time()
    while time.time() - start < seconds:
        began = time.time()
        status, _ = exchange(addr, completion(addr, 8))
        latencies.append(time.time() - began)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        time.sleep(0.1)
    stop.set()
    t.join()
    for s in held:
        s.close()
    worst = p99(latencies)
    ok = statuses == {"200": len(latencies)} and worst < 1.0 and reopened[0] > 0
    return {"row": "slowloris", "ok": ok, "sockets": sockets, "reopened_after_the_server_closed_them": reopened[0],
            "normal_requests": len(latencies), "statuses": statuses, "p99_s": round(worst, 3)}


def sigterm(addr, pid, deadline, clients=16):
    outcomes, lock = [], threading.Lock()
    stopped = threading.Event()

    def client():
        while not stopped.is_set():
            try:
                status, text = exchange(addr, completion(addr, 400, stream=True, ignore_eos=True))
            except OSError:
                # Refused: the server had stopped accepting (not an accepted request).
                status, text = "refused", ""
            if status == "refused":
                with lock:
                    outcomes.append("refused")
                return
            if status == 200:
                outcome = "whole" if "data: [DONE]" in text else ("shutting_down" if "shutting_down" in text else "cut")
            elif status == 503:
                outcome = "503"
            else:
                outcome = f"status {status}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    sent = time.time()
    os.kill(pid, signal.SIGTERM)
    exited = None
    while time.time() - sent < deadline + 10:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            exited = time.time() - sent
            break
        time.sleep(0.05)
    stopped.set()
    for t in threads:
        t.join(timeout=10)
    counts = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    accepted_ok = all(o in ("whole", "shutting_down", "503", "refused") for o in outcomes)
    ok = exited is not None and exited <= deadline + 2 and accepted_ok
    return {"row": "sigterm", "ok": ok, "deadline_s": deadline,
            "exited_after_s": None if exited is None else round(exited, 2), "outcomes": counts}


def flood(addr, seconds=20.0, clients=16, rate=10.0):
    def measure(with_flood):
        latencies, statuses, stop = [], {}, threading.Event()
        lock = threading.Lock()

        def client():
            while not stop.is_set():
                began = time.time()
                status, _ = exchange(addr, completion(addr, 32))
                with lock:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if status == 200:
                        latencies.append(time.time() - began)

        refused = {}

        def flooder():
            big = request_bytes(addr, "/v1/completions", {"prompt": "x" * (2 << 20) , "max_tokens": 16})
            while not stop.is_set():
                try:
                    status, _ = exchange(addr, big, timeout=10)
                except OSError:
                    status = "reset"
                with lock:
                    refused[str(status)] = refused.get(str(status), 0) + 1
                stop.wait(1.0 / rate)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        if with_flood:
            threads.append(threading.Thread(target=flooder, daemon=True))
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        return latencies, statuses, refused

    quiet, quiet_statuses, _ = measure(False)
    loud, loud_statuses, flood_statuses = measure(True)
    a, b = p99(quiet), p99(loud)
    ok = a is not None and b is not None and b <= 2 * a and "5" not in "".join(k[0] for k in loud_statuses)
    return {"row": "flood", "ok": ok, "p99_s_without": round(a, 3), "p99_s_with": round(b, 3),
            "answered_without": quiet_statuses, "answered_with": loud_statuses, "flood_answers": flood_statuses}


def metrics(run):
    m = json.load(open(os.path.join(run, "metrics.json")))
    m.pop("train_seconds", None)
    return m


def checkpoints_of(run):
    return sorted(d for d in os.listdir(run) if d.startswith("checkpoint-")) if os.path.isdir(run) else []


def train(mtl, args, out, resume=False, wait=True):
    cmd = [mtl, "train", *args, "--out", out] + (["--resume"] if resume else [])
    log = open(out + ".log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "MTL_LOG": "warn"})
    if wait:
        proc.wait()
    return proc


def straight_metrics(base, mtl, args):
    straight = os.path.join(base, "straight")
    if not os.path.exists(os.path.join(straight, "metrics.json")):
        shutil.rmtree(straight, ignore_errors=True)
        if train(mtl, args, straight).returncode != 0:
            raise SystemExit(f"the straight run failed; see {straight}.log")
    return metrics(straight)


def killed_checkpoints(base, mtl, args, kills=50, seed=0):
    """Kills the run while it writes a checkpoint: when its k-th temporary checkpoint directory appears (k
    drawn from 1 to 4), then resumes it; `kills` times."""
    want = straight_metrics(base, mtl, args)
    run = os.path.join(base, "killed")
    shutil.rmtree(run, ignore_errors=True)
    if os.path.exists(run + ".log"):
        os.remove(run + ".log")
    rng = random.Random(seed)
    killed, resumed, failed, finished = 0, 0, [], False
    while killed < kills:
        resume = bool(checkpoints_of(run))
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
        proc = train(mtl, args, run, resume=resume, wait=False)
        k, seen = rng.randint(1, 4), set()
        while proc.poll() is None and len(seen) < k:
            if os.path.isdir(run):
                seen.update(n for n in os.listdir(run) if n.startswith(".mtl-checkpoint-"))
            time.sleep(0.0005)
        if proc.poll() is not None:
            if proc.returncode != 0:
                failed.append(f"{'resume' if resume else 'start'} exited {proc.returncode}")
            finished = os.path.exists(os.path.join(run, "metrics.json"))
            if finished:
                break  # the run is too short for this many kills
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
        resumed += resume
    if not finished:
        train(mtl, args, run, resume=True)
    same = os.path.exists(os.path.join(run, "metrics.json")) and metrics(run) == want
    ok = killed == kills and not failed and same
    return {"row": "kill -9 during checkpoint writes", "ok": ok, "kills": killed, "resumes_that_started": resumed,
            "failures": failed, "final_metrics_equal_the_straight_run": same}


def truncated_checkpoint(base, mtl, args, seed=1):
    want = straight_metrics(base, mtl, args)
    run = os.path.join(base, "truncated")
    rng = random.Random(seed)
    for _ in range(20):
        shutil.rmtree(run, ignore_errors=True)
        if os.path.exists(run + ".log"):
            os.remove(run + ".log")
        proc = train(mtl, args, run, wait=False)
        time.sleep(rng.uniform(0.5, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if len(checkpoints_of(run)) >= 2:
            break
    kept = checkpoints_of(run)
    newest = os.path.join(run, kept[-1], "model.safetensors")
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    open(run + ".log", "w").close()
    final = train(mtl, args, run, resume=True)
    said = "is damaged" in open(run + ".log").read() and kept[-1] in open(run + ".log").read()
    same = final.returncode == 0 and metrics(run) == want
    return {"row": "truncated newest checkpoint", "ok": said and same, "checkpoints": kept,
            "cut": f"{kept[-1]}/model.safetensors to {size // 2} of {size} bytes", "fell_back_and_said_so": said,
            "final_metrics_equal_the_straight_run": same}


def main():
    row, addr = sys.argv[1], sys.argv[2]
    if row in ("checkpoints", "truncated"):
        base, mtl, args = sys.argv[2], sys.argv[3], sys.argv[4:]
        os.makedirs(base, exist_ok=True)
        result = killed_checkpoints(base, mtl, args) if row == "checkpoints" else truncated_checkpoint(base, mtl, args)
        print(json.dumps(result), flush=True)
        sys.exit(0 if result["ok"] else 1)
    if row == "slowloris":
        result = slowloris(addr)
    elif row == "sigterm":
        result = sigterm(addr, int(sys.argv[3]), float(sys.argv[4]))
    elif row == "flood":
        result = flood(addr)
    else:
        raise SystemExit(f"unknown row {row}")
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
