"""Generate text: `python scripts/generate.py "What is 2+2?" [--adapter outputs/<run>/final]` (chat template by default)."""

import argparse
import time

import torch

from ftcore.cli import DEMO_MODEL, run_cli
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_pretrained
from ftcore.model.generate import generate
from ftcore.peft import load_with_adapter


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("prompts", nargs="+", help="one or more prompts, generated as one batch")
    p.add_argument("--model", default="", help=f"model dir, .gguf file, pkg://pkg/file or hub repo id (default: "
                   f"the base --adapter records, else {DEMO_MODEL})")
    p.add_argument("--adapter", default="", help="a PEFT-format adapter to apply (e.g. outputs/<run>/final)")
    p.add_argument("--raw", action="store_true", help="feed prompts as plain text, without the chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def main():
    args = parse_args()
    if args.max_new_tokens < 1:
        raise FtcoreError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.adapter:
        model, tok = load_with_adapter(args.adapter, args.model, dtype=DTYPES[args.dtype], device=args.device)
    else:
        model, tok = load_pretrained(args.model or DEMO_MODEL, dtype=DTYPES[args.dtype], device=args.device)
    model.eval()
    if args.raw:
        ids = [tok.encode(p) for p in args.prompts]
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        texts = [tok.apply_chat_template(system + [{"role": "user", "content": p}]) for p in args.prompts]
        ids = [tok.encode(t) for t in texts]
    t0 = time.perf_counter()
    out = generate(
        model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=args.seed,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    for prompt, new in zip(args.prompts, out):
        print(f">>> {prompt}\n{tok.decode(new).strip()}\n")
    n = sum(len(o) for o in out)
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s on {args.device}]")


if __name__ == "__main__":
    run_cli(main)
