"""Run a comparison: plan, (optional) learning-rate trials, the final runs, the baseline, the results.

    result = run_comparison(compare_config(d["compare"]), base, "comparisons/x")

Each run is an ordinary training run (`ftcore.train.train`, or `scripts/train.py` under python or
torchrun with compare.launch=subprocess) in its own directory under out_dir; the sweep only adds
compare_run.yaml (the run's config) and compare_status.json (status, wall time, peak memory).
"""

import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ftcore.cli import STOPPED_EXIT
from ftcore.compare.config import CompareConfig
from ftcore.compare.plan import (
    RUN_CONFIG_FILE,
    STATUS_FILE,
    Run,
    config_hash,
    make_run,
    plan_arms,
    read_status,
    resolved,
    run_state,
    trial_length,
)
from ftcore.compare.results import write_results
from ftcore.config import run_config
from ftcore.errors import FtcoreError, NonFiniteLoss
from ftcore.formats.hf import read_config, resolve
from ftcore.train import train
from ftcore.train.loop import StopReason
from ftcore.train.memory import peak_rss_gb, reset_peak_rss

REPO = Path(__file__).resolve().parents[2]


def run_comparison(cc: CompareConfig, base: dict, out_dir, command: str = "") -> dict:
    """Plan, train what is not finished, write results.csv/.md and plots under out_dir; returns the results.

    base: the runs' shared run config (model, data, optim, train, eval, logger, dist); its peft is ignored.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = resolved({**base, "peft": {"method": "none"}, "run_dir": str(out_dir)})
    if base["dist"]["backend"] != "single" and cc.launch == "inprocess":
        raise FtcoreError(f"dist={base['dist']['backend']} runs need torchrun: add compare.launch=subprocess "
                          "compare.launcher='torchrun --nproc_per_node=N' (or compare.launch=print)")  # fmt: skip
    if base["model"]["quantize"] != "none" and "full" in cc.methods:
        raise FtcoreError(f"compare.methods: full fine-tuning trains the base weights, which model.quantize="
                          f"{base['model']['quantize']} keeps frozen; list the other methods")  # fmt: skip
    group = base["logger"]["wandb"]["group"] or f"compare-{out_dir.name}"
    model_cfg, _ = read_config(resolve(base["model"]["path"]))
    arms = plan_arms(cc, model_cfg)
    print_plan(arms, cc)

    # learning-rate trials: short runs at each lr, the lowest validation loss wins
    trial_lrs = cc.lrs_by_method()
    trial = trial_length(cc, base["train"])
    trials = [make_run(base, arm, cc.seeds[0], lr, out_dir, group, "lr_trial", trial, cc.lr_eval_examples)
              for arm in arms for lr in trial_lrs.get(arm.method, [])]  # fmt: skip
    pending = execute_all(trials, cc, "learning-rate trials")
    if pending:  # print mode: the final runs depend on the trials
        write_commands(out_dir, pending, cc)
        return {"pending": [r.name for r in pending]}
    chosen = {arm.name: choose_lr([t for t in trials if t.arm is arm]) for arm in arms if arm.method in trial_lrs}
    for arm in arms:
        chosen.setdefault(arm.name, cc.lr.get(arm.method) or base["optim"]["lr"])

    finals = [make_run(base, arm, seed, chosen[arm.name], out_dir, group) for arm in arms for seed in cc.seeds]
    (out_dir / "plan.json").write_text(
        json.dumps(plan_record(cc, arms, chosen, finals, trials, command), indent=2) + "\n"
    )
    pending = execute_all(finals, cc, "runs")
    if pending:
        write_commands(out_dir, pending, cc)
    baseline = None
    if cc.baseline:
        baseline = evaluate_baseline(base, out_dir, compute=cc.launch != "print")
    return write_results(out_dir, cc, arms, finals, trials, baseline, base, command)


def print_plan(arms, cc: CompareConfig):
    budget = f"budget {cc.budget:,} trainable parameters" if cc.budget else "sizes as configured (compare.budget=0)"
    print(f"compare: {len(arms)} arms x {len(cc.seeds)} seeds, {budget}", flush=True)
    for arm in arms:
        size = f"{arm.sized.knob}={arm.sized.size}" if arm.sized.knob else "fixed size"
        note = f"  ({arm.sized.note})" if arm.sized.note else ""
        print(f"  {arm.name:<28} {size:<24} {arm.sized.trainable:>13,} trainable{note}", flush=True)


def execute_all(runs: list[Run], cc: CompareConfig, what: str) -> list[Run]:
    """Train every run that is not finished; returns the runs left pending (print mode)."""
    pending = []
    for i, run in enumerate(runs, 1):
        where = f"[{what} {i}/{len(runs)}] {run.name} (lr {run.lr:g})"
        state = run_state(run)
        if state in ("finished", "diverged"):
            print(f"{where}: {state}, skipped", flush=True)
        elif cc.launch == "print":
            pending.append(run)
        else:
            print(f"{where}: {'resuming' if state == 'partial' else 'starting'}", flush=True)
            status = execute(run, cc, fresh=state == "new")
            print(f"{where}: {status}", flush=True)
    return pending


def execute(run: Run, cc: CompareConfig, fresh: bool) -> str:
    """Train one run (resuming from its checkpoint unless fresh); record status, wall time and peak memory."""
    if fresh and run.run_dir.exists():
        shutil.rmtree(run.run_dir)  # an attempt that never reached a checkpoint: start clean
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run)
    before = read_status(run.run_dir)
    t0 = time.perf_counter()
    if cc.launch == "inprocess":
        status, peak, kind = train_here(run)
    else:
        status, peak, kind = train_subprocess(run, cc.launcher)
    record = {"config_hash": run.hash, "status": status, "wall_s": before.get("wall_s", 0.0) + time.perf_counter() - t0,
              "peak_mem_gb": max(peak or 0.0, before.get("peak_mem_gb") or 0.0) or None, "peak_mem_kind": kind,
              "attempts": before.get("attempts", 0) + 1}  # fmt: skip
    written = run.run_dir / "config.json"
    if written.is_file() and config_hash(json.loads(written.read_text())) != run.hash:
        raise FtcoreError(f"{run.run_dir}: the run's resolved config differs from the planned one (hash mismatch)")
    (run.run_dir / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if status == StopReason.SIGNAL:
        print(f"compare: {run.name} stopped; rerun the same command to resume the sweep", flush=True)
        raise KeyboardInterrupt
    return status


def write_run_config(run: Run):
    import yaml  # comes with Hydra

    (run.run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run.config, sort_keys=False))


def train_here(run: Run) -> tuple[str, float | None, str]:
    """train() in this process; (status, peak memory in GB, what the peak measures)."""
    import torch

    cuda = torch.cuda.is_available() and run.config["train"]["device"] != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    try:
        status = train(run_config(run.config))["stop_reason"]
    except NonFiniteLoss as e:  # train.on_nonfinite=stop: a learning rate too high
        print(f"compare: {run.name}: {e}", flush=True)
        status = "diverged"
    if cuda:
        return status, torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    return status, peak_rss_gb(), "rss"


def train_command(run: Run, launcher: str) -> list[str]:
    """`launcher scripts/train.py` on the run's own config file, e.g. torchrun --nproc_per_node=4 ... ."""
    prefix = [sys.executable] if launcher.strip() in ("python", "python3") else shlex.split(launcher)
    return prefix + [str(REPO / "scripts" / "train.py"), f"--config-dir={run.run_dir}",
                     f"--config-name={Path(RUN_CONFIG_FILE).stem}", f"hydra.run.dir={run.run_dir}"]  # fmt: skip


