"""Metrics against their references: sacreBLEU, rouge-score, NLTK's Porter stemmer, hand-computed cases."""

import ast
import math
import random
from pathlib import Path

import pytest
import torch

from ftcore.eval import metrics, porter
from ftcore.eval.bleu import tokenize_13a
from ftcore.eval.rouge import ROUGE_KEYS, tokenize

# ---------------------------------------------------------------- random test sentences

_WORDS = (  # noqa: SIM905  (a word list reads better as one string)
    "the a an of to in on at by for with from and or but not is was are were be been it this that "
    "cat dog house river city model data train trains trained training test tested testing eval "
    "run running runs ran happy happiness happily relational conditional generalization hopefulness "
    "studies studied study flies flying agreed agreement controlling controlled national rational "
    "connection connections connected connective electrical electricity sensitivity formality "
    "adjustable adjustment replacement dependent adoption communism activate effective bowdlerize "
    "probate rate cease controll roll sky skies dying lying news innings proceed exceed succeeding "
    "geology archaeology fully hopefully analogously operator feudalism callousness decisiveness"
).split()
_ODD_TOKENS = [
    "don't", "it's", "O'Neil", "rock'n'roll", "state-of-the-art", "e-mail", "U.S.", "Ph.D.", "3.14", "1,000",
    "42", "-5", "10-20", "2024-01-31", "$5", "50%", "&amp;", "&quot;hi&quot;", "&lt;tag&gt;", "<tag>", "C++",
    "x/y", "a_b", "#hash", "@user", "naïve", "café", "Zürich", "ÉCOLE", "x=1;", "[1]", "{k:v}", "~approx",
    "<skipped>", "end-\nline", "...", "--", "'quoted'", '"quoted"', "(paren)", "1.5.2", ".5", "5.", ",x",
]  # fmt: skip
_PUNCT = [",", ".", "!", "?", ";", ":", "...", "'", '"', ")", " -", " --"]
_EDGE = ["", " ", "\n", ".", "...", "!!!", "a", "A", "\n\nfoo bar\n\n", "x\ny\nz", "  lots   of \t space  ", "-\n"]


def _sentence(rng: random.Random, n_words: int) -> str:
    out = []
    for _ in range(n_words):
        word = rng.choice(_ODD_TOKENS) if rng.random() < 0.12 else rng.choice(_WORDS)
        case = rng.random()
        word = word.capitalize() if case < 0.15 else word.upper() if case < 0.2 else word
        if rng.random() < 0.12:
            word += rng.choice(_PUNCT)
        out.append(word)
    text = ""
    for word in out:  # mostly single spaces, sometimes newlines (rougeLsum sentences) or odd whitespace
        sep = rng.choices([" ", "\n", "  ", "\t", " \n "], weights=[88, 6, 2, 2, 2])[0]
        text = text + sep + word if text else word
    return text + rng.choice(["", "", ".", " .", "!", "\n", " "])


