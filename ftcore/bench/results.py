"""The benchmark's result record: per-arm times, tokens/s, memory, FLOPs and MFU; ratios vs the HF arm; the
issue's targets; notes. FLOP accounting is ftcore/train/flops.py's (nominal FLOPs for every arm)."""

import os
import platform
import shlex
import statistics
from datetime import datetime
from pathlib import Path

import torch

from ftcore.bench.shapes import RANDOM_SHAPES
from ftcore.data.format import IGNORE
from ftcore.formats.hf import build_model, read_config
from ftcore.peft import count_parameters
from ftcore.train.flops import matmul_params, peak_flops, train_flops_per_token
from ftcore.train.run_info import git_state, versions

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"cpu": {"tokens_per_s_ratio": 1.2}, "cuda": {"tokens_per_s_ratio": 1.5, "peak_mem_ratio": 0.6, "mfu": 0.45}}
GRAPH_TARGET = 1.3  # CUDA graph vs eager, tokens/s, on any model


def summarize(args, arms: list[str], device: str, dtype: str, model_dir: Path, batches: list[dict], timings: dict,
              load: tuple) -> dict:  # fmt: skip
    """The result record. args: scripts/bench.py's parsed arguments (plus .argv); timings: run_workers' output;
    load: os.getloadavg() before and after the run."""
    cfg, _ = read_config(model_dir)
    B, T = batches[0]["input_ids"].shape
    per_token = train_flops_per_token(cfg, T, full_finetune=False)
    N = matmul_params(cfg)
    peak = args.peak_tflops * 1e12 or peak_flops(torch.device(device))
    targets = torch.cat([b["targets"] for b in batches])
    result = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "versions": bench_versions(), "model": args.model, "model_dir": str(model_dir),
        "random_weights": args.model in RANDOM_SHAPES, "params": count_parameters(build_model(cfg))[1],
        "data": args.data, "batch": B, "seq_len": T, "dtype": dtype,
        "target_fraction": float((targets != IGNORE).float().mean()),
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": args.targets},
        "switches": {"loss_chunk_size": args.loss_chunk_size, "fused_kernels": args.fused_kernels,
                     "fused_lora": args.fused_lora, "cuda_graph": args.cuda_graph},
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads or torch.get_num_threads(),
        "load_average": {"before": load[0], "after": load[1]},
        "flops": {"matmul_params_N": N, "per_token": per_token, "peak_flops": peak,
                  "formula": f"4N + 2 * (2 * 2 * L * T * H * hd / 2) = 4 * {N} + 2 * {(per_token - 4 * N) / 2:.0f}"
                             f" = {per_token:.4g} FLOPs per token (LoRA, frozen base; T = {T})"},
        "command": shlex.join(["python", "scripts/bench.py", *args.argv]),
        "arms": {arm: arm_result(timings[arm], B * T, per_token, peak) for arm in arms},
    }  # fmt: skip
    result["comparisons"], result["targets"] = compare(result)
    result["notes"] = list(args.note) + auto_notes(result)
    return result


def arm_result(t: dict, tokens: int, per_token: float, peak: float | None) -> dict:
    """One arm's numbers from its timings (median step, wall and CPU) and its worker's memory readings."""
    step = statistics.median(t["times"])
    tps = tokens / step
    achieved = tps * per_token
    cpu_step = statistics.median(t["cpu_times"])
    return {
        "step_time_s": step, "step_times_s": t["times"], "tokens_per_s": tps,
        "cpu_time_s": cpu_step, "cpu_times_s": t["cpu_times"], "tokens_per_cpu_s": tokens / cpu_step,
        "achieved_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
        "peak_mem_mb": t["stats"]["peak_mem_mb"], "mem_after_setup_mb": t["setup"]["mem_mb"],
        "mem_kind": t["stats"]["mem_kind"], "setup_s": t["setup"]["seconds"], "losses": t["losses"],
        "trainable_params": t["setup"]["trainable"],
    }  # fmt: skip


