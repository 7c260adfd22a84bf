"""The comparison's uncertainty (ftcore/compare/stats.py) against direct computations and scipy (test-only)."""

import itertools

import numpy as np
import pytest

from ftcore.compare import stats
from ftcore.eval.metrics import bleu, classification_report, rouge

scipy_stats = pytest.importorskip("scipy.stats")


def rows(predictions, references):
    return [{"prediction": p, "reference": r} for p, r in zip(predictions, references)]


def random_labels(n, seeds, p_right, seed):
    """Per seed, label-task predictions right with probability p_right (else a random other class)."""
    rng = np.random.default_rng(seed)
    refs = [str(x) for x in rng.integers(0, 4, n)]
    runs = []
    for _ in range(seeds):
        preds = [r if rng.random() < p_right else str(rng.integers(0, 5)) for r in refs]
        runs.append(rows(preds, refs))
    return runs


def test_every_metric_from_summed_statistics_equals_the_scorer():
    runs = random_labels(40, 3, 0.6, 0)
    f1 = stats.outcomes("f1", runs)
    want = np.mean([classification_report([r["prediction"] for r in rs], [r["reference"] for r in rs])["f1_macro"]
                    for rs in runs])  # fmt: skip
    assert stats.point(f1) == pytest.approx(want, abs=1e-12)
    acc = stats.outcomes("accuracy", runs)
    assert stats.point(acc) == pytest.approx(np.mean([[r["prediction"] == r["reference"] for r in rs] for rs in runs]))
    text = rows(["the cat sat on the mat", "a dog ran", "hello there world", ""],
                ["the cat is on the mat", "the dog ran fast", "hello world", "nothing"])  # fmt: skip
    preds, refs = [r["prediction"] for r in text], [r["reference"] for r in text]
    assert stats.point(stats.outcomes("bleu", [text])) == pytest.approx(bleu(preds, refs), abs=1e-9)
    assert stats.point(stats.outcomes("rouge", [text])) == pytest.approx(rouge(preds, refs, True)["rougeL"], abs=1e-12)
    em = rows(["  Paris ", "rome"], ["paris", "Madrid"])
    assert stats.point(stats.outcomes("exact_match", [em])) == 0.5


def test_bootstrap_interval_equals_a_direct_resampling_loop():
    """The same generator draws, scored by classification_report per resample (no summed statistics)."""
    a_runs, b_runs = random_labels(30, 3, 0.7, 1), random_labels(30, 3, 0.5, 1)  # the same references
    result = stats.compare_arms({"a": stats.outcomes("f1", a_runs), "b": stats.outcomes("f1", b_runs)},
                                resamples=300, permutations=200, seed=5)  # fmt: skip
    rng = np.random.default_rng(5)
    idx, seeds = rng.integers(0, 30, size=(300, 30)), rng.integers(0, 3, size=(300, 3))

    def f1(rs, ex):
        return classification_report([rs[i]["prediction"] for i in ex], [rs[i]["reference"] for i in ex])["f1_macro"]

    direct = {name: np.array([np.mean([f1(runs[s], idx[k]) for s in seeds[k]]) for k in range(300)])
              for name, runs in (("a", a_runs), ("b", b_runs))}  # fmt: skip
    for name in ("a", "b"):
        lo, hi = np.percentile(direct[name], [2.5, 97.5])
        assert result["arms"][name]["ci"] == pytest.approx((lo, hi), abs=1e-12)
    lo, hi = np.percentile(direct["a"] - direct["b"], [2.5, 97.5])
    assert result["pairs"][0]["ci"] == pytest.approx((lo, hi), abs=1e-12)


def test_bootstrap_interval_agrees_with_scipy():
    """One seed, accuracy: scipy's percentile bootstrap of the mean (other draws: equal within Monte Carlo error)."""
    rng = np.random.default_rng(2)
    correct = (rng.random(200) < 0.4).astype(float)
    run = rows([str(int(c)) for c in correct], ["1"] * 200)
    ours = stats.compare_arms({"a": stats.outcomes("accuracy", [run])}, resamples=20000, seed=0)["arms"]["a"]["ci"]
    theirs = scipy_stats.bootstrap((correct,), np.mean, n_resamples=20000, method="percentile", random_state=0)
    assert ours == pytest.approx((theirs.confidence_interval.low, theirs.confidence_interval.high), abs=0.01)
    assert ours[0] < correct.mean() < ours[1] and ours[1] - ours[0] == pytest.approx(2 * 1.96 * 0.0346, abs=0.01)