def _perturb(rng: random.Random, text: str) -> str:
    """A noisy copy: some words dropped, replaced, inserted, swapped or re-cased."""
    words, out = text.split(" "), []
    for word in words:
        r = rng.random()
        if r < 0.1:
            continue
        if r < 0.2:
            word = rng.choice(_WORDS)
        elif r < 0.25:
            word = word.swapcase()
        out.append(word)
        if rng.random() < 0.07:
            out.append(rng.choice(_WORDS + _ODD_TOKENS))
    if len(out) > 2 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def _make_pairs(seed: int, n: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    predictions, references = [], []
    for _ in range(n):
        ref = _sentence(rng, rng.randint(1, 30))
        kind = rng.random()
        if kind < 0.1:
            pred = ref  # identical
        elif kind < 0.2:
            pred = _sentence(rng, rng.randint(1, 30))  # unrelated
        elif kind < 0.25:
            pred, ref = rng.choice(_EDGE), rng.choice([ref, rng.choice(_EDGE)])  # empty-ish
        else:
            pred = _perturb(rng, ref)
        predictions.append(pred)
        references.append(ref)
    return predictions, references


PREDICTIONS, REFERENCES = _make_pairs(seed=1234, n=400)


def _subcorpora(n: int) -> list[list[int]]:
    rng = random.Random(7)
    subsets = [list(range(n)), list(range(10)), list(range(1)), list(range(2))]
    subsets += [rng.sample(range(n), k) for k in (1, 2, 3, 5, 8, 20, 50, 100, 200)]
    return subsets


# ---------------------------------------------------------------- BLEU vs sacreBLEU


def test_tokenize_13a_matches_sacrebleu():
    pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    reference = Tokenizer13a()
    for text in PREDICTIONS + REFERENCES + _ODD_TOKENS + _EDGE:
        assert tokenize_13a(text) == reference(text.rstrip()).split(), repr(text)


def test_bleu_matches_sacrebleu_on_corpus_and_subcorpora():
    sacrebleu = pytest.importorskip("sacrebleu")
    worst = 0.0
    for subset in _subcorpora(len(PREDICTIONS)):
        preds = [PREDICTIONS[i] for i in subset]
        refs = [REFERENCES[i] for i in subset]
        expected = sacrebleu.corpus_bleu(preds, [refs]).score
        got = metrics.bleu(preds, refs)
        worst = max(worst, abs(got - expected))
        assert got == pytest.approx(expected, abs=0.01), subset[:10]
    assert 0 < metrics.bleu(PREDICTIONS, REFERENCES) < 100
    print(f"max |BLEU - sacreBLEU| = {worst:.3g}")


def test_bleu_edge_cases_match_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    cases = [
        (["The cat sat on the mat."], ["The cat sat on the mat."]),  # 100
        (["completely different words here"], ["nothing in common at all"]),  # no match: 0
        (["the cat"], ["the cat sat on the mat"]),  # no 3-grams: 0 despite matches
        (["the cat sat"], ["the cat sat on the mat"]),  # brevity penalty, smoothed 4-gram precision
        (["the the the the the the the"], ["the cat is on the mat"]),  # clipping
        ([""], ["something"]),
        (["something"], [""]),
        (["a b c d e", ""], ["a b c d e", "x"]),
    ]
    for preds, refs in cases:
        expected = sacrebleu.corpus_bleu(preds, [refs]).score
        assert metrics.bleu(preds, refs) == pytest.approx(expected, abs=0.01), (preds, refs)


def test_bleu_multiple_references_match_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(99)
    second = [_perturb(rng, ref) for ref in REFERENCES]
    third = [None if rng.random() < 0.3 else _perturb(rng, ref) for ref in REFERENCES]  # variable count
    for streams in ([REFERENCES, second], [REFERENCES, second, third]):
        expected = sacrebleu.corpus_bleu(PREDICTIONS, streams).score
        assert metrics.bleu(PREDICTIONS, streams) == pytest.approx(expected, abs=0.01)


def test_bleu_rejects_misaligned_input():
    with pytest.raises(ValueError, match="expected 2"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="need both"):
        metrics.bleu([], [])
    with pytest.raises(ValueError, match="need both"):
        metrics.bleu(["a"], [])


# ---------------------------------------------------------------- ROUGE vs rouge-score


def _rouge_score_reference(preds, refs, use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)
    return [{k: s.fmeasure for k, s in scorer.score(ref, pred).items()} for pred, ref in zip(preds, refs)]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_tokenizer_matches_rouge_score(use_stemmer):
    pytest.importorskip("rouge_score")
    from rouge_score.tokenizers import DefaultTokenizer

    reference = DefaultTokenizer(use_stemmer=use_stemmer)
    for text in PREDICTIONS + REFERENCES + _ODD_TOKENS + _EDGE:
        assert tokenize(text, use_stemmer) == reference.tokenize(text), repr(text)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score(use_stemmer):
    expected_pairs = _rouge_score_reference(PREDICTIONS, REFERENCES, use_stemmer)
    worst = dict.fromkeys(ROUGE_KEYS, 0.0)
    for subset in _subcorpora(len(PREDICTIONS)):
        got = metrics.rouge([PREDICTIONS[i] for i in subset], [REFERENCES[i] for i in subset], use_stemmer)
        assert set(got) == set(ROUGE_KEYS)
        for key in ROUGE_KEYS:
            expected = sum(expected_pairs[i][key] for i in subset) / len(subset)
            worst[key] = max(worst[key], abs(got[key] - expected))
            assert got[key] == pytest.approx(expected, abs=1e-6), (key, subset[:10])
    print(f"use_stemmer={use_stemmer}: max |ROUGE - rouge-score| per key = {worst}")


def test_rouge_per_pair_and_edge_cases():
    from ftcore.eval.rouge import rouge_pair

    preds = PREDICTIONS[:100] + _EDGE + ["a\nb"] * len(_EDGE)
    refs = REFERENCES[:100] + ["a\nb"] * len(_EDGE) + _EDGE
    for use_stemmer in (False, True):
        expected = _rouge_score_reference(preds, refs, use_stemmer)
        for pred, ref, exp in zip(preds, refs, expected):
            got = rouge_pair(pred, ref, use_stemmer)
            for key in ROUGE_KEYS:
                assert got[key] == pytest.approx(exp[key], abs=1e-6), (key, pred, ref)
    # identical multi-line texts score 1 everywhere
    assert metrics.rouge(["One line.\nTwo lines!"], ["One line.\nTwo lines!"]) == dict.fromkeys(ROUGE_KEYS, 1.0)


# ---------------------------------------------------------------- Porter stemmer vs NLTK

_BASES = (  # noqa: SIM905
    "connect relate condition valence hesitance digitize conform radical different vile analogous "
    "vietnam predicate operate feudal decisive hope callous formal sensitive sensible triple form "
    "electric good revive allow infer airline gyroscope adjust defense irritate replace depend adopt "
    "homolog commune activate angular effect bowdler probe rate cease control roll feed agree plaster "
    "bleed motor sing conflate trouble size hop tan fall hiss fizz fail file happy sky enjoy spy fly try "
    "die lie tie news inning outing can howe proceed exceed succeed geo theo archaeo philo care pony "
    "tie caress cat general nation ration sense use run swim stop plan cry study apply employ play"
).split()
_SUFFIXES = (  # noqa: SIM905
    "s es ed ing er ers est ly ness fulness ational tional ation ations ator alism iveness ousness "
    "ality ity ivity bility ies ied ize izes ized izing ization izer ise able ible ant ement ment ent "
    "ence ance ion ions ou ism ate ates ated ating iti ous ive al ally alli fulli logi logy ful ical "
    "icate ative alize iciti y e ll"
).split()


def _stemmer_words() -> list[str]:
    words = set(_BASES) | {b + s for b in _BASES for s in _SUFFIXES}
    rng = random.Random(5)
    letters = "aeiouyybcdlmnrstgpwxz"
    for _ in range(3000):  # random letter strings reach the corner cases (y runs, short stems)
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) + rng.choice(_SUFFIXES + [""]))
    short = [""]  # every short stem over a few letters, with the suffixes whose rules look at the stem
    for _ in range(3):
        short = [s + c for s in short for c in "aeybdlst"] + short
    words.update(
        s + suffix
        for s in short
        for suffix in ("", "s", "ed", "ing", "y", "e", "ies", "ied", "eed", "ll", "alli", "logi")
    )
    for sentence in PREDICTIONS + REFERENCES:
        words.update(tokenize(sentence))
    words.update(["", "a", "y", "yy", "yyyy", "ies", "ied", "eed", "ing", "Skies", "DYING", "Generalizations"])
    return sorted(words)