def train_subprocess(run: Run, launcher: str) -> tuple[str, float | None, str]:
    """The run as a child process; its output is echoed and kept in train.log. Peak RSS from wait4."""
    cmd = train_command(run, launcher)
    print("  $ " + shlex.join(cmd), flush=True)
    with open(run.run_dir / "train.log", "ab") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the child checkpoints and exits
        try:
            while chunk := p.stdout.read1(1 << 16):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            _, wait_status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(wait_status)
        finally:
            signal.signal(signal.SIGINT, previous)
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB, the largest process of the launch
    if p.returncode == NonFiniteLoss.exit_code:
        return "diverged", peak, "rss"
    if p.returncode in STOPPED_EXIT.values():  # stopped by a signal after checkpointing
        return StopReason.SIGNAL.value, peak, "rss"
    if p.returncode != 0:
        raise FtcoreError(f"{run.run_dir}: training exited with code {p.returncode}; see {run.run_dir / 'train.log'}")
    if not (run.run_dir / "eval.json").is_file():
        return StopReason.SIGNAL.value, peak, "rss"
    return StopReason.FINISHED.value, peak, "rss"


def choose_lr(trials: list[Run]) -> float:
    """The trial learning rate with the lowest best validation loss (ties: the smaller lr)."""
    scored = []
    for t in trials:
        loss = trial_loss(t)
        scored.append((loss, t.lr))
    finite = [s for s in scored if math.isfinite(s[0])]
    if not finite:
        arm = trials[0].arm.name
        raise FtcoreError(f"compare.lrs: every learning rate diverged or had no validation loss for {arm}: {scored}")
    return min(finite)[1]


