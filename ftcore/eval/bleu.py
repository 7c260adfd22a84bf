"""Corpus BLEU with sacreBLEU's defaults: 13a tokenization, exp smoothing, brevity penalty, 4-grams.

Matches `sacrebleu.corpus_bleu(predictions, [references]).score` (sacreBLEU 2.x, default arguments):

    per segment:  tokenize (mteval-v13a) -> n-gram counts, clipped by the max count over references
                  -> (hyp_len, closest ref_len, matches[1..4], totals[1..4])
    corpus:       sum the segment statistics -> BLEU = BP * exp(mean_n log p_n) * 100
"""

import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_ORDER = 4

# mteval-v13a splits off every ASCII symbol except the apostrophe, hyphen, period and comma
# (those three are handled by the digit-aware rules below). The space is in the set too; harmless.
_SYMBOLS = "{|}~" + "[\\]^_`" + ' !"#$%&' + "()*+" + ":;<=>?@" + "/"
_V13A_RULES = [
    (re.compile("([" + re.escape(_SYMBOLS) + "])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # hyphen after a digit
]
_ENTITIES = [("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")]


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a tokenization as sacreBLEU does it (after its `rstrip()` of the segment)."""
    line = line.rstrip()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _ENTITIES:
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _V13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: list[str]) -> Counter:
    """Counts of all 1..MAX_ORDER-grams of `tokens`, keyed by token tuples."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def _closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length closest to the hypothesis length; the shorter one on a tie."""
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def segment_stats(prediction: str, references: list[str]) -> list[int]:
    """[hyp_len, ref_len, matches_1..4, totals_1..4] for one segment (sacreBLEU's sufficient statistics)."""
    hyp = tokenize_13a(prediction)
    ref_tokens = [tokenize_13a(ref) for ref in references]
    ref_counts = _ngrams(ref_tokens[0])
    for tokens in ref_tokens[1:]:  # several references: clip by the highest count in any of them
        for ngram, count in _ngrams(tokens).items():
            ref_counts[ngram] = max(ref_counts[ngram], count)

    matches = [0] * MAX_ORDER
    totals = [0] * MAX_ORDER
    for ngram, count in _ngrams(hyp).items():
        totals[len(ngram) - 1] += count
        matches[len(ngram) - 1] += min(count, ref_counts.get(ngram, 0))
    return [len(hyp), _closest_ref_len(len(hyp), [len(t) for t in ref_tokens]), *matches, *totals]


def bleu_from_stats(stats: Sequence[int]) -> float:
    """BLEU (0-100) from summed segment statistics, with sacreBLEU's 'exp' smoothing.

    'exp' smoothing (NIST, mteval-v13a): the k-th order with no match gets precision
    1 / (2^k * total) instead of 0.
    """
    hyp_len, ref_len = stats[0], stats[1]
    matches, totals = stats[2 : 2 + MAX_ORDER], stats[2 + MAX_ORDER :]
    if not any(matches):
        return 0.0
    brevity_penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)

    log_precisions = 0.0
    smoothing = 1.0
    for n in range(MAX_ORDER):
        if totals[n] == 0:  # the hypotheses have no n-grams this long: sacreBLEU floors log(0), BLEU = 0
            return 0.0
        if matches[n] == 0:
            smoothing *= 2
            precision = 100.0 / (smoothing * totals[n])
        else:
            precision = 100.0 * matches[n] / totals[n]
        log_precisions += math.log(precision)
    return brevity_penalty * math.exp(log_precisions / MAX_ORDER)


def bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str | None]]) -> float:
    """Corpus BLEU (0-100), equal to `sacrebleu.corpus_bleu(predictions, [references]).score`.

    `references` is one reference per prediction (list[str]), or several reference streams in
    sacreBLEU's layout: `[refs_a, refs_b, ...]`, each as long as `predictions`; a `None` entry
    in a stream means that prediction has fewer references.
    """
    if len(predictions) == 0 or len(references) == 0:
        raise ValueError(f"bleu: {len(predictions)} predictions and {len(references)} references; need both")
    streams = [references] if isinstance(references[0], str) else list(references)
    for k, stream in enumerate(streams):
        if len(stream) != len(predictions):
            raise ValueError(f"bleu: reference stream {k} has {len(stream)} entries, expected {len(predictions)}")

    totals = [0] * (2 + 2 * MAX_ORDER)
    for i, prediction in enumerate(predictions):
        refs = [stream[i] for stream in streams if stream[i] is not None]
        if not refs:
            raise ValueError(f"bleu: prediction {i} has no reference")
        for j, value in enumerate(segment_stats(prediction, refs)):
            totals[j] += value
    return bleu_from_stats(totals)
