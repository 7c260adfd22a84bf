"""Data pipeline: read -> clean -> split -> augment (train) -> tokenize with label masks -> pack/pad -> sampler.

    splits, report = build_datasets(cfg, tokenizer)              # pipeline.py
    batcher = Batcher.from_config(splits["train"], cfg, pad_token_id(tokenizer))
    sampler = Sampler(batcher.lengths, batch_size, grad_accum=..., world_size=..., rank=..., seed=cfg.seed,
                      bucketing=cfg.bucketing and not cfg.packing)
    for indices in sampler:
        batch = batcher(indices)   # input_ids, targets (shifted), position_ids, attention_mask
"""

from ftcore.data.collate import Batcher, collate, pack, pad_token_id
from ftcore.data.config import CleanConfig, DataConfig
from ftcore.data.format import encode_example, encode_prompt, split_prompt
from ftcore.data.pipeline import build_datasets
from ftcore.data.sampler import Sampler, eval_batches
from ftcore.data.tasks import TASKS, extract_answer, get_task

__all__ = [
    "TASKS",
    "Batcher",
    "CleanConfig",
    "DataConfig",
    "Sampler",
    "build_datasets",
    "collate",
    "encode_example",
    "encode_prompt",
    "eval_batches",
    "extract_answer",
    "get_task",
    "pack",
    "pad_token_id",
    "split_prompt",
]