def compare(result: dict) -> tuple[dict, dict]:
    """(ratios of each arm vs "hf" and graph vs eager, the issue's targets with goal / got / met)."""
    arms, out, targets = result["arms"], {}, {}
    if "hf" in arms:
        hf = arms["hf"]
        for name, a in arms.items():
            if name != "hf":
                paired = [h / t for h, t in zip(hf["step_times_s"], a["step_times_s"])]  # same step index
                out[f"{name}_vs_hf"] = {"tokens_per_s": a["tokens_per_s"] / hf["tokens_per_s"],
                                        "tokens_per_s_paired_median": statistics.median(paired),
                                        "tokens_per_cpu_s": a["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
                                        "peak_mem": a["peak_mem_mb"] / hf["peak_mem_mb"]}  # fmt: skip
    for quant in ("gguf", "nf4"):  # a quantized base (model.quantize) vs the fp32 (or bf16) one, the same recipe
        if "ftcore" in arms and f"ftcore-{quant}" in arms:
            a, b = arms[f"ftcore-{quant}"], arms["ftcore"]
            paired = [f / g for f, g in zip(b["step_times_s"], a["step_times_s"])]
            out[f"{quant}_vs_ftcore"] = {"tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                                         "tokens_per_s_paired_median": statistics.median(paired),
                                         "tokens_per_cpu_s": a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"],
                                         "peak_mem": a["peak_mem_mb"] / b["peak_mem_mb"]}  # fmt: skip
    if "ftcore" in arms and "ftcore-nograph" in arms:
        speedup = arms["ftcore"]["tokens_per_s"] / arms["ftcore-nograph"]["tokens_per_s"]
        out["graph_vs_eager"] = {"tokens_per_s": speedup}
    # the issue's targets: SmolLM2-135M on CPU; a 1B-class Llama on a GPU (and graph vs eager on any model)
    on_cpu, model = result["device_type"] == "cpu", result["model"]
    goal = TARGETS[result["device_type"]] if ("SmolLM2" in model if on_cpu else model == "llama-1b") else {}
    if "ftcore_vs_hf" in out and goal:
        r = out["ftcore_vs_hf"]
        targets["tokens_per_s_ratio"] = {"goal": goal["tokens_per_s_ratio"], "got": r["tokens_per_s"],
                                         "met": r["tokens_per_s"] >= goal["tokens_per_s_ratio"]}  # fmt: skip
        if "peak_mem_ratio" in goal:
            targets["peak_mem_ratio"] = {"goal": goal["peak_mem_ratio"], "got": r["peak_mem"],
                                         "met": r["peak_mem"] <= goal["peak_mem_ratio"]}  # fmt: skip
    if "mfu" in goal and "ftcore" in arms and arms["ftcore"]["mfu"] is not None:
        mfu = arms["ftcore"]["mfu"]
        targets["mfu"] = {"goal": goal["mfu"], "got": mfu, "met": mfu >= goal["mfu"]}
    if result["device_type"] == "cuda" and "graph_vs_eager" in out:
        g = out["graph_vs_eager"]["tokens_per_s"]
        targets["graph_vs_eager"] = {"goal": GRAPH_TARGET, "got": g, "met": g >= GRAPH_TARGET}
    return out, targets


def auto_notes(result: dict) -> list[str]:
    """Warnings the numbers need: a busy machine, missed targets, first-step losses that disagree."""
    notes = []
    cores = os.cpu_count() or 1
    before, after = result["load_average"]["before"][0], result["load_average"]["after"][0]
    own = result["threads"]  # the arms run one at a time, each on this many threads: that much load is ours
    if result["device_type"] == "cpu" and max(before, after) > own + 0.5:
        notes.append(f"the machine was busy (load average {before:.1f} -> {after:.1f} on {cores} cores): "
                     "absolute numbers are low and noisy; the ratio is fairer, since the arms alternate step by step")
    for name, t in result["targets"].items():
        if not t["met"]:
            notes.append(f"target missed: {name} {t['got']:.3g} (goal {t['goal']})")
    losses = {a: v["losses"][0] for a, v in result["arms"].items() if a != "ftcore-nf4"}  # nf4 rounds the weights
    if len(losses) > 1 and max(losses.values()) - min(losses.values()) > 1e-2 * max(abs(v) for v in losses.values()):
        notes.append(f"first-step losses differ: {losses} (expected equal: same weights and batch)")
    return notes


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def bench_versions() -> dict:
    """python, torch, transformers, peft, CUDA and this checkout's git state."""
    return {**versions(("torch", "transformers", "peft")), "cuda": torch.version.cuda, "ftcore_git": git_state(ROOT)}
