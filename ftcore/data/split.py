"""Seeded, order-independent train/validation/test split.

Each example's split is decided by hashing (seed, its content) into [0, 1) and comparing with the
cumulative fractions, so an example lands in the same split for a given seed however the file is
ordered, and identical examples (or, with split_by="prompt", identical prompts) always land together.
"""

import hashlib

from ftcore.data.clean import content_key
from ftcore.data.config import SPLIT_NAMES


def split_key(messages: list[dict], by: str = "example") -> str:
    """The text that decides the split: the whole conversation, or everything before its last answer."""
    if by == "prompt":
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last]
    return content_key(messages)


def unit_hash(key: str, seed: int) -> float:
    """A stable number in [0, 1) from (seed, key): the same on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(examples: list[dict], fractions, seed: int, by: str = "example") -> dict[str, list[dict]]:
    """{"train", "validation", "test"} lists (file order kept within each); fractions sum to 1."""
    total = float(sum(fractions))
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f / total
        bounds.append(acc)
    splits = {name: [] for name in SPLIT_NAMES}
    for ex in examples:
        u = unit_hash(split_key(ex["messages"], by), seed)
        i = next((i for i, b in enumerate(bounds) if u < b and fractions[i] > 0), None)
        if i is None:  # u past the last bound by rounding: the last split with a positive fraction
            i = max(j for j, f in enumerate(fractions) if f > 0)
        splits[SPLIT_NAMES[i]].append(ex)
    return splits
