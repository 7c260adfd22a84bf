"""On-disk cache of the tokenized splits, keyed by a hash of the data files' bytes, the tokenizer and
the settings that change the result (not batching settings, which apply after the cache).

    {cache_dir}/{key}/meta.json    report, and per split: messages and source locations
    {cache_dir}/{key}/tokens.npz   per split: input_ids and labels (flat int32) and offsets
"""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

CACHE_VERSION = 1
# DataConfig fields that do not change the tokenized splits (the files' contents are hashed instead of paths).
NOT_HASHED = ("path", "val_path", "test_path", "packing", "seq_len", "bucketing", "static_shape", "cache_dir",
              "task", "metric", "labels")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")  # fmt: skip
_PROBE = "Hello, wörld! 12,345.6 \t\n  <b>x</b> ½ 東京 🙂 "
_PROBE_CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "u 1"},
               {"role": "assistant", "content": "a 2"}]  # fmt: skip


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's files (where it names its directory) and of its behaviour on a probe."""
    h = hashlib.sha256()
    for attr in ("path", "dir", "model_dir", "name_or_path"):
        d = getattr(tokenizer, attr, None)
        if isinstance(d, (str, Path)) and Path(d).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(d) / name).is_file():
                    h.update(f"{name}:{file_digest(Path(d) / name)}".encode())
            break
    probe = [tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
             sorted(tokenizer.stop_ids or []), list(tokenizer.encode(_PROBE))]  # fmt: skip
    try:
        probe.append(tokenizer.apply_chat_template(_PROBE_CHAT, add_generation_prompt=True))
    except Exception as e:  # noqa: BLE001 - a tokenizer without a chat template still gets a key
        probe.append(type(e).__name__)
    h.update(json.dumps(probe, ensure_ascii=False).encode())
    return h.hexdigest()


def cache_key(files: dict, tokenizer, cfg, rewriter: str = "") -> str:
    """files: {"train": Path, "validation": Path|None, ...}; cfg: the DataConfig; rewriter: what identifies
    data.augment's model (augment.model_fingerprint). With data.augment=none the augment_* settings are left
    out, so keys made before augmentation existed still hit."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HASHED}
    if cfg.augment == "none":
        settings = {k: v for k, v in settings.items() if not k.startswith("augment")}
    else:
        settings["rewriter"] = rewriter
    parts = {
        "version": CACHE_VERSION,
        "files": {name: file_digest(p) for name, p in files.items() if p is not None},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load(cache_dir, key: str):
    """(splits, report) from the cache, or None on a miss (or an unreadable entry)."""
    d = Path(cache_dir).expanduser() / key
    try:
        meta = json.loads((d / "meta.json").read_text())
        with np.load(d / "tokens.npz") as arrays:
            splits = {}
            for name, docs in meta["splits"].items():
                ids, labels, offsets = (arrays[f"{name}_{k}"] for k in ("input_ids", "labels", "offsets"))
                splits[name] = [
                    {"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist(), **doc}
                    for doc, a, b in zip(docs, offsets[:-1], offsets[1:])
                ]
    except (OSError, ValueError, KeyError):
        return None
    return splits, meta["report"]


def save(cache_dir, key: str, splits: dict, report: dict) -> Path:
    """Write atomically: a temporary directory renamed into place."""
    root = Path(cache_dir).expanduser()
    final, tmp = root / key, root / f"{key}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    arrays, docs = {}, {}
    for name, examples in splits.items():
        lengths = [len(ex["input_ids"]) for ex in examples]
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        for k in ("input_ids", "labels"):
            flat = [t for ex in examples for t in ex[k]]
            arrays[f"{name}_{k}"] = np.asarray(flat, dtype=np.int32)
        docs[name] = [{k: v for k, v in ex.items() if k not in ("input_ids", "labels")} for ex in examples]
    np.savez(tmp / "tokens.npz", **arrays)
    (tmp / "meta.json").write_text(json.dumps({"report": report, "splits": docs}, ensure_ascii=False))
    try:
        os.replace(tmp, final)
    except OSError:  # another process wrote the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return final
