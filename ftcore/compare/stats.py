"""Uncertainty of a comparison: bootstrap confidence intervals, paired significance tests, Holm's correction.

Every task metric is a function of per-example statistics summed over the test set, so a resample of the
examples is a count vector w [n] and its metric agg(w @ C) [no re-scoring per resample]:

    accuracy / exact match   C[i] = [correct]                                   agg = sum / n
    ROUGE-L (rouge tasks)    C[i] = [F-measure of example i]                    agg = sum / n
    macro F1 (label tasks)   C[i] = [tp one-hot | predicted one-hot | reference one-hot] over the classes
                             agg = mean over classes with any prediction or reference of 2 tp / (pred + ref)
    BLEU                     C[i] = sacreBLEU's segment statistics               agg = BLEU of their sum

An arm's score is the mean over its seeds of each seed's test metric. All the numbers below come from one
seeded generator (`seed`), and every arm sees the same draws, so the comparisons are paired:

- interval: bootstrap over test examples and seeds: each of `resamples` draws n examples and S seeds with
  replacement; the 95% interval is the 2.5th-97.5th percentile of the resampled scores.
- difference A - B (every pair of arms, and each arm against each reference: the base model zero- and
  few-shot, one "seed" each): its interval from the same draws (A and B resampled together), and a two-sided p-value
  from a paired approximate-randomization test: each test example's predictions swap between A and B (in every
  seed at once) with probability 1/2, `permutations` times, p = (1 + #{|d*| >= |d|}) / (1 + permutations);
  every one of the 2^n swaps when that is at most `permutations` (p = #{|d*| >= |d|} / 2^n).
- Holm's step-down correction over all the differences of a table; a difference is marked significant when its
  adjusted p-value is below alpha.
"""

import itertools
from dataclasses import dataclass

import numpy as np

from ftcore.eval.bleu import bleu_from_stats, segment_stats
from ftcore.eval.metrics import normalize_text
from ftcore.eval.rouge import rouge_pair

CHUNK = 2048  # swaps scored at a time (memory: CHUNK x n)


@dataclass
class Outcomes:
    """One arm's per-example statistics: C [S seeds, n examples, K] and the metric over their sum."""

    stats: np.ndarray  # [S, n, K]
    metric: str  # accuracy | exact_match | rouge | f1 | bleu
    classes: int = 0  # f1: K = 3 x classes

    def score(self, weights: np.ndarray) -> np.ndarray:
        """The metric of each seed under example weights [R, n] -> [R, S]."""
        sums = np.einsum("rn,snk->rsk", weights, self.stats)  # [R, S, K]
        return aggregate(sums, self.metric, self.classes, weights.sum(-1)[:, None])


def aggregate(sums: np.ndarray, metric: str, classes: int, n: np.ndarray) -> np.ndarray:
    """The metric from summed statistics [R, S, K] of n examples ([R, 1]) -> [R, S]."""
    if metric == "f1":
        tp, pred, ref = sums[..., :classes], sums[..., classes : 2 * classes], sums[..., 2 * classes :]
        present = (pred + ref) > 0
        f1 = np.where(present, 2 * tp / np.maximum(pred + ref, 1), 0.0)
        return f1.sum(-1) / np.maximum(present.sum(-1), 1)
    if metric == "bleu":
        flat = sums.reshape(-1, sums.shape[-1])
        return np.array([bleu_from_stats([int(round(v)) for v in row]) for row in flat]).reshape(sums.shape[:-1])
    return sums[..., 0] / n


def classes_of(*runs: list[list[dict]]) -> list[str]:
    """Every answer any of these runs gave or expected: a label task's classes (an unparsable answer "" too), as
    classification_report counts them. Arms that are swap-tested against each other need the same list."""
    return sorted({r[key] for seeds in runs for rows in seeds for r in rows for key in ("prediction", "reference")})


def outcomes(metric: str, runs: list[list[dict]], classes: list[str] | None = None) -> Outcomes:
    """Outcomes from each seed's predictions.jsonl rows ({"prediction", "reference", ...}: the extracted answers),
    all over the same test examples in the same order. classes (f1): the shared class list (classes_of over every
    arm compared); default this arm's own."""
    if metric == "f1":
        index = {c: i for i, c in enumerate(classes or classes_of(runs))}
        k = len(index)
        stats = np.zeros((len(runs), len(runs[0]), 3 * k))
        for s, rows in enumerate(runs):
            for i, r in enumerate(rows):
                p, y = index[r["prediction"]], index[r["reference"]]
                stats[s, i, p] += p == y
                stats[s, i, k + p] += 1
                stats[s, i, 2 * k + y] += 1
        return Outcomes(stats, metric, k)
    if metric == "bleu":
        per = [[segment_stats(r["prediction"], [r["reference"]]) for r in rows] for rows in runs]
        return Outcomes(np.array(per, dtype=float), metric)
    if metric == "rouge":
        per = [[[rouge_pair(r["prediction"], r["reference"], use_stemmer=True)["rougeL"]] for r in rows]
               for rows in runs]  # fmt: skip
        return Outcomes(np.array(per, dtype=float), metric)
    same = (lambda p, r: normalize_text(p) == normalize_text(r)) if metric == "exact_match" else str.__eq__
    return Outcomes(np.array([[[same(r["prediction"], r["reference"])] for r in rows] for rows in runs], dtype=float),
                    metric)  # fmt: skip