def test_porter_matches_nltk_in_rouge_score_mode():
    pytest.importorskip("nltk")
    from nltk.stem.porter import PorterStemmer

    reference = PorterStemmer()  # NLTK_EXTENSIONS: the mode rouge-score's DefaultTokenizer builds
    try:
        from rouge_score.tokenizers import DefaultTokenizer

        reference = DefaultTokenizer(use_stemmer=True)._stemmer
    except ImportError:
        pass
    assert reference.mode == PorterStemmer.NLTK_EXTENSIONS
    words = _stemmer_words()
    assert len(words) > 3000
    mismatches = [(w, reference.stem(w), porter.stem(w)) for w in words if reference.stem(w) != porter.stem(w)]
    assert not mismatches, mismatches[:20]


def test_porter_paper_examples():
    examples = {
        "caresses": "caress", "ponies": "poni", "cats": "cat", "feed": "feed", "agreed": "agre",
        "plastered": "plaster", "motoring": "motor", "sing": "sing", "hopping": "hop", "falling": "fall",
        "filing": "file", "happy": "happi", "relational": "relat", "conditional": "condit",
        "hopefulness": "hope", "adjustment": "adjust", "controlling": "control", "dies": "die",
        "dying": "die", "enjoy": "enjoy", "geology": "geolog", "a": "a", "by": "by",
    }  # fmt: skip
    assert {w: porter.stem(w) for w in examples} == examples


# ---------------------------------------------------------------- classification, exact match, perplexity


