"""Hyperparameter search through Hydra's Optuna sweeper (the `search` extra): conf/search/optuna.yaml on the tiny
checkpoint, the objective being each trial's best validation loss."""

import json
import subprocess
import sys

import pytest
import yaml
from test_compare import CLI_BASE
from test_train import ROOT, tiny_dir  # noqa: F401  (fixture)

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def test_optuna_sweep_of_three_trials_reports_the_best(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    args = ["-m", "+search=optuna", "hydra.sweeper.n_trials=3", "peft.r=choice(2, 4)", f"model.path={tiny_dir}",
            f"hydra.sweep.dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "eval.baseline=false",
            "eval.forgetting=false", *CLI_BASE]  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trials = sorted(out.glob("trial_*"))
    assert [t.name for t in trials] == ["trial_0", "trial_1", "trial_2"]
    losses = [json.loads((t / "eval.json").read_text())["best_val_loss"] for t in trials]
    configs = [json.loads((t / "config.json").read_text()) for t in trials]
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    i = losses.index(min(losses))
    assert best["best_value"] == pytest.approx(losses[i], abs=1e-12)
    assert best["best_params"] == {"optim.lr": configs[i]["optim"]["lr"], "peft.r": configs[i]["peft"]["r"]}
    assert len({c["optim"]["lr"] for c in configs}) == 3 and 1e-4 <= min(c["optim"]["lr"] for c in configs)