@dataclass
class Draws:
    """The shared bootstrap draws: example counts [R, n] and seed indices [R, S]."""

    weights: np.ndarray
    seeds: np.ndarray


def draws(n: int, seeds: int, resamples: int, rng: np.random.Generator) -> Draws:
    idx = rng.integers(0, n, size=(resamples, n))
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.arange(resamples)[:, None], idx), 1.0)
    return Draws(weights, rng.integers(0, seeds, size=(resamples, seeds)))


def point(o: Outcomes) -> float:
    """The arm's score: the mean over seeds of the metric on all test examples."""
    return float(o.score(np.ones((1, o.stats.shape[1])))[0].mean())


def resampled(o: Outcomes, d: Draws) -> np.ndarray:
    """The arm's score under each draw [R]: the mean over the drawn seeds of the metric on the drawn examples.
    An arm with one seed (the base model) uses it for every drawn seed."""
    per_seed = o.score(d.weights)  # [R, S_arm]
    if per_seed.shape[1] not in (1, d.seeds.shape[1]):
        raise ValueError(f"resampled: an arm with {per_seed.shape[1]} seeds among arms of {d.seeds.shape[1]}")
    seeds = d.seeds if per_seed.shape[1] == d.seeds.shape[1] else np.zeros_like(d.seeds)
    return np.take_along_axis(per_seed, seeds, axis=1).mean(1)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def swap_test(a: Outcomes, b: Outcomes, permutations: int, rng: np.random.Generator) -> float:
    """Two-sided p-value of score(a) - score(b) by swapping each example's predictions between a and b."""
    n = a.stats.shape[1]
    if a.stats.shape[2] != b.stats.shape[2] or a.classes != b.classes:
        raise ValueError("swap_test: the arms' statistics differ in shape (build f1 outcomes over shared classes)")
    sa, sb = a.stats, b.stats
    if sa.shape[0] != sb.shape[0]:  # one side has one seed (the base model): the same predictions in every seed
        sa, sb = np.broadcast_arrays(sa, sb)
    diff, total_a, total_b = sb - sa, sa.sum(1), sb.sum(1)  # [S, n, K], [S, K], [S, K]
    exact = 2**n <= permutations
    d = []  # the difference of the seed means under each swap, the identity first
    for start in range(0, 2**n if exact else permutations + 1, CHUNK):
        if exact:  # every swap: row r flips the examples of r's binary digits
            r = np.arange(start, min(start + CHUNK, 2**n))
            flips = ((r[:, None] >> np.arange(n)[::-1]) & 1).astype(float)  # [R, n]
        else:
            size = min(CHUNK, permutations + 1 - start)
            flips = rng.integers(0, 2, size=(size, n)).astype(float)
            if start == 0:
                flips[0] = 0.0  # the identity
        delta = np.einsum("rn,snk->rsk", flips, diff)  # [R, S, K]: what the swaps move from b to a
        n_col = np.full((len(flips), 1), float(n))
        d.append((aggregate(total_a + delta, a.metric, a.classes, n_col)
                  - aggregate(total_b - delta, b.metric, b.classes, n_col)).mean(1))  # fmt: skip
    d = np.concatenate(d)
    extreme = np.abs(d[1:]) >= abs(d[0]) * (1 - 1e-12) - 1e-15
    if exact:
        return float((1 + extreme.sum()) / len(d))  # the identity counts as one of the 2^n
    return float((1 + extreme.sum()) / (1 + permutations))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def compare_arms(arms: dict[str, Outcomes], references: dict[str, Outcomes] | None = None, resamples: int = 2000,
                 permutations: int = 10000, seed: int = 0, alpha: float = 0.05) -> dict:  # fmt: skip
    """Per arm and reference {score, ci}; per pair (each arm vs the others and vs each reference) {diff, ci, p,
    p_holm, significant}. Every arm covers the same test examples with the same number of seeds; a reference
    (the base model) has one."""
    rng = np.random.default_rng(seed)
    first = next(iter(arms.values()))
    n, seeds = first.stats.shape[1], max(o.stats.shape[0] for o in arms.values())
    d = draws(n, seeds, resamples, rng)
    references = references or {}
    everyone = {**arms, **references}
    samples = {name: resampled(o, d) for name, o in everyone.items()}
    per_arm = {name: {"score": point(o), "ci": interval(samples[name])} for name, o in everyone.items()}
    names = list(arms)
    pairs = list(itertools.combinations(names, 2)) + [(a, ref) for ref in references for a in names]
    rows = []
    for a, b in pairs:
        diff = per_arm[a]["score"] - per_arm[b]["score"]
        rows.append({"a": a, "b": b, "diff": diff, "ci": interval(samples[a] - samples[b]),
                     "p": swap_test(everyone[a], everyone[b], permutations, rng)})  # fmt: skip
    for row, p in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"], row["significant"] = p, p < alpha
    return {"arms": per_arm, "pairs": rows, "resamples": resamples, "permutations": permutations, "seed": seed,
            "alpha": alpha}  # fmt: skip