def test_classification_report_hand_computed():
    # classes a, b, c (never predicted), d (predicted, never a label)
    report = metrics.classification_report(["a", "b", "b", "b", "d"], ["a", "a", "b", "b", "c"])
    assert list(report["per_class"]) == ["a", "b", "c", "d"]
    expected = {
        "a": (1.0, 0.5, 2 / 3, 2),
        "b": (2 / 3, 1.0, 0.8, 2),
        "c": (0.0, 0.0, 0.0, 1),  # never predicted: precision 0 (zero division -> 0)
        "d": (0.0, 0.0, 0.0, 0),  # support 0: recall 0 (zero division -> 0)
    }
    for cls, (p, r, f, s) in expected.items():
        got = report["per_class"][cls]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p, r, f, s))
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["precision_macro"] == pytest.approx((1 + 2 / 3) / 4)
    assert report["recall_macro"] == pytest.approx(1.5 / 4)
    assert report["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 4)
    for key in ("precision_micro", "recall_micro", "f1_micro"):
        assert report[key] == pytest.approx(0.6)
    assert report["support"] == 5


def test_classification_report_degenerate_cases():
    perfect = metrics.classification_report([2, 0, 1, 10], [2, 0, 1, 10])
    assert list(perfect["per_class"]) == [0, 1, 2, 10]  # sorted numerically, not as strings
    assert all(perfect[k] == 1.0 for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_micro"))

    all_wrong = metrics.classification_report([1, 1, 1], [0, 0, 0])  # predicted class not among labels
    assert all_wrong["per_class"] == {
        0: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3},
        1: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }
    assert all_wrong["accuracy"] == all_wrong["f1_macro"] == all_wrong["f1_micro"] == 0.0

    # binary, worked by hand: tp(1)=3 fp(1)=1 fn(1)=1; tp(0)=1 fp(0)=1 fn(0)=1
    binary = metrics.classification_report([1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 1])
    assert binary["per_class"][1]["f1"] == pytest.approx(0.75)
    assert binary["per_class"][0]["f1"] == pytest.approx(0.5)
    assert binary["f1_macro"] == pytest.approx(0.625)
    assert binary["accuracy"] == pytest.approx(4 / 6)

    mixed = metrics.classification_report(["x", 1], [1, 1])  # mixed label types still work
    assert mixed["accuracy"] == 0.5 and len(mixed["per_class"]) == 2
    with pytest.raises(ValueError):
        metrics.classification_report([1, 2], [1])


def test_classification_report_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(3)
    labels = [rng.choice("abcde") for _ in range(200)]
    preds = [y if rng.random() < 0.6 else rng.choice("abcdfg") for y in labels]
    report = metrics.classification_report(preds, labels)
    for avg in ("macro", "micro"):
        p, r, f, _ = sk.precision_recall_fscore_support(labels, preds, average=avg, zero_division=0)
        assert (report[f"precision_{avg}"], report[f"recall_{avg}"], report[f"f1_{avg}"]) == pytest.approx((p, r, f))
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))


def test_exact_match():
    preds = ["  Paris ", "new   york", "Berlin", "rome", ""]
    refs = ["paris", "New York", "Bonn", "Rome.", ""]
    assert metrics.exact_match(preds, refs) == pytest.approx(3 / 5)
    assert metrics.exact_match(preds, refs, normalize=False) == pytest.approx(1 / 5)
    assert metrics.normalize_text("\tA  b\nC ") == "a b c"


def test_perplexity_is_exp_of_token_weighted_mean_loss():
    assert metrics.perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert metrics.perplexity_from_losses([1.0, 2.0], [1, 3]) == pytest.approx(math.exp(7 / 4))
    assert metrics.perplexity_from_losses([1.0, 2.0]) == pytest.approx(math.exp(1.5))
    assert metrics.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)

    # two batches of different lengths, as an eval loop sees them
    logits = [torch.randn(7, 11), torch.randn(3, 11)]
    targets = [torch.randint(0, 11, (7,)), torch.randint(0, 11, (3,))]
    sums = [torch.nn.functional.cross_entropy(x, y, reduction="sum") for x, y in zip(logits, targets)]
    means = [torch.nn.functional.cross_entropy(x, y) for x, y in zip(logits, targets)]
    expected = torch.exp(torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets))).item()
    assert metrics.perplexity(sum(sums).item(), 10) == pytest.approx(expected, rel=1e-5)
    assert metrics.perplexity_from_losses([m.item() for m in means], [7, 3]) == pytest.approx(expected, rel=1e-5)


def test_eval_package_does_not_import_references():
    forbidden = {"sacrebleu", "rouge_score", "nltk", "sklearn"}
    for path in (Path(metrics.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & forbidden, (path.name, names)
