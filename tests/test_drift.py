"""Drift scores (ftcore/monitor/drift.py) against direct computations and scipy (test-only)."""

import numpy as np
import pytest
from test_train import data_cache, tiny_dir, tiny_run  # noqa: F401  (fixtures)

from ftcore.errors import FtcoreError
from ftcore.monitor.drift import DriftReference, js_divergence, length_bins, psi

scipy_distance = pytest.importorskip("scipy.spatial.distance")


def prompts(rng, n, mean_len, vocab):
    return [rng.integers(0, vocab, size=max(1, int(rng.normal(mean_len, 4)))).tolist() for _ in range(n)]


def test_psi_and_js_equal_their_definitions():
    p, q = np.array([0.2, 0.3, 0.5]), np.array([0.25, 0.25, 0.5])
    assert psi(p, q) == pytest.approx(sum((b - a) * np.log(b / a) for a, b in zip(p, q)), abs=1e-15)
    assert psi(p, p) == 0.0
    a, b = np.array([5.0, 1, 0, 4]), np.array([1.0, 1, 6, 2])
    assert js_divergence(a, b) == pytest.approx(scipy_distance.jensenshannon(a, b, base=2) ** 2, abs=1e-12)
    assert js_divergence(a, a) == 0.0 and js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert length_bins(np.array([1, 2, 3, 10]), np.array([2.0, 5.0])).tolist() == [0.5, 0.25, 0.25]


def test_the_same_distribution_scores_low_and_a_shifted_one_high(tmp_path):
    rng = np.random.default_rng(0)
    ref_ids, ref_emb = prompts(rng, 2000, 30, 500), rng.normal(0, 1, (2000, 16))
    ref = DriftReference.build(ref_ids, ref_emb)
    assert len(ref.token_counts) == 500 and sum(ref.length_fractions) == pytest.approx(1)
    same = ref.scores(prompts(rng, 300, 30, 500), rng.normal(0, 1, (300, 16)))
    assert same["length_psi"] < 0.1 and same["token_js"] < 0.05 and same["embedding_shift"] < 0.2
    longer = ref.scores(prompts(rng, 300, 45, 500), rng.normal(0, 1, (300, 16)))
    assert longer["length_psi"] > 0.25
    other_vocab = ref.scores([[t + 400 for t in p] for p in prompts(rng, 300, 30, 500)])  # 100 of 500 ids shared
    assert other_vocab["token_js"] > 0.5 and "embedding_shift" not in other_vocab
    moved = ref.scores(prompts(rng, 300, 30, 500), rng.normal(1, 1, (300, 16)))
    assert moved["embedding_shift"] == pytest.approx(1.0, abs=0.1)  # the mean moved by 4 in a spread of 4 (sqrt 16)
    again = DriftReference.load(ref.save(tmp_path / "drift_reference.json"))
    assert again == ref
    with pytest.raises(FtcoreError, match="not a drift reference"):
        (tmp_path / "bad.json").write_text("{}")
        DriftReference.load(tmp_path / "bad.json")


def test_a_run_saves_a_reference_that_tells_its_own_data_from_another_task(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """The run's drift_reference.json: the test split's prompts (drawn like the training ones) score low, the
    tickets demo's prompts high, on every score."""
    from ftcore.config import run_config
    from ftcore.data.collate import pad_token_id
    from ftcore.data.config import DataConfig
    from ftcore.data.pipeline import build_datasets
    from ftcore.formats.hf import load_pretrained
    from ftcore.monitor.reference import prompt_embeddings, prompt_ids
    from ftcore.train import train

    cfg = tiny_run(tiny_dir, data_cache, tmp_path / "run", train__max_steps=1, train__eval_every=0,
                   eval__baseline=False, eval__drift_reference=True, eval__drift_prompts=64)  # fmt: skip
    train(run_config(cfg))
    ref = DriftReference.load(tmp_path / "run" / "drift_reference.json")
    model, tok = load_pretrained(tiny_dir)
    scored = {}
    for name, data in (("same", run_config(cfg).data), ("tickets", DataConfig(path="tickets", cache_dir=data_cache))):
        test = build_datasets(data, tok)[0]["test"][:300]  # PSI's noise for n prompts: about 9 / n
        ids = prompt_ids(test, data.template, tok)
        scored[name] = ref.scores(ids, prompt_embeddings(model, ids, pad_token_id(tok), "cpu"))
    assert ref.prompts == len(build_datasets(run_config(cfg).data, tok)[0]["train"])
    assert scored["same"]["length_psi"] < 0.1 and scored["same"]["token_js"] < 0.1
    assert scored["tickets"]["length_psi"] > 0.25 and scored["tickets"]["token_js"] > 0.3
    assert scored["tickets"]["embedding_shift"] > 3 * scored["same"]["embedding_shift"]
