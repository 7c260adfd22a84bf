"""build_datasets: read -> clean -> split -> augment (train) -> tokenize with label masks -> length filter,
cached on disk.

    splits, report = build_datasets(cfg, tokenizer)
    splits, report = build_datasets(cfg, tokenizer, base_model=model_path, device=device)  # data.augment != none
    examples, report = build_file("fresh.jsonl", cfg, tokenizer)      # one whole file, as the splits are made
    splits["train"][0] == {"input_ids": [...], "labels": [...], "messages": [...], "where": "file:line"}

labels equal input_ids where the loss applies and are -100 elsewhere (not yet shifted; the collator
shifts them). The split comes before formatting, so it does not depend on the system prompt, template or tokenizer.
The report (what each step read, changed and removed) is a plain dict to save with the run.
Augmentation (data.augment, augment.py) rewrites training prompts only, after the split, so validation
and test never see a copy of their own examples; the rewrites are cached with the rest, so a cache hit
loads no model.
"""

import json

import torch

from ftcore.data import cache
from ftcore.data.augment import augment_examples, model_fingerprint
from ftcore.data.clean import clean_examples
from ftcore.data.config import SPLIT_NAMES, DataConfig, resolve_path
from ftcore.data.format import IGNORE, add_system_prompt, encode_example
from ftcore.data.io import load_examples
from ftcore.data.split import split_examples, split_key
from ftcore.errors import FtcoreError


def build_datasets(cfg: DataConfig, tokenizer, base_model: str = "", device="cpu",
                   dtype=torch.float32) -> tuple[dict[str, list[dict]], dict]:  # fmt: skip
    """The train/validation/test splits of cfg's data, tokenized, and the report of how they were made.

    base_model, device, dtype: data.augment's model when data.augment_model is "" (the run's model.path),
    and where and in what dtype it generates (loaded on a cache miss only).
    """
    files = {
        "train": resolve_path(cfg.path, "data.path"),
        "validation": resolve_path(cfg.val_path, "data.val_path") if cfg.val_path else None,
        "test": resolve_path(cfg.test_path, "data.test_path") if cfg.test_path else None,
    }
    augment_model = cfg.augment_model or base_model
    if cfg.augment != "none" and not augment_model:
        raise FtcoreError(f"data.augment={cfg.augment}: no model to rewrite with; set data.augment_model")
    rewriter = f"{model_fingerprint(augment_model)}:{dtype}" if cfg.augment != "none" else ""
    key = cache.cache_key(files, tokenizer, cfg, rewriter) if cfg.cache_dir else None
    if key and (hit := cache.load(cfg.cache_dir, key)) is not None:
        splits, report = hit
        report["files"] = {name: str(p) for name, p in files.items() if p is not None}  # same bytes, maybe moved
        report["cache"] = {"dir": cfg.cache_dir, "key": key, "hit": True}
        return splits, report
    report = {"files": {name: str(p) for name, p in files.items() if p is not None}, "clean": {}}

    # 1-2. read and clean each file on its own
    examples = {}
    for name, path in files.items():
        if path is not None:
            examples[name], report["clean"][name] = read_clean(path, cfg)

    # 3. split the main file among the splits that have no file of their own
    fractions = [f if name == "train" or files[name] is None else 0.0 for name, f in zip(SPLIT_NAMES, cfg.split)]
    splits = split_examples(examples["train"], fractions, cfg.seed, cfg.split_by)
    splits.update({name: exs for name, exs in examples.items() if name != "train"})
    report["removed_overlap"] = drop_overlap(splits, cfg.split_by)

    # 3b. augment the training split only: rewritten prompts, answers kept (none matching any split's prompt)
    if cfg.augment != "none":
        taken = {split_key(ex["messages"], "prompt") for exs in splits.values() for ex in exs}
        added, report["augment"] = augment_examples(splits["train"], cfg, augment_model, device, dtype, taken)
        splits["train"] = splits["train"] + added

    # 4. format (system prompt, template), tokenize with label masks; drop examples over max_length
    #    or with nothing to learn
    report["tokenize"] = {}
    for name, exs in splits.items():
        splits[name], report["tokenize"][name] = encode_examples(exs, cfg, tokenizer)
    if not splits["train"]:
        raise FtcoreError(f"{files['train']}: the training split is empty; report: {json.dumps(report)}")
    if cfg.augment != "none":  # the rewrites that also passed max_length
        kept = sum("augmented" in ex for ex in splits["train"])
        report["augment"]["removed_over_max_length"] = report["augment"]["added"] - kept
        report["augment"]["added"] = kept

    if key:
        cache.save(cfg.cache_dir, key, splits, report)
        report["cache"] = {"dir": cfg.cache_dir, "key": key, "hit": False}
    return splits, report


def build_file(path, cfg: DataConfig, tokenizer, key: str = "data file") -> tuple[list[dict], dict]:
    """One whole file (no split, no cache), read, cleaned, formatted and tokenized as cfg's splits are: e.g. fresh
    labeled data for a finished run (scripts/monitor.py)."""
    path = resolve_path(str(path), key)
    examples, cleaned = read_clean(path, cfg)
    encoded, tokenized = encode_examples(examples, cfg, tokenizer)
    if not encoded:
        raise FtcoreError(f"{path}: no examples left after tokenizing; report: {json.dumps(tokenized)}")
    return encoded, {"file": str(path), "clean": cleaned, "tokenize": tokenized}


def read_clean(path, cfg: DataConfig) -> tuple[list[dict], dict]:
    """A file's examples, cleaned, and the cleaning report."""
    raw = load_examples(path, cfg.format, cfg.schema, cfg.fields, cfg.group_field)
    examples, report = clean_examples(raw, cfg.clean)
    if not examples:
        raise FtcoreError(f"{path}: no examples left after cleaning; report: {json.dumps(report)}")
    return examples, report


def encode_examples(examples: list[dict], cfg: DataConfig, tokenizer) -> tuple[list[dict], dict]:
    """Format (system prompt, template), tokenize with label masks; drop examples over max_length or with
    nothing to learn."""
    exs = [{**ex, "messages": add_system_prompt(ex["messages"], cfg.system_prompt)} for ex in examples]
    encoded = [{**encode_example(ex["messages"], cfg.template, tokenizer, cfg.loss_on, ex["where"]), **ex}
               for ex in exs]  # fmt: skip
    kept = [ex for ex in encoded if len(ex["input_ids"]) <= cfg.max_length]
    learnable = [ex for ex in kept if any(t != IGNORE for t in ex["labels"][1:])]
    report = {
        "examples": len(learnable),
        "removed_over_max_length": len(encoded) - len(kept),
        "removed_no_loss_tokens": len(kept) - len(learnable),
        "tokens": sum(len(ex["input_ids"]) for ex in learnable),
        "loss_tokens": sum(sum(t != IGNORE for t in ex["labels"][1:]) for ex in learnable),
        "max_tokens": max((len(ex["input_ids"]) for ex in learnable), default=0),
    }
    return learnable, report


def drop_overlap(splits: dict, by: str) -> dict:
    """Drop validation examples also in test, and training examples also in validation or test.

    Only separate files can overlap: within one file equal examples hash to the same split.
    """
    removed, later = {}, set()
    for name in reversed(SPLIT_NAMES):
        keys = [split_key(ex["messages"], by) for ex in splits[name]]
        kept = [ex for ex, k in zip(splits[name], keys) if k not in later]
        removed[name], splits[name] = len(splits[name]) - len(kept), kept
        later.update(keys)
    del removed["test"]
    return removed
