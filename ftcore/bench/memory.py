"""Memory of a loaded base model per storage format (scripts/bench.py --memory): bytes per base parameter and
the peak RSS growth while loading, each format measured in its own fresh process.

    format     what is resident for the base
    float32    4 bytes per parameter
    bfloat16   2 bytes per parameter
    nf4        the decoder's linears at 4 bits + one absmax code per 64 (model.quantize=nf4, double
               quantization); embeddings, norms and lm_head in bfloat16
    gguf       a .gguf model only: every weight in the file's own blocks (model.quantize=gguf; the demo's
               Q4_1 linears 0.625 bytes, its Q8_0 embedding, tied to lm_head, 1.0625); norms in float32
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

FORMATS = ("float32", "bfloat16", "nf4")

# Runs in a fresh process: argv = model_dir, format. Prints one JSON line.
PROBE = """
import json, sys, time, torch
from ftcore.formats.hf import build_model, load_model
from ftcore.model import ModelConfig
from ftcore.peft import count_parameters
from ftcore.quant.fourbit import quantize_4bit
from ftcore.quant.linear import QuantSpec
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
def hwm(): return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
torch.ones(1024).sum()  # page in torch, the model classes and the quantizer first
build_model(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1))
quantize_4bit(torch.randn(64, 256), "nf4", 64, True)
model_dir, fmt = sys.argv[1], sys.argv[2]
before, start = rss(), time.perf_counter()
if fmt == "nf4":
    model = load_model(model_dir, dtype=torch.bfloat16, quant=QuantSpec("nf4", 64, True))
elif fmt == "gguf":  # model_dir is the .gguf file here
    model = load_model(model_dir, dtype=torch.float32, quant=QuantSpec("gguf", 64, True))
else:
    model = load_model(model_dir, dtype=getattr(torch, fmt))
seconds = time.perf_counter() - start
tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}.values()  # tied once
for t in tensors:
    t.sum() if t.is_floating_point() else t.max()  # touch every page (mmap views too); no full-size temporaries
                                                   # (an integer sum would widen the uint8 blocks to int64 first)
stored = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"format": fmt, "params": count_parameters(model)[1], "stored_bytes": stored,
                  "peak_rss_growth_bytes": hwm() - before, "load_s": seconds}))
"""


def write_random_checkpoint(hf_config: dict, out_dir: Path, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """An HF-layout checkpoint of random weights of the given shape, built and written in `dtype` (bfloat16 by
    default: never an fp32 copy first)."""
    from ftcore.formats.hf import read_config, save_pretrained
    from ftcore.model import Transformer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config))
    cfg, hf = read_config(out_dir)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.hf_config = hf
    save_pretrained(model, out_dir)
    return out_dir


def measure(model_dir: Path, fmt: str) -> dict:
    """One format's load in a fresh process (its peak is its own)."""
    r = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), fmt], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"memory probe for {fmt} failed: {r.stderr.strip().splitlines()[-1:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["bytes_per_param"] = row["stored_bytes"] / row["params"]
    return row


def memory_rows(model_dir: Path, formats=FORMATS, gguf: Path | None = None) -> list[dict]:
    """The formats' rows, and a "gguf" row when the model is a .gguf file (`gguf`, which model_dir imports)."""
    rows = [measure(Path(model_dir), f) for f in formats]
    return rows + ([measure(Path(gguf), "gguf")] if gguf is not None else [])


def memory_markdown(rows: list[dict], model: str, machine: str) -> str:
    checkpoint = next((r for r in rows if r["format"] == "bfloat16"), rows[0])
    fp32 = next((r for r in rows if r["format"] == "float32"), rows[0])
    lines = [f"# Base model memory: {model}", "", f"Machine: {machine}; {time.strftime('%Y-%m-%d')}; torch "
             f"{torch.__version__}. Each format loaded in a fresh process (`scripts/bench.py --memory`); peak RSS "
             "growth is VmHWM minus the RSS before loading.", "",
             "| format | base params | resident bytes | bytes / param | peak RSS growth while loading | vs bf16 | vs fp32 "
             "| load (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        ratio = r["stored_bytes"] / checkpoint["stored_bytes"]
        lines.append(f"| {r['format']} | {r['params']:,} | {r['stored_bytes'] / 2**20:,.1f} MiB | "
                     f"{r['bytes_per_param']:.3f} | {r['peak_rss_growth_bytes'] / 2**20:,.1f} MiB | {ratio:.2f}x | "
                     f"{r['stored_bytes'] / fp32['stored_bytes']:.2f}x | {r['load_s']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
