"""What fine-tuning forgot: the loss on a general-text probe set before and after training.

    probe = make_probe(base_model, tokenizer, eval_cfg, model_path, cache_dir)   # before adapting
    base_loss = probe_loss(base_model, probe, device)
    ...
    report = forgetting_report(probe, base_loss, probe_loss(tuned_model, probe, device))

The default probe is text the base model writes itself: eval.forgetting_samples sequences of
eval.forgetting_tokens tokens sampled at temperature 1 from BOS (seeded by eval.forgetting_seed). For x drawn from
the base model p, the tuned model q's mean token loss on it minus p's is a Monte Carlo estimate of
KL(p || q) per token (E_p[log p - log q]): 0 for an unchanged model, and it grows with what the tuned model no
longer predicts of the base model's own distribution. The probes are cached (cache_dir/probes, keyed by the
model's files and the settings) so every run of a comparison measures the same text. eval.forgetting_path names
a corpus instead (a .jsonl of {"text": ...} or a text file, one document per non-empty line; the first
forgetting_samples documents, each cut to forgetting_tokens tokens): the reported number is then the loss
increase on that text.
"""

import hashlib
import json
from pathlib import Path

import torch

from ftcore.errors import FtcoreError
from ftcore.model.generate import generate
from ftcore.textfile import read_utf8


def model_files(model_ref) -> list[Path]:
    """The weight files behind a model reference (a directory, a .gguf file, pkg://..., a downloaded hub id)."""
    from ftcore.formats.hf import _local_ref, resolve

    path = Path(_local_ref(model_ref)).expanduser()
    if path.is_file():
        return [path]
    return sorted((path if path.is_dir() else resolve(model_ref)).glob("*.safetensors"))


def probe_key(model_ref, eval_cfg, tokenizer) -> str:
    """A cache key: the model's weight files (paths, sizes, mtimes) and the probe settings."""
    parts = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in model_files(model_ref)]
    what = [parts, eval_cfg.forgetting_samples, eval_cfg.forgetting_tokens, eval_cfg.forgetting_seed,
            tokenizer.bos_id, tokenizer.vocab_size]  # fmt: skip
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def make_probe(model, tokenizer, eval_cfg, model_ref=None, cache_dir: str = "", world=None) -> dict:
    """{"source": "sampled" | the corpus path, "ids": [[token ids]]}: what the forgetting loss is measured on."""
    if eval_cfg.forgetting_path:
        return {"source": eval_cfg.forgetting_path, "ids": corpus_ids(eval_cfg, tokenizer)}
    rank0 = world is None or world.rank == 0
    path = None
    if cache_dir and model_ref is not None:
        path = Path(cache_dir).expanduser() / "probes" / f"{probe_key(model_ref, eval_cfg, tokenizer)}.json"
        cached = read_cached(path) if rank0 else None
        cached = world.broadcast(cached) if world is not None else cached  # every rank measures rank 0's probe
        if cached is not None:
            return cached
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise FtcoreError("eval.forgetting: the tokenizer has no bos or eos token to sample the probe from; "
                          "set eval.forgetting_path to a corpus or eval.forgetting=false")  # fmt: skip
    was_training = model.training
    model.eval()
    new = generate(model, [[start]] * eval_cfg.forgetting_samples, eval_cfg.forgetting_tokens, temperature=1.0,
                   seed=eval_cfg.forgetting_seed, pad_id=tokenizer.pad_id or 0,
                   all_done=world.all if world is not None and world.distributed else None)  # fmt: skip
    model.train(was_training)
    probe = {"source": "sampled", "ids": [[start, *row] for row in new]}
    if path is not None and rank0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(probe))
        tmp.replace(path)
    return probe


def read_cached(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a damaged cache entry is sampled again


def corpus_ids(eval_cfg, tokenizer) -> list[list[int]]:
    """The first forgetting_samples documents of eval.forgetting_path, tokenized, BOS-prefixed, cut to length."""
    path = Path(eval_cfg.forgetting_path).expanduser()
    if not path.is_file():
        raise FtcoreError(f"eval.forgetting_path: {path} not found")
    docs = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except ValueError as e:
                raise FtcoreError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise FtcoreError(f"{path}:{n}: expected an object with a string 'text'")
            line = record["text"]
        docs.append(line)
        if len(docs) == eval_cfg.forgetting_samples:
            break
    if not docs:
        raise FtcoreError(f"eval.forgetting_path: {path} has no documents")
    start = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = [(start + tokenizer.encode(d, add_bos=False))[: eval_cfg.forgetting_tokens + 1] for d in docs]
    return [x for x in ids if len(x) > 1]


@torch.no_grad()
def probe_loss(model, probe: dict, device, batch_size: int = 8) -> float:
    """Mean next-token loss (nats) over the probe's tokens after the first of each sequence."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    by_length = {}
    for ids in probe["ids"]:
        by_length.setdefault(len(ids), []).append(ids)
    for group in by_length.values():  # equal lengths: no padding
        for start in range(0, len(group), batch_size):
            tokens = torch.tensor(group[start : start + batch_size], device=device)  # [B, T]
            loss, n = model(tokens[:, :-1], targets=tokens[:, 1:])
            total, count = total + loss.item(), count + int(n)
    model.train(was_training)
    return total / count


def forgetting_report(probe: dict, base_loss: float, tuned_loss: float) -> dict:
    """The numbers eval.json and the comparison table show."""
    sampled = probe["source"] == "sampled"
    return {"source": probe["source"], "sequences": len(probe["ids"]), "tokens": sum(len(x) - 1 for x in probe["ids"]),
            "base_loss": base_loss, "tuned_loss": tuned_loss, "increase": tuned_loss - base_loss,
            "estimates": "KL(base || tuned) per token" if sampled else "loss increase on the corpus"}  # fmt: skip
