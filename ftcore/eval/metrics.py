"""Evaluation metrics: perplexity, exact match, classification report, BLEU, ROUGE.

Plain Python; each function names the reference implementation it reproduces. BLEU and ROUGE live
in `bleu.py` / `rouge.py` (with the Porter stemmer in `porter.py`) and are re-exported here.
"""

import math
from collections import Counter
from collections.abc import Hashable, Sequence

from ftcore.eval.bleu import bleu
from ftcore.eval.rouge import rouge

__all__ = [
    "bleu",
    "classification_report",
    "exact_match",
    "normalize_text",
    "perplexity",
    "perplexity_from_losses",
    "rouge",
]


def perplexity(total_loss: float, total_tokens: int) -> float:
    """exp(total_loss / total_tokens): exp of the token-weighted mean negative log-likelihood.

    `total_loss` is the summed NLL (nats) over `total_tokens` predicted tokens, so batches of
    different sizes are weighted by their tokens, as in the training loop's eval loss.
    """
    total_tokens = int(total_tokens)
    if total_tokens <= 0:
        raise ValueError(f"perplexity: total_tokens must be positive, got {total_tokens}")
    try:
        return math.exp(float(total_loss) / total_tokens)
    except OverflowError:  # mean NLL above ~709.78 nats
        return math.inf


def perplexity_from_losses(losses: Sequence[float], num_tokens: Sequence[int] | None = None) -> float:
    """Perplexity from per-batch mean losses, each weighted by its token count.

    `losses[i]` is the mean NLL over `num_tokens[i]` tokens; with `num_tokens=None` every loss
    counts once (e.g. per-token losses).
    """
    if num_tokens is None:
        num_tokens = [1] * len(losses)
    if len(losses) != len(num_tokens):
        raise ValueError(f"perplexity_from_losses: {len(losses)} losses but {len(num_tokens)} token counts")
    total_loss = math.fsum(float(loss) * int(n) for loss, n in zip(losses, num_tokens))
    return perplexity(total_loss, sum(int(n) for n in num_tokens))


def normalize_text(text: str) -> str:
    """Strip, lowercase and collapse every whitespace run to one space."""
    return " ".join(text.lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Fraction (0-1) of predictions equal to their reference, after `normalize_text` if `normalize`."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("exact_match: no predictions")
    prep = normalize_text if normalize else (lambda s: s)
    return sum(prep(p) == prep(r) for p, r in zip(predictions, references)) / len(predictions)


def _safe_div(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _sorted_classes(classes: set) -> list:
    try:
        return sorted(classes)
    except TypeError:  # mixed label types (e.g. int and str)
        return sorted(classes, key=repr)


def classification_report(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> dict:
    """Accuracy and precision/recall/F1 (macro, micro, per class) for single-label classification.

    Same numbers as scikit-learn's `precision_recall_fscore_support(labels, predictions,
    average=..., zero_division=0)` and `accuracy_score`:
      - classes are the union of `labels` and `predictions`, sorted; a class never predicted has
        precision 0, a class never in `labels` (support 0) has recall 0, and F1 is 0 when both are 0;
      - macro = unweighted mean over those classes (macro F1 is the mean of per-class F1s,
        not the F1 of macro precision and recall);
      - micro pools every decision; with one label per example it equals accuracy.

    Returns:
        {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
         "recall_micro", "f1_micro": float, "support": int (number of examples),
         "per_class": {class: {"precision", "recall", "f1": float, "support": int}}}
    """
    if len(predictions) != len(labels):
        raise ValueError(f"classification_report: {len(predictions)} predictions but {len(labels)} labels")
    if len(predictions) == 0:
        raise ValueError("classification_report: no predictions")

    true_pos = Counter(p for p, y in zip(predictions, labels) if p == y)
    predicted = Counter(predictions)  # tp + fp per class
    support = Counter(labels)  # tp + fn per class

    per_class = {}
    for cls in _sorted_classes(set(predicted) | set(support)):
        tp = true_pos[cls]
        per_class[cls] = {
            "precision": _safe_div(tp, predicted[cls]),
            "recall": _safe_div(tp, support[cls]),
            "f1": _safe_div(2 * tp, predicted[cls] + support[cls]),  # = 2PR / (P + R)
            "support": support[cls],
        }

    def macro(key: str) -> float:
        return sum(stats[key] for stats in per_class.values()) / len(per_class)

    tp_all, n = sum(true_pos.values()), len(labels)
    precision_micro = _safe_div(tp_all, sum(predicted.values()))
    recall_micro = _safe_div(tp_all, sum(support.values()))
    return {
        "accuracy": tp_all / n,
        "precision_macro": macro("precision"),
        "recall_macro": macro("recall"),
        "f1_macro": macro("f1"),
        "precision_micro": precision_micro,
        "recall_micro": recall_micro,
        "f1_micro": _safe_div(2 * precision_micro * recall_micro, precision_micro + recall_micro),
        "support": n,
        "per_class": per_class,
    }
