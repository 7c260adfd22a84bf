"""ROUGE-1/2/L/Lsum F-measures as rouge-score computes them (Google's reimplementation of ROUGE-1.5.5).

Matches `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
use_stemmer=...).score(reference, prediction)[key].fmeasure` per pair; `rouge()` averages over pairs.

    tokens:     lowercase, every run of non [a-z0-9] characters is a separator (so non-ASCII
                letters vanish); with stemming, Porter-stem tokens longer than 3 characters
    rougeN:     clipped n-gram overlap
    rougeL:     longest common subsequence of the whole texts
    rougeLsum:  texts split into sentences on "\\n"; union-LCS of each reference sentence
                against all predicted sentences, each token counted at most as often as it occurs
"""

import re
from collections import Counter
from collections.abc import Sequence

from ftcore.eval.porter import stem as porter_stem

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's default tokenizer."""
    tokens = _SEPARATORS.sub(" ", text.lower()).split()
    if use_stemmer:
        tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if t]


def _f_measure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngram_f(reference: list[str], prediction: list[str], n: int) -> float:
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    pred = Counter(tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1))
    overlap = sum(min(count, pred[ngram]) for ngram, count in ref.items())
    precision = overlap / max(sum(pred.values()), 1)
    recall = overlap / max(sum(ref.values()), 1)
    return _f_measure(precision, recall)


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    """table[i][j] = length of the LCS of a[:i] and b[:j]."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, start=1):
        row, above = table[i], table[i - 1]
        for j, y in enumerate(b, start=1):
            row[j] = above[j - 1] + 1 if x == y else max(above[j], row[j - 1])
    return table


def _lcs_f(reference: list[str], prediction: list[str]) -> float:
    if not reference or not prediction:
        return 0.0
    lcs = _lcs_table(reference, prediction)[-1][-1]
    return _f_measure(lcs / len(prediction), lcs / len(reference))


def _lcs_positions(a: list[str], b: list[str]) -> list[int]:
    """Positions in `a` of one LCS of `a` and `b`: the one rouge-score's backtrack picks
    (walking back from the end, step left in `b` only when that keeps a strictly longer LCS)."""
    table = _lcs_table(a, b)
    i, j = len(a), len(b)
    positions = []
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return positions[::-1]


def _lcs_sum_f(reference: list[list[str]], prediction: list[list[str]]) -> float:
    """Summary-level LCS (ROUGE paper, section 3.2) over sentence lists, as ROUGE-1.5.5 counts hits."""
    ref_len = sum(map(len, reference))
    pred_len = sum(map(len, prediction))
    if ref_len == 0 or pred_len == 0:
        return 0.0
    ref_left = Counter(t for sentence in reference for t in sentence)
    pred_left = Counter(t for sentence in prediction for t in sentence)

    hits = 0
    for ref_sentence in reference:
        union = set()
        for pred_sentence in prediction:
            union.update(_lcs_positions(ref_sentence, pred_sentence))
        for token in (ref_sentence[i] for i in sorted(union)):
            if ref_left[token] > 0 and pred_left[token] > 0:  # count each token at most as often as it occurs
                hits += 1
                ref_left[token] -= 1
                pred_left[token] -= 1
    return _f_measure(hits / pred_len, hits / ref_len)


def _sentences(text: str, use_stemmer: bool) -> list[list[str]]:
    return [tokenize(line, use_stemmer) for line in text.split("\n") if line]


def rouge_pair(prediction: str, reference: str, use_stemmer: bool = False) -> dict[str, float]:
    """F-measures of one prediction against one reference, keyed rouge1/rouge2/rougeL/rougeLsum."""
    ref, pred = tokenize(reference, use_stemmer), tokenize(prediction, use_stemmer)
    return {
        "rouge1": _ngram_f(ref, pred, 1),
        "rouge2": _ngram_f(ref, pred, 2),
        "rougeL": _lcs_f(ref, pred),
        "rougeLsum": _lcs_sum_f(_sentences(reference, use_stemmer), _sentences(prediction, use_stemmer)),
    }


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """Mean over pairs of rouge-score's F-measures (0-1) for rouge1, rouge2, rougeL, rougeLsum.

    For rougeLsum, put each sentence of a summary on its own line (rouge-score splits on "\\n").
    """
    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("rouge: no predictions")
    sums = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        for key, value in rouge_pair(prediction, reference, use_stemmer).items():
            sums[key] += value
    return {key: total / len(predictions) for key, total in sums.items()}
