"""Time ftcore's LoRA training step against a reference loop on HF transformers + PEFT, in one run.

    python scripts/bench.py                                   # SmolLM2-135M, CPU or GPU, fp32/bf16
    python scripts/bench.py --model llama-1b --batch 8 --seq-len 2048 --dtype bf16 --fused-kernels
    python scripts/bench.py --model smollm2-135m --data random --cuda-graph --arms ftcore,ftcore-nograph
    python scripts/bench.py --memory --model llama-1b                 # base memory: fp32 vs bf16 vs nf4 (vs gguf)
    python scripts/bench.py --dist-memory --model llama-1b --method lora --dtype float32   # per-rank peak RSS:
                                                      # train.py in 1 process vs 2 (FSDP2, gloo), and the export
    python scripts/bench.py --arms ftcore,ftcore-gguf --steps 20      # GGUF-native base vs the fp32 import
    python scripts/bench.py --arms ftcore,ftcore-nf4 --steps 20       # QLoRA (NF4 base) vs LoRA on the fp32 base

Every arm runs in its own worker process (its peak memory is its own) and the parent steps them in
turn, one step each, alternating who goes first: a machine whose load changes during the run slows
both alike. Both arms get the same batches (packed rows with a block-diagonal mask and per-document
positions; loss on the response tokens), the same model weights, LoRA settings, dtype, AdamW and
gradient clipping. Results: bench/results/<time>-<device>-<model>.json and .md. Tokens/s is wall-clock
(median step time); each step's CPU time (time.process_time) is reported too: with --threads 1 it is
the work the step did, which a busy machine barely changes (its wall time it changes a lot).

FLOP accounting (ftcore/train/flops.py), per token, N = matmul parameters (attention + MLP + lm_head,
embeddings excluded): forward 2N, backward 2N for activation gradients, no weight gradients for the
frozen base, so 4N for LoRA (6N for full fine-tuning); attention adds 2 * 2 * L * T * d_attn / 2
per token forward (causal), times 2 for LoRA. Both arms are charged these nominal FLOPs, whatever
they skip (ftcore projects only target positions through lm_head), so MFU compares like with like.
Adapter FLOPs (~1% at r=16) are not counted.
"""

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftcore.bench.batches import make_batches
from ftcore.bench.ftcore_arm import ftcore_arm
from ftcore.bench.report import markdown, write_results
from ftcore.bench.results import summarize
from ftcore.bench.shapes import RANDOM_SHAPES, resolve_model
from ftcore.bench.workers import run_workers, serve
from ftcore.cli import DEMO_MODEL, run_cli
from ftcore.errors import FtcoreError
from ftcore.formats.hf import gguf_file
from ftcore.train.parallel import pick_device

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("ftcore", "ftcore-nograph", "ftcore-plain", "ftcore-gguf", "ftcore-nf4", "hf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEMO_MODEL,
                   help="HF-layout dir, .gguf, pkg://..., hub id, or llama-1b / smollm2-135m (random weights)")
    p.add_argument("--data", default="arithmetic", help="a demo set (arithmetic, tickets, rewrite) or random")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU (float32 and bfloat16 are fp32 and bf16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0 = torch's default)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default=",".join(ALL_LINEAR), help="LoRA target modules (comma-separated)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss-chunk-size", type=int, default=1024, help="ftcore's chunked CE; 0 = plain lm_head + CE")
    p.add_argument("--fused-kernels", action="store_true", help="ftcore: CUDA kernels for RMSNorm/RoPE/SwiGLU")
    p.add_argument("--fused-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="ftcore: LoRA layers as one autograd node (train.fused_lora, on by default)")
    p.add_argument("--cuda-graph", action="store_true", help="ftcore: capture and replay the whole step")
    p.add_argument("--arms", default="ftcore,hf", help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: known GPUs only)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: bytes per base parameter and the loading peak, fp32 / bf16 / nf4, "
                        "and gguf (model.quantize=gguf) for a .gguf model (a named shape gets random bf16 weights "
                        "written first)")
    p.add_argument("--dist-memory", action="store_true",
                   help="instead of timing: each rank's peak RSS growth of scripts/train.py (2 steps, CPU) in 1 "
                        "process vs 2 (dist=fsdp, torchrun), and rank 0's during the final export (a named shape "
                        "gets random weights of --dtype written first)")
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="--dist-memory: the run's peft method")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="--dist-memory: glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for both runs: freed tensors from that "
                        "size up leave the RSS (default 0: glibc's own, dynamic up to 32 MiB)")
    p.add_argument("--freeze", action="append", default=[],
                   help="--dist-memory --method full: a parameter glob kept frozen (repeatable; the export writes all)")
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(args.dtype, args.dtype)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.worker:
        return worker(args.worker, json.loads(Path(args.spec).read_text()))
    if args.memory:
        return memory(args)
    if args.dist_memory:
        return dist_memory(args)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            raise FtcoreError(f"--arms: {a!r} is not one of {', '.join(ARMS)}")
    try:
        device = str(pick_device(args.device))
    except FtcoreError:
        raise FtcoreError(f"--device {args.device} but CUDA is not available") from None
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    with tempfile.TemporaryDirectory(prefix="ftcore-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = resolve_model(args.model, tmp)  # a named shape lives in tmp: summarize inside this block
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                "targets": args.targets.split(",")}  # fmt: skip
        spec = {"model_dir": str(model_dir), "random_weights": args.model in RANDOM_SHAPES, "device": device,
                "dtype": dtype, "threads": args.threads, "lora": lora, "lr": args.lr,
                "loss_chunk_size": args.loss_chunk_size, "fused_kernels": args.fused_kernels,
                "fused_lora": args.fused_lora, "cuda_graph": args.cuda_graph,
                "batches": str(tmp / "batches.pt")}  # fmt: skip
        if "ftcore-gguf" in arms:
            spec["gguf"] = str(gguf_file(args.model))  # one line unless --model is a .gguf
        (tmp / "spec.json").write_text(json.dumps(spec))

        def data():  # made while the workers start (they read it at their first step)
            batches = make_batches(args.data, model_dir, args.batch, args.seq_len, args.warmup + args.steps)
            torch.save(batches, tmp / "batches.pt")
            return batches

        load_before = os.getloadavg()
        launch = [sys.executable, str(Path(__file__).resolve())]
        batches, timings = run_workers(arms, launch, tmp / "spec.json", data, args.warmup, args.steps, tmp)
        load = (load_before, os.getloadavg())
        result = summarize(args, arms, device, dtype, model_dir, batches, timings, load)
    paths = write_results(result, Path(args.out))
    print(markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def memory(args) -> int:
    """scripts/bench.py --memory: each format of the base loaded in a fresh process; results under --out."""
    from datetime import datetime

    from ftcore.bench.memory import memory_markdown, memory_rows, write_random_checkpoint
    from ftcore.bench.results import device_name

    with tempfile.TemporaryDirectory(prefix="ftcore-bench-") as tmp:
        if args.model in RANDOM_SHAPES:
            model_dir = write_random_checkpoint(RANDOM_SHAPES[args.model], Path(tmp) / args.model)
        else:
            model_dir = resolve_model(args.model, Path(tmp))
        gguf = gguf_file(args.model) if args.model.endswith(".gguf") else None  # a path or pkg://...
        rows = memory_rows(model_dir, gguf=gguf)
    name = args.model if args.model in RANDOM_SHAPES else Path(args.model).name.split(".gguf")[0]
    text = memory_markdown(rows, name + (" (random weights)" if args.model in RANDOM_SHAPES else ""),
                           device_name("cpu"))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.now():%Y%m%d-%H%M%S}-memory-{''.join(c if c.isalnum() or c in '-.' else '-' for c in name)}"
    stem.with_suffix(".json").write_text(json.dumps({"model": name, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text + f"wrote {stem}.json and {stem}.md")
    return 0


def dist_memory(args) -> int:
    """scripts/bench.py --dist-memory: train.py probed per rank, 1 process then 2 (ftcore.bench.dist_memory)."""
    import shlex
    import shutil
    from datetime import datetime

    from ftcore.bench.dist_memory import dist_markdown, run_both, summarize
    from ftcore.bench.memory import write_random_checkpoint
    from ftcore.bench.results import device_name
    from ftcore.formats.hf import resolve

    dtype = "bfloat16" if args.dtype == "bf16" else "float32"  # auto: fp32 (the runs are on CPU)
    random = args.model in RANDOM_SHAPES
    with tempfile.TemporaryDirectory(prefix="ftcore-bench-") as tmp:
        tmp = Path(tmp)
        if random:  # written once, in the run's dtype; SmolLM2's tokenizer (its ids fit any of the shapes)
            model_dir = write_random_checkpoint(RANDOM_SHAPES[args.model], tmp / args.model,
                                                dtype=getattr(torch, dtype))  # fmt: skip
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(resolve(DEMO_MODEL) / name, model_dir / name)
        else:
            model_dir = resolve(args.model)
        runs, commands = run_both(model_dir, ROOT / "scripts" / "train.py", tmp, args.method, dtype, args.freeze,
                                  args.mmap_threshold)  # fmt: skip
        commands = [c.replace(str(tmp), "$TMP").replace(sys.executable, "python") for c in commands]
    name = args.model if random else Path(args.model).name.split(".gguf")[0]
    notes = [*(["random weights"] if random else []), *args.note]
    result = {"model": name, "method": args.method, "dtype": dtype, "machine": device_name("cpu"),
              "torch": torch.__version__, "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "notes": notes,
              "command": shlex.join(["python", "scripts/bench.py", *args.argv]), "commands": commands,
              "runs": runs}  # fmt: skip
    result["criteria"] = summarize(runs)
    text = dist_markdown(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in name)
    stem = out / f"{datetime.now():%Y%m%d-%H%M%S}-dist-memory-{slug}-{args.method}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(text)
    print(text + f"wrote {stem}.json and {stem}.md")
    return 0


def worker(arm: str, spec: dict) -> int:
    """One arm in this process, stepped by the parent (ftcore.bench.workers); the HF arm imports transformers."""
    if arm == "hf":
        from bench_hf import hf_arm  # scripts/, this script's directory

        return serve(partial(hf_arm, spec), spec)
    return serve(partial(ftcore_arm, arm, spec), spec)


if __name__ == "__main__":
    run_cli(main)