def trial_loss(run: Run) -> float:
    path = run.run_dir / "eval.json"
    if not path.is_file():
        return math.inf  # diverged
    loss = json.loads(path.read_text()).get("best_val_loss")
    return float(loss) if loss is not None else math.inf


def write_commands(out_dir: Path, pending: list[Run], cc: CompareConfig):
    """commands.sh: one line per unfinished run (print mode); rerun compare afterwards to collect."""
    lines = ["#!/usr/bin/env bash", "# unfinished runs of this comparison; run them (in any order, anywhere that sees",
             "# this directory), then rerun the same compare command to collect the results", "set -e"]  # fmt: skip
    for run in pending:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run)
        lines.append(shlex.join(train_command(run, cc.launcher)))
    (out_dir / "commands.sh").write_text("\n".join(lines) + "\n")
    print(f"compare: {len(pending)} runs to launch, written to {out_dir / 'commands.sh'}:", flush=True)
    print("\n".join(lines[4:]), flush=True)


def evaluate_baseline(base: dict, out_dir: Path, compute: bool = True) -> dict | None:
    """The base model's test score, computed once per (model, data, eval) and kept in out_dir/baseline/."""
    what = {**base, "peft": {"method": "none"}, "optim": {}, "train": {"device": base["train"]["device"]}}
    cfg, key = run_config(what), config_hash(what)
    path = out_dir / "baseline" / "eval.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    try:
        if saved and config_hash(saved["config"]) == key:  # resolved by today's code, as runs are
            return saved
    except (FtcoreError, KeyError, TypeError):
        pass
    if not compute:
        return None
    from ftcore.data.pipeline import build_datasets
    from ftcore.dtypes import DTYPES
    from ftcore.eval.evaluate import evaluate_few_shot, evaluate_task
    from ftcore.formats.hf import load_pretrained
    from ftcore.train.parallel import pick_device

    print("compare: evaluating the base model ...", flush=True)
    device = pick_device(cfg.train.device)
    model, tokenizer = load_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=device,
                                       quant=cfg.model.quant_spec())
    splits, _ = build_datasets(dataclasses.replace(cfg.data, augment="none"), tokenizer)  # shots: real examples
    result = evaluate_task(model, tokenizer, splits[cfg.eval.split], cfg.data, cfg.eval, device)
    record = {"config_hash": key, **{k: result[k] for k in ("task", "metric", "score", "scores", "n")}, "config": what}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "predictions.jsonl", "w") as f:  # the per-example answers the significance tests pair
        f.writelines(json.dumps(sample) + "\n" for sample in result["samples"])
    if cfg.eval.few_shot:  # the prompting baseline: the same model with k training examples in context
        few = evaluate_few_shot(model, tokenizer, splits, cfg.data, cfg.eval, device)
        record["few_shot"] = {k: few[k] for k in ("k", "score", "scores", "shots")}
        with open(path.parent / "predictions_few_shot.jsonl", "w") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in few["samples"])
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def plan_record(cc, arms, chosen, finals, trials, command) -> dict:
    import dataclasses

    return {
        "command": command,
        "compare": dataclasses.asdict(cc),
        "arms": [
            {
                "name": a.name,
                "method": a.method,
                "knob": a.sized.knob,
                "size": a.sized.size,
                "trainable_params": a.sized.trainable,
                "budget": a.budget,
                "note": a.sized.note,
                "lr": chosen[a.name],
                "peft": a.sized.peft,
            }
            for a in arms
        ],
        "runs": [
            {"arm": r.arm.name, "seed": r.seed, "lr": r.lr, "run_dir": str(r.run_dir), "config_hash": r.hash}
            for r in finals
        ],
        "lr_trials": [
            {"arm": r.arm.name, "lr": r.lr, "run_dir": str(r.run_dir), "config_hash": r.hash} for r in trials
        ],
    }
