"""Training-split augmentation: rewrite each prompt with a chat model and keep the answer.

    backtranslate   prompt --"Translate to {pivot}"--> pivot text --"Translate to {source}"--> rewrite
    paraphrase      prompt --"Rewrite in other words"--> rewrite

Only the last user message of an example (the prompt its final answer responds to) is rewritten; the
answer and every other message are kept. Generation is ftcore's own: batched, greedy, KV cache. A rewrite
is dropped (and counted under its reason, in this order) when it is
    empty         nothing left after stripping (or the pivot text was empty)
    identical     the prompt again, or, back-translated, the pivot text unchanged (casefold, whitespace-collapsed)
    untranslated  back-translated: it shares more words with the pivot text than with the prompt (still French)
    length        outside [1/r, r] times the prompt's length in characters, or cut off by the token budget
    numbers       its digit runs differ from the prompt's (a changed number changes the answer)
    question      the prompt ends with "?" and the rewrite has none (answered or summarised, not rewritten)
    clean         data.clean removes it (the rewrites are cleaned as the data was: HTML, whitespace, max_chars)
    duplicate     its prompt is already an example's prompt in any split (or an earlier rewrite's)
The survivors join the training split only; build_datasets calls this after the split, and only on a
cache miss, so the model is loaded only when the rewrites are not cached yet.
"""

import gc
import hashlib
import re
from pathlib import Path

import torch

from ftcore.data.cache import TOKENIZER_FILES, file_digest
from ftcore.data.clean import clean_examples, content_key
from ftcore.data.format import encode_prompt
from ftcore.data.split import split_key, unit_hash
from ftcore.errors import FtcoreError

INSTRUCTIONS = {
    "to_pivot": "Translate the following {source} text to {pivot}. Reply with the translation only.\n\n{text}",
    "back": "Translate the following {pivot} text to {source}. Reply with the translation only.\n\n{text}",
    "paraphrase": ("Rewrite the following text in other words. Keep its meaning, every number and every name. "
                   "Reply with the rewritten text only.\n\n{text}"),  # fmt: skip
}
DROP_REASONS = ("empty", "identical", "untranslated", "length", "numbers", "question", "clean", "duplicate")
AUGMENT_VERSION = 2  # in the data cache's key: bump when the instructions or the rules above change
SAMPLES = 8  # round trips kept in the report for a reader to judge
_QUOTES = ('""', "''", "“”", "«»")


