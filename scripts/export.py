"""Fold a trained adapter into its base model: `python scripts/export.py outputs/<run>/final merged/`.

Writes a plain HF-layout model (config.json, model.safetensors, tokenizer files) that ftcore and
transformers load without the adapter. LoRA, rsLoRA, DoRA and IA3 merge; prefix and prompt tuning
add virtual tokens and cannot (use the adapter as it is). The base model is the one the adapter
records (ftcore's runs record model.path), or --model.
"""

import argparse
from pathlib import Path

from ftcore.cli import run_cli
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError
from ftcore.peft import export_merged, load_with_adapter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter", help="a PEFT-format adapter directory (a run's final/, or one HF PEFT saved)")
    p.add_argument("out", help="the directory to write the merged model to")
    p.add_argument("--model", default="", help="the base model (default: the one the adapter records)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the merged weights' dtype")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FtcoreError(f"{out}: exists and is not empty; name a new directory")
    model, tokenizer = load_with_adapter(args.adapter, args.model, dtype=DTYPES[args.dtype])
    export_merged(model, out, tokenizer)
    print(f"wrote {out} ({model.peft_config.method} merged into {args.model or 'the recorded base'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
