"""Load test of scripts/serve.py: requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients, batching on
and off (--max-batch 1), on this machine. A script, not a timed test; results under bench/results/.

    python scripts/bench_serve.py [--model PATH] [--adapter NAME=DIR ...] [--clients 1,8,32] [--max-tokens 32]

Each client sends --requests greedy chat requests one after another (models taken in turn: the base and each
adapter), each with max_tokens new tokens; the server runs as a subprocess per batching setting.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

from ftcore.bench.results import bench_versions, device_name
from ftcore.cli import DEMO_MODEL, run_cli
from ftcore.errors import FtcoreError

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 17 + 25?", "What is 9 times 8?", "What is 100 - 37?", "What is 144 / 12?",
             "What is 3 + 4 * 5?", "What is 81 - 19?", "What is 6 times 7?", "What is 250 + 250?"]  # fmt: skip


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=4, help="requests per client per setting")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="the batching-on setting")
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (0 = its default)")
    p.add_argument("--device", default="cpu", help="the server's device (cpu, cuda, ...)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args()


def start(args, max_batch: int):
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", args.model, "--port", "0", "--name", "base",
           "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning",
           "--device", args.device]  # fmt: skip
    cmd += [a for item in args.adapter for a in ("--adapter", item)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        proc.kill()
        raise FtcoreError(f"the server did not start: {line.strip() or 'no output'}")
    return proc, f"http://{m.group(1)}:{m.group(2)}"


def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int):
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(requests):
                k = c * requests + i
                body = {"model": models[k % len(models)], "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]}  # fmt: skip
                t0 = time.perf_counter()
                r = http.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(r.status_code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not latencies:
        raise FtcoreError(f"{clients} clients: every request failed (HTTP {sorted(set(errors))})")
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": statistics.median(latencies), "p95_s": q[18]}  # fmt: skip


def main():
    args = parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    models = ["base", *(item.partition("=")[0] for item in args.adapter)]
    load_before = os.getloadavg()
    rows = []
    for label, max_batch in (("on", args.max_batch), ("off", 1)):
        proc, url = start(args, max_batch)
        try:
            load(url, models, 1, 1, args.max_tokens)  # warm-up
            for c in clients:
                measured = load(url, models, c, args.requests, args.max_tokens)
                row = {"batching": label, "max_batch": max_batch, **measured}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            proc.terminate()
            proc.wait(120)
    result = {"machine": device_name(args.device), "device": args.device, "model": args.model, "models": models,
              "max_tokens": args.max_tokens, "requests_per_client": args.requests,
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "versions": bench_versions(), "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.now():%Y%m%d-%H%M%S}-serve"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Serving load test: {result['machine']}", "",
             f"Model {args.model}, models {', '.join(models)} in turn, greedy, max_tokens {args.max_tokens}, "
             f"{args.requests} requests per client. Load average {load_before[0]:.1f} before, "
             f"{result['load_average']['after'][0]:.1f} after.", "",
             "| batching | clients | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {r['batching']} (max {r['max_batch']}) | {r['clients']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['errors']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    run_cli(main)