def augment_examples(examples: list[dict], cfg, model_ref: str, device="cpu", dtype=torch.float32,
                     taken: set | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """(the surviving rewritten copies of `examples`, the report's "augment" entry).

    cfg: the DataConfig (augment_*); model_ref: the model that rewrites (a path, .gguf, pkg://... or hub id);
    taken: split_key(messages, "prompt") of every example in every split (rewrites matching one are dropped).
    """
    picked = [ex for ex in examples if last_user_turn(ex["messages"]) is not None  # a prompt to rewrite
              and picked_for(ex, cfg.seed, cfg.augment_fraction)]  # fmt: skip
    report = {"method": cfg.augment, "model": model_ref}
    if cfg.augment == "backtranslate":
        report["pivot"] = cfg.augment_pivot
    report.update({"augmented_candidates": len(picked), **{f"dropped_{r}": 0 for r in DROP_REASONS}, "added": 0})
    report["samples"] = []
    if not picked:
        return [], report
    model, tokenizer = load_rewriter(model_ref, device, dtype)
    turns = [last_user_turn(ex["messages"]) for ex in picked]
    prompts = [ex["messages"][t]["content"] for ex, t in zip(picked, turns)]
    fill = {"source": cfg.augment_source, "pivot": cfg.augment_pivot}
    if cfg.augment == "backtranslate":
        pivots = rewrite(model, tokenizer, prompts, INSTRUCTIONS["to_pivot"], fill, cfg)
        ok = [i for i, (text, cut) in enumerate(pivots) if text and not cut]
        back = dict(zip(ok, rewrite(model, tokenizer, [pivots[i][0] for i in ok], INSTRUCTIONS["back"], fill, cfg)))
        outputs = [back.get(i, ("", False)) for i in range(len(prompts))]
    else:
        pivots = None
        outputs = rewrite(model, tokenizer, prompts, INSTRUCTIONS["paraphrase"], fill, cfg)
    del model
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()

    taken = set() if taken is None else taken
    candidates = []
    for i, (ex, turn, prompt, (text, cut)) in enumerate(zip(picked, turns, prompts, outputs)):
        pivot, pivot_cut = pivots[i] if pivots else (None, False)
        if pivots and (not pivot or pivot_cut):
            reason, text = "empty" if not pivot else "length", None  # no back translation was made
        else:
            reason = drop_reason(prompt, text, cfg.augment_length_ratio, cfg.augment_keep_numbers, pivot, cut)
        messages = [dict(m, content=text) if j == turn else m for j, m in enumerate(ex["messages"])]
        if reason is None:
            candidates.append({**ex, "messages": messages, "where": f"{ex['where']} ({cfg.augment})",
                               "augmented": cfg.augment, "sample": i})  # fmt: skip
        else:
            report[f"dropped_{reason}"] += 1
        if i < SAMPLES:
            sample = {"prompt": prompt, **({"pivot": pivot} if pivots else {}), "rewrite": text, "dropped": reason}
            report["samples"].append(sample)
    # the rewrites are cleaned as the data was (data.clean), then compared with every split's prompts
    cleaned = {ex["sample"]: ex for ex in clean_examples(candidates, cfg.clean)[0]}
    added = []
    for ex in candidates:
        if ex["sample"] not in cleaned:
            reason = "clean"
        else:
            ex = cleaned[ex["sample"]]
            key = split_key(ex["messages"], "prompt")
            reason = "duplicate" if key in taken else None
            taken.add(key)
        if reason is None:
            added.append({k: v for k, v in ex.items() if k != "sample"})
        else:
            report[f"dropped_{reason}"] += 1
            if ex["sample"] < SAMPLES:
                report["samples"][ex["sample"]]["dropped"] = reason
    report["added"] = len(added)
    return added, report


def picked_for(example: dict, seed: int, fraction: float) -> bool:
    """Whether augment_fraction picks this example: a hash of (seed, its content), as the split draws."""
    return fraction >= 1 or unit_hash("augment\0" + content_key(example["messages"]), seed) < fraction


def drop_reason(original: str, rewrite: str, length_ratio: float, keep_numbers: bool = True,
                pivot: str | None = None, truncated: bool = False) -> str | None:  # fmt: skip
    """Why a rewrite of `original` is not kept (one of DROP_REASONS but duplicate), or None to keep it."""
    if not rewrite.strip() or not original.strip():
        return "empty"
    if _norm(rewrite) == _norm(original) or (pivot is not None and _norm(rewrite) == _norm(pivot)):
        return "identical"
    if pivot is not None and word_overlap(rewrite, pivot) > word_overlap(rewrite, original):
        return "untranslated"
    if truncated or not 1 / length_ratio <= len(rewrite.strip()) / len(original.strip()) <= length_ratio:
        return "length"
    if keep_numbers and numbers(rewrite) != numbers(original):
        return "numbers"
    if original.rstrip().endswith("?") and "?" not in rewrite:
        return "question"
    return None


def word_overlap(a: str, b: str) -> float:
    """Jaccard similarity of two texts' sets of casefolded words (letters and digits)."""
    wa, wb = (set(re.findall(r"\w+", t.casefold())) for t in (a, b))
    return len(wa & wb) / max(len(wa | wb), 1)


def numbers(text: str) -> list[str]:
    """The digit runs of a text as a sorted multiset ("3.5" and "3,5" both give ["3", "5"])."""
    return sorted(re.findall(r"\d+", text))


def clean_output(text: str, labels=()) -> str:
    """A generation without a leading "Translation:"/"French:"-style label or quotes wrapping all of it."""
    text = text.strip()
    for label in ("translation", "paraphrase", "rewritten text", *labels):
        if text.casefold().startswith(label.casefold() + ":"):
            text = text[len(label) + 1 :].strip()
            break
    if len(text) >= 2 and text[0] + text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def last_user_turn(messages: list[dict]) -> int | None:
    """Index of the last user message before the last assistant message (the prompt that is rewritten), or None."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return max((i for i, m in enumerate(messages[:last]) if m["role"] == "user"), default=None)


def rewrite(model, tokenizer, texts: list[str], instruction: str, fill: dict, cfg) -> list[tuple[str, bool]]:
    """[(the model's reply to instruction.format(text=...), whether it hit the token budget)] per text, greedy.

    A batch's budget is min(augment_max_new_tokens, 2 x augment_length_ratio x its longest text's tokens + 16):
    a reply that long would fail the length rule anyway (the 2x leaves room for languages that take more tokens).
    """
    from ftcore.model.generate import generate

    prompts = [encode_prompt([{"role": "user", "content": instruction.format(text=t, **fill)}], "chat", tokenizer)
               for t in texts]  # fmt: skip
    lengths = [len(tokenizer.encode(t, add_bos=False)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    out = [("", False)] * len(texts)
    labels = (fill["source"], fill["pivot"])
    for start in range(0, len(order), cfg.augment_batch_size):
        idx = order[start : start + cfg.augment_batch_size]
        budget = min(cfg.augment_max_new_tokens, int(2 * cfg.augment_length_ratio * max(lengths[i] for i in idx)) + 16)
        new = generate(model, [prompts[i] for i in idx], budget, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
        for i, ids in zip(idx, new):
            out[i] = (clean_output(tokenizer.decode(ids), labels), len(ids) >= budget)
    return out


def load_rewriter(model_ref: str, device, dtype):
    """(model in eval mode, tokenizer) of the rewriting model; it must have a chat template."""
    from ftcore.formats.hf import load_pretrained

    model, tokenizer = load_pretrained(model_ref, dtype=dtype, device=device)
    if not getattr(tokenizer, "chat_template", None):
        raise FtcoreError(f"data.augment_model={model_ref!r}: its tokenizer has no chat template; "
                          "augmentation prompts a chat (instruct) model")  # fmt: skip
    return model.eval(), tokenizer


def model_fingerprint(model_ref: str) -> str:
    """What identifies the rewriting model in the data cache's key, without loading it: a local directory's
    config.json and tokenizer files (bytes) and weight files (names, sizes, modification times); a file's name,
    size and modification time; else the reference itself (a hub repo id); and AUGMENT_VERSION."""
    from ftcore.formats.hf import _local_ref

    path = Path(_local_ref(model_ref)).expanduser()
    h = hashlib.sha256(f"augment v{AUGMENT_VERSION}".encode())
    if path.is_dir():
        for name in ("config.json", *TOKENIZER_FILES):
            if (path / name).is_file():
                h.update(f"{name}:{file_digest(path / name)}".encode())
        for weights in sorted(path.glob("*.safetensors")):
            h.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    elif path.is_file():
        h.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    else:
        h.update(f"ref:{model_ref}".encode())
    return h.hexdigest()


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())