def test_exact_swap_test_equals_scipys_paired_permutation_test():
    """n = 12 examples: every one of the 2^12 swaps; scipy's exact paired (sign-flip) test of the mean difference."""
    rng = np.random.default_rng(3)
    a = (rng.random(12) < 0.75).astype(float)
    b = (rng.random(12) < 0.35).astype(float)
    runs_a, runs_b = [rows([str(int(x)) for x in a], ["1"] * 12)], [rows([str(int(x)) for x in b], ["1"] * 12)]
    p = stats.swap_test(stats.outcomes("accuracy", runs_a), stats.outcomes("accuracy", runs_b), 10**6,
                        np.random.default_rng(0))  # fmt: skip
    theirs = scipy_stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                          n_resamples=np.inf, alternative="two-sided")  # fmt: skip
    assert p == pytest.approx(theirs.pvalue, abs=1e-12)
    assert 0 < p < 0.2  # a real test, not a degenerate one
    # and by brute force over the swaps
    diffs = [np.mean(np.where(f, b - a, a - b)) for f in itertools.product((0, 1), repeat=12)]
    assert p == pytest.approx(np.mean(np.abs(diffs) >= abs(np.mean(a - b)) - 1e-12), abs=1e-12)


def test_random_swap_test_is_near_the_exact_one_and_identical_arms_are_not_different():
    rng = np.random.default_rng(4)
    refs = ["1"] * 300
    a = rows([str(int(x)) for x in rng.random(300) < 0.55], refs)
    b = rows([str(int(x)) for x in rng.random(300) < 0.45], refs)
    oa, ob = stats.outcomes("accuracy", [a]), stats.outcomes("accuracy", [b])
    p = stats.swap_test(oa, ob, 20000, np.random.default_rng(0))
    x = np.array([r["prediction"] == "1" for r in a], float) - np.array([r["prediction"] == "1" for r in b], float)
    theirs = scipy_stats.permutation_test((x,), np.mean, permutation_type="samples", n_resamples=20000,
                                          alternative="two-sided", random_state=0).pvalue  # fmt: skip
    assert p == pytest.approx(theirs, abs=0.01)
    assert stats.swap_test(oa, oa, 2000, np.random.default_rng(0)) == 1.0


def test_holm_on_known_p_values():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    assert stats.holm([0.001]) == [0.001]


def test_compare_arms_marks_a_real_difference_and_not_noise():
    refs = [str(i % 3) for i in range(150)]
    rng = np.random.default_rng(6)
    good = [rows([r if rng.random() < 0.9 else "x" for r in refs], refs) for _ in range(3)]
    bad = [rows([r if rng.random() < 0.4 else "x" for r in refs], refs) for _ in range(3)]
    twin = bad[1:] + bad[:1]  # the same runs under other seeds: a difference of exactly 0
    base = rows([r if rng.random() < 0.3 else "x" for r in refs], refs)
    arms = {k: stats.outcomes("accuracy", v) for k, v in (("good", good), ("bad", bad), ("twin", twin))}
    result = stats.compare_arms(arms, {"base model": stats.outcomes("accuracy", [base])}, resamples=500,
                                permutations=2000)  # fmt: skip
    marks = {(p["a"], p["b"]): p["significant"] for p in result["pairs"]}
    assert marks[("good", "bad")] and marks[("good", "base model")] and not marks[("bad", "twin")]
    assert result["arms"]["good"]["ci"][0] > result["arms"]["base model"]["ci"][1]
    assert all(p["p_holm"] >= p["p"] for p in result["pairs"])


def test_f1_swap_test_over_shared_classes_equals_brute_force():
    """Two arms whose answers name different classes (one answers "" or free text): over a shared class list the
    exact swap test equals classification_report over every one of the 2^8 swaps."""
    refs = ["billing", "refund", "billing", "shipping", "refund", "billing", "shipping", "refund"]
    a = rows(["billing", "refund", "refund", "shipping", "refund", "billing", "", "refund"], refs)
    b = rows(["billing", "other", "", "shipping", "billing", "", "", "account"], refs)
    classes = stats.classes_of([a], [b])
    oa, ob = stats.outcomes("f1", [a], classes), stats.outcomes("f1", [b], classes)
    p = stats.swap_test(oa, ob, 10**6, np.random.default_rng(0))

    def f1(rs):
        return classification_report([r["prediction"] for r in rs], [r["reference"] for r in rs])["f1_macro"]

    observed = f1(a) - f1(b)
    swapped = []
    for flips in itertools.product((0, 1), repeat=8):
        x = [rb if f else ra for ra, rb, f in zip(a, b, flips)]
        y = [ra if f else rb for ra, rb, f in zip(a, b, flips)]
        swapped.append(f1(x) - f1(y))
    assert stats.point(oa) - stats.point(ob) == pytest.approx(observed, abs=1e-12)
    assert p == pytest.approx(np.mean(np.abs(swapped) >= abs(observed) - 1e-12), abs=1e-12)
    with pytest.raises(ValueError, match="shared classes"):
        stats.swap_test(stats.outcomes("f1", [a]), stats.outcomes("f1", [b]), 100, np.random.default_rng(0))
