"""Fold a trained adapter into its base model: `python scripts/export.py outputs/<run>/final merged/`.

Writes a plain HF-layout model (config.json, model.safetensors, tokenizer files) that ftcore and
transformers load without the adapter. The adapter-layer methods merge; prefix, prompt and P-tuning
add virtual tokens and cannot (use the adapter as it is). The base model is the one the adapter
records (ftcore's runs record model.path), or --model. An adapter trained over a quantized base
(model.quantize, which the run's config.json next to final/ records, or --quantize) is merged into
that base dequantized, the weights it was trained over.
"""

import argparse
import dataclasses
from pathlib import Path

from ftcore.cli import run_cli
from ftcore.config import QUANTIZE, ModelSpec
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError
from ftcore.peft import export_merged, load_with_adapter
from ftcore.textfile import read_json_object


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter", help="a PEFT-format adapter directory (a run's final/, or one HF PEFT saved)")
    p.add_argument("out", help="the directory to write the merged model to")
    p.add_argument("--model", default="", help="the base model (default: the one the adapter records)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the merged weights' dtype")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="the base's model.quantize during training (default: what the run's config.json records)")
    return p.parse_args(argv)


def base_spec(adapter: Path, quantize: str | None) -> ModelSpec:
    """model.quantize and its settings: --quantize, else the run's config.json (<run>/final -> <run>), else none."""
    run_config = adapter.resolve().parent / "config.json"
    recorded = read_json_object(run_config).get("model", {}) if run_config.is_file() else {}
    spec = ModelSpec(**{k: recorded[k] for k in ("quantize", "quant_block_size", "double_quant") if k in recorded})
    return spec if quantize is None else dataclasses.replace(spec, quantize=quantize)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FtcoreError(f"{out}: exists and is not empty; name a new directory")
    spec = base_spec(Path(args.adapter), args.quantize)
    model, tokenizer = load_with_adapter(args.adapter, args.model, dtype=DTYPES[args.dtype], quant=spec.quant_spec())
    export_merged(model, out, tokenizer)
    base = args.model or "the recorded base"
    if spec.quantize != "none":
        base += f", dequantized from {spec.quantize}"
    elif args.quantize is None and not (Path(args.adapter).resolve().parent / "config.json").is_file():
        base += "; no run config.json beside the adapter: if it was trained quantized, give --quantize"
    print(f"wrote {out} ({model.peft_config.method} merged into {base})")
    return 0


if __name__ == "__main__":
    run_cli(main)
