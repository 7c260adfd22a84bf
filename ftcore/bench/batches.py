"""The benchmark's batches: packed rows [B, T] from a demo set through ftcore's pipeline, or random documents."""

import json
from pathlib import Path

import torch

from ftcore.cli import DEMO_MODEL
from ftcore.data.collate import Batcher, collate
from ftcore.data.format import IGNORE
from ftcore.errors import FtcoreError


def make_batches(data: str, model_dir: Path, B: int, T: int, n: int) -> list[dict]:
    """n packed batches [B, T] (block-diagonal mask, per-document positions): `data` is a demo set name or a
    user's file, or "random" for random documents with the loss on their second halves."""
    if data == "random":
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        return random_batches(vocab, B, T, n)
    from ftcore.data.config import DataConfig
    from ftcore.data.pipeline import build_datasets
    from ftcore.formats.hf import resolve
    from ftcore.formats.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    tok_dir = model_dir if (model_dir / "tokenizer.json").is_file() else resolve(DEMO_MODEL)  # llama-1b: SmolLM2's
    cfg = DataConfig(path=data, packing=True, seq_len=T, max_length=T, cache_dir="", system_prompt="")  # raw examples
    splits, _ = build_datasets(cfg, Tokenizer.from_dir(tok_dir))
    batcher = Batcher.from_config(splits["train"], cfg, pad_id=0)
    if len(batcher) < B:
        raise FtcoreError(f"--data {data}: {len(batcher)} packed rows of {T} tokens, fewer than one batch of {B}")
    return [batcher([j % len(batcher) for j in range(i * B, (i + 1) * B)]) for i in range(n)]  # rows reused if short


def random_batches(vocab: int, B: int, T: int, n: int, seed: int = 0) -> list[dict]:
    """Rows of random documents of T/8 to T/2 tokens (ids from 3: clear of special tokens), packed to T."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(B):
            row, used = [], 0
            while (k := int(torch.randint(T // 8, T // 2, (1,), generator=g))) + used <= T:
                ids = torch.randint(3, vocab, (k,), generator=g).tolist()
                row.append({"input_ids": ids, "labels": [IGNORE] * (k // 2) + ids[k // 2 :]})
                used += k
            rows.append(row)
        out.append(collate(rows, pad_id=0, length=T, packed=True))
    return out
