"""Per-task answer extraction and metric choice (what generation-based evaluation compares).

    task        extract                                             metric (default)
    arithmetic  the final number, exact (-1/113; $1,234.50 -> 1234.5)  accuracy
    tickets     the ticket label named in the text                  f1
    rewrite     the text, whitespace-trimmed                        rouge
    number      like arithmetic                                     accuracy
    label       the label from data.labels named in it              f1
    text        like rewrite                                        exact_match
"""

import re
from dataclasses import dataclass
from fractions import Fraction

TICKET_LABELS = ("billing", "technical", "account", "shipping", "refund")

# 1234 | 1,234 (groups of exactly 3) | 3.50 | .5; a trailing sentence period is not a decimal point
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# [sign][$]digits[e exponent][/digits]; a sign only where no digit, letter, "." or ")" precedes it (3-5, 2024-05-01)
_NUMBER = re.compile(rf"(?:(?<![\w.)\]])(?P<sign>[+-]))?\$?(?<![\d.])(?P<num>{_DIGITS})(?:[eE](?P<exp>[+-]?\d+))?"
                     rf"(?:/(?P<den>{_DIGITS}))?")  # fmt: skip
_FRAC = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")  # \frac{1}{2}, \dfrac12
_TIMES_TEN = re.compile(r"(?<=\d)\s*(?:\\times|\\cdot|×|\*)\s*10\^\{?([+-]?\d+)\}?")  # 2.5 \times 10^{4}
_MAX_EXPONENT = 1000  # 1e99999 is no answer (and its digits would not fit a string)


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


def _boxed(text: str) -> str:
    """The content of the last \\boxed{...} (braces balanced), or the text itself if it has none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    depth, first = 0, start + len("\\boxed{")
    for i in range(first - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[first:i]
    return text[first:]  # unclosed: all that follows


def _plain(text: str) -> str:
    """The text with LaTeX numbers written plainly: -\\frac{1}{113} -> -1/113, 1{,}234 -> 1,234, 10^{4} -> e4."""
    text = text.replace("\u2212", "-").replace("{,}", ",")  # the unicode minus sign; LaTeX's thousands comma
    text = _FRAC.sub(lambda m: f"{m[1].strip('{} ')}/{m[2].strip('{} ')}", text)
    return _TIMES_TEN.sub(lambda m: f"e{m[1]}", text)


def _value(match: re.Match) -> Fraction:
    """The exact value of one _NUMBER match (ValueError or ZeroDivisionError if it has none)."""
    exponent = int(match["exp"] or 0)
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} is out of range")
    value = Fraction(match["num"].replace(",", "")) * Fraction(10) ** exponent
    if match["den"]:
        value /= Fraction(match["den"].replace(",", ""))
    return -value if match["sign"] == "-" else value


def canonical_number(value: Fraction) -> str:
    """The one string of an exact value: an integer "-12", else a finite decimal "3.5", else a reduced "-1/113"."""
    p, q = value.numerator, value.denominator
    if q == 1:
        return str(p)
    twos, fives, rest = 0, 0, q
    while rest % 2 == 0:
        twos, rest = twos + 1, rest // 2
    while rest % 5 == 0:
        fives, rest = fives + 1, rest // 5
    if rest != 1:
        return f"{p}/{q}"
    places = max(twos, fives)  # the fewest decimal places that write p/q exactly
    digits = str(abs(p) * 10**places // q).rjust(places + 1, "0")
    return f"{'-' if p < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def extract_number(text: str) -> str:
    """The final number in the text, exact and in canonical form (canonical_number; "" if none).

    The answer is what follows the last GSM8K-style "####" (else the whole text), and in it the last \\boxed{...} if
    any; its last number counts: "-1/113", "-\\frac{1}{113}", "$1,234.50", "1e-3", "2.5E+4", "+7", "50%" (read as 50).
    Numerically equal answers give the same string: "0.5", "1/2", "2/4", "\\frac{1}{2}" and "5e-1" are all "0.5".
    """
    matches = list(_NUMBER.finditer(_plain(_boxed(text.split("####")[-1]))))
    if not matches:
        return ""
    try:
        return canonical_number(_value(matches[-1]))
    except (ValueError, ZeroDivisionError):  # 1/0, an exponent out of range, digits beyond int's string limit
        return ""


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
