"""Per-task answer extraction and metric choice (what generation-based evaluation compares).

    task        extract                                  metric (default)
    arithmetic  the last number (1,234 -> 1234; 7.50 -> 7.5)  accuracy
    tickets     the ticket label named in the text         f1
    rewrite     the text, whitespace-trimmed               rouge
    number      like arithmetic                            accuracy
    label       the label from data.labels named in it      f1
    text        like rewrite                               exact_match
"""

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

TICKET_LABELS = ("billing", "technical", "account", "shipping", "refund")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # number | label | text
    metric: str
    max_new_tokens: int  # enough for a full answer in the demo's format
    labels: tuple = ()


TASKS = {
    "arithmetic": Task("arithmetic", "number", "accuracy", 12),
    "tickets": Task("tickets", "label", "f1", 8, TICKET_LABELS),
    "rewrite": Task("rewrite", "text", "rouge", 48),
    "number": Task("number", "number", "accuracy", 32),
    "label": Task("label", "label", "f1", 16),
    "text": Task("text", "text", "exact_match", 128),
}


def get_task(cfg) -> Task:
    """The task of a DataConfig, with its metric and labels overridden where the config sets them."""
    task = TASKS[cfg.task]
    return Task(task.name, task.kind, cfg.metric or task.metric, task.max_new_tokens, tuple(cfg.labels) or task.labels)


def extract_number(text: str) -> str:
    """The last number in the text in canonical form ("" if none): "It costs $1,234.50." -> "1234.5"."""
    matches = _NUMBER.findall(text.split("####")[-1])  # GSM8K-style "#### 42" marks the final answer
    if not matches:
        return ""
    try:
        value = Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return ""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def normalize_label(text: str, labels=()) -> str:
    """The label a model's answer names: an exact (case/punctuation-insensitive) match, else the only
    label mentioned as a word in the first line, else the normalized first line (counted as wrong)."""
    first = _norm(text.strip().split("\n")[0]) if text.strip() else ""
    by_norm = {_norm(label): label for label in labels}
    if first in by_norm:
        return by_norm[first]
    words = f" {first} "
    named = [label for n, label in by_norm.items() if f" {n} " in words]
    return named[0] if len(named) == 1 else first


def extract_text(text: str) -> str:
    return " ".join(text.split())


def extract_answer(task: Task, text: str) -> str:
    """What is scored: apply the task's extraction to a model output (and to the reference)."""
    if task.kind == "number":
        return extract_number(text)
    if task.kind == "label":
        return normalize_label(text, task.labels)
    return extract_text(text)
