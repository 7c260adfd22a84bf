"""Train every PEFT method on the demo data through the CLI and tabulate it (the README's methods table).

    python scripts/methods_check.py [--steps 30] [--methods lora,vera,...] [--out bench/results/methods_cpu.md]

Per method: `python scripts/train.py peft=<method> train.max_steps=<steps>` on SmolLM2-135M (the demo), no
evaluations; reads the run's metrics.jsonl and printed parameter count. Reports the trainable parameters and
the mean loss of the first and last 5 steps (the loss must fall; exit 1 otherwise). The step cost relative to
LoRA is timed apart, in this process: a forward, backward and AdamW step on one [4, 128] batch of SmolLM2,
the methods interleaved over rounds (so a busy machine slows them alike), best of the rounds.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# method -> overrides (conf/peft/<method>.yaml gives the rest)
METHODS = {
    "lora": [], "pissa": ["peft=lora", "peft.init=pissa_niter_4"], "olora": ["peft=lora", "peft.init=olora"],
    "loraplus": ["peft=lora", "optim.loraplus_lr_ratio=16", "optim.lr=2e-4"], "dora": [], "vera": [], "hira": [],
    "hra": [], "ln_tuning": [], "adalora": [], "loha": [], "lokr": [], "oft": [], "boft": [], "lily": [], "ia3": [],
    "prefix": [], "prompt": [], "ptuning": [],
}  # fmt: skip


def run(method: str, steps: int, out: Path) -> dict:
    overrides = METHODS.get(method, [])
    if not any(o.startswith("peft=") for o in overrides):
        overrides = [f"peft={method}", *overrides]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides, f"train.max_steps={steps}",
           "train.eval_every=0", "eval.baseline=false", "eval.max_examples=1", "logger.wandb.mode=disabled",
           "logger.progress=false", f"hydra.run.dir={out / method}"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"method": method, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    events = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
    steps_ = [e for e in events if "loss" in e and "tokens_per_s" in e]
    losses = [e["loss"] for e in steps_]
    trainable = re.search(r"trainable params: ([\d,]+)", p.stdout)
    return {"method": method, "trainable": int(trainable.group(1).replace(",", "")) if trainable else None,
            "first5": statistics.mean(losses[:5]), "last5": statistics.mean(losses[-5:])}  # fmt: skip


def step_costs(methods: list[str], rounds: int = 3) -> dict[str, float]:
    """Seconds of one training step per method (best of `rounds`, methods interleaved), in this process."""
    import time

    import torch

    from ftcore import peft
    from ftcore.cli import DEMO_MODEL
    from ftcore.config import run_config
    from ftcore.formats.hf import load_pretrained
    from ftcore.train.optim import build_optimizer

    tokens = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, dims=1)  # every position has a target: the model's chunked loss path
    best = {}
    for _ in range(rounds):
        for method in methods:
            overrides = METHODS.get(method, [])
            values = {"peft": {"method": method}, "optim": {}}
            for o in overrides:  # the CLI overrides as config values: numbers parsed, the rest strings
                key, value = o.split("=", 1)
                group, _, name = key.partition(".")
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
                values[group][name or "method"] = value
            cfg = run_config(values)
            model, _ = load_pretrained(DEMO_MODEL)
            peft.apply(model, cfg.peft)
            peft.trainables_to_float32(model)
            model.train()
            optimizer = build_optimizer(model, cfg.optim)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                loss_sum, count = model(tokens, targets=targets)
                (loss_sum / count).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            best[method] = min(best.get(method, float("inf")), *times[1:])
    return best


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*: (.*)", info.read_text()) if info.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods_cpu.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            rows.append(run(method, args.steps, Path(tmp)))
            print(rows[-1], flush=True)
    costs = step_costs([r["method"] for r in rows if "error" not in r])
    lines = [f"# PEFT methods on the demo (SmolLM2-135M, {args.steps} steps, CPU)", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; `python scripts/methods_check.py "
             f"--steps {args.steps}`. Step cost: one forward + backward + AdamW step on a [4, 128] batch, "
             "relative to LoRA's, timed interleaved in one process (best of 3 rounds).", "",
             "| method | trainable params | loss, first 5 steps | loss, last 5 steps | step cost vs LoRA |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | |")
            continue
        cost = f"{costs[r['method']] / costs['lora']:.2f}x" if "lora" in costs else "?"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['first5']:.3f} | {r['last5']:.3f} | {cost} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [r["method"] for r in rows if "error" in r or r["last5"] >= r["first5"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
