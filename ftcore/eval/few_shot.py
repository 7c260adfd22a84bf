"""The prompting baseline: the base model with k training examples in context (eval.few_shot=k).

The k examples are drawn once from the training split (seeded by eval.few_shot_seed) and are the same for every
test item: the test prompt's system message, then each example as a user turn and its assistant answer, then the
test question. The splits are disjoint (ftcore/data/pipeline.py drops overlaps), so no test example is a shot.
"""

import random

from ftcore.data.format import split_prompt
from ftcore.errors import FtcoreError


def select_shots(train: list[dict], k: int, seed: int) -> list[int]:
    """Indices of the k training examples shown in every few-shot prompt (in the training split's order)."""
    if k > len(train):
        raise FtcoreError(f"eval.few_shot={k}: the training split has only {len(train)} examples")
    return sorted(random.Random(seed).sample(range(len(train)), k))


def with_shots(messages: list[dict], shots: list[dict]) -> list[dict]:
    """A prompt's messages (system, ..., the question) with the shots' turns before its question."""
    context = []
    for shot in shots:
        turns, answer = split_prompt(shot["messages"])
        context += [m for m in turns if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
    system = [m for m in messages if m["role"] == "system"]
    return system + context + [m for m in messages if m["role"] != "system"]
