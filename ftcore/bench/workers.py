"""One worker process per arm, stepped in turn by the parent over stdin/stdout.

    parent                                    worker (`launch + --worker ARM --spec SPEC`)
      start every worker, make the data  -->  builds its arm            --> @bench {"seconds", "mem_mb", "trainable"}
      "step i\\n" (each arm in turn)      -->  times step(batches[i])    --> @bench {"seconds", "cpu_seconds", "loss"}
      "end\\n"                            -->  reads its peak memory     --> @bench {"peak_mem_mb", "mem_kind"}

Each worker's peak memory is its own. The order alternates step by step, so a machine whose load changes
during the run slows every arm alike. Protocol lines go to the worker's real stdout; everything else it
prints goes to its log (stderr), shown when it fails.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ftcore.errors import FtcoreError
from ftcore.train.memory import memory_mb

PROTOCOL = "@bench "


def run_workers(arms: list[str], launch: list[str], spec: Path, data, warmup: int, steps: int,
                tmp: Path) -> tuple[list, dict]:  # fmt: skip
    """Start one worker per arm, call data() (the batches, made while the workers start), step them in turn;
    (batches, {arm: {"setup", "times", "cpu_times", "losses", "stats"}})."""
    procs, logs = {}, {}
    try:
        for arm in arms:
            logs[arm] = open(tmp / f"{arm}.log", "w")  # noqa: SIM115 (closed below)
            cmd = [*launch, "--worker", arm, "--spec", str(spec)]
            procs[arm] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[arm],
                                          text=True, bufsize=1)  # fmt: skip
        batches = data()
        out = {arm: {"setup": receive(procs[arm], arm, tmp), "times": [], "cpu_times": [], "losses": []}
               for arm in arms}  # fmt: skip
        for i in range(warmup + steps):
            for arm in arms if i % 2 == 0 else arms[::-1]:
                procs[arm].stdin.write(f"step {i}\n")
                done = receive(procs[arm], arm, tmp)
                out[arm]["losses"].append(done["loss"])
                if i >= warmup:
                    out[arm]["times"].append(done["seconds"])
                    out[arm]["cpu_times"].append(done["cpu_seconds"])
            print(f"step {i + 1}/{warmup + steps}: " + "  ".join(f"{a} {out[a]['losses'][-1]:.4f}" for a in arms),
                  file=sys.stderr, flush=True)  # fmt: skip
        for arm in arms:
            procs[arm].stdin.write("end\n")
            out[arm]["stats"] = receive(procs[arm], arm, tmp)
            procs[arm].wait(timeout=60)
        return batches, out
    finally:
        for arm, p in procs.items():
            if p.poll() is None:
                p.kill()
            logs[arm].close()


def receive(proc, arm: str, tmp: Path) -> dict:
    """The worker's next protocol message; if it exited instead, an error with the tail of its log."""
    for line in proc.stdout:
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL) :])
    proc.wait()
    tail = (tmp / f"{arm}.log").read_text().strip().splitlines()[-15:]
    raise FtcoreError(f"the {arm} worker exited with code {proc.returncode}:\n" + "\n".join(tail))


def serve(build_arm, spec: dict) -> int:
    """The worker's side: build_arm(device) -> (step(batch) -> loss, trainable parameter count), then answer
    the parent's commands until "end"."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol lines only; stray prints go to the log
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    t0 = time.perf_counter()
    step, trainable = build_arm(device)
    batches = None
    send(proto, {"seconds": time.perf_counter() - t0, "mem_mb": memory_mb(device)[0], "trainable": trainable})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "end":
            peak, kind = memory_mb(device, peak=True)
            send(proto, {"peak_mem_mb": peak, "mem_kind": kind})
            return 0
        if batches is None:  # written by the parent while this worker was building its arm
            batches = torch.load(spec["batches"])
        batch = batches[int(cmd[1])]
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        loss = step(batch)
        sync(device)
        send(proto, {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c, "loss": loss})
    return 0


def send(proto, obj: dict):
    proto.write(PROTOCOL + json.dumps(obj) + "\n")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
