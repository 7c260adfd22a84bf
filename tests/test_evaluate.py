"""scripts/evaluate.py and ftcore.eval.run: run dirs, adapters, merged models; determinism; perplexity."""

import json
import math
import subprocess
import sys

import pytest
from test_train import ROOT, data_cache, tiny_dir, tiny_run  # noqa: F401 (fixtures)

from ftcore import peft
from ftcore.config import EvalConfig, ModelSpec, run_config
from ftcore.eval.run import EvalRunConfig, evaluate
from ftcore.formats.hf import load_pretrained
from ftcore.train import train
from ftcore.train.log import read_metrics

EVAL = dict(max_examples=8, max_new_tokens=4, batch_size=8)


@pytest.fixture(scope="module")
def trained_run(tiny_dir, data_cache, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("trained")
    cfg = tiny_run(tiny_dir, data_cache, run_dir, train__max_steps=6, train__eval_every=0, train__eval_batches=0)
    train(run_config(cfg))
    return run_dir


def test_run_dir_evaluation_reproduces_the_loop(trained_run, tmp_path):
    report = evaluate(EvalRunConfig(run_dir=str(trained_run), eval=EvalConfig(**EVAL), out_dir=str(tmp_path)))
    loop = json.loads((trained_run / "eval.json").read_text())
    assert report["finetuned"]["accuracy"] == loop["finetuned"]["accuracy"]
    assert report["baseline"]["accuracy"] == loop["baseline"]["accuracy"]
    assert (tmp_path / "report.md").read_text().startswith("| model | accuracy (test, n=8) | perplexity |")


def test_perplexity_is_exp_of_the_loops_validation_loss(trained_run, tmp_path):
    everything = EvalConfig(split="validation", baseline=False, max_examples=0)  # as the loop's eval_batches=0
    report = evaluate(EvalRunConfig(run_dir=str(trained_run), eval=everything, out_dir=str(tmp_path)))
    val_loss = [e["val_loss"] for e in read_metrics(trained_run) if "val_loss" in e][-1]
    assert report["finetuned"]["loss"] == pytest.approx(val_loss, rel=1e-6)
    assert report["finetuned"]["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-6)


def test_same_checkpoint_twice_gives_the_same_numbers(trained_run, tmp_path):
    runs = [evaluate(EvalRunConfig(run_dir=str(trained_run), eval=EvalConfig(**EVAL), out_dir=str(tmp_path / d)))
            for d in "ab"]  # fmt: skip
    assert runs[0] == runs[1]
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()


def test_merged_model_scores_like_base_plus_adapter(trained_run, tiny_dir, tmp_path):  # noqa: F811
    model, tok = load_pretrained(tiny_dir)
    peft.load_adapter(model, trained_run / "final")
    peft.export_merged(model, tmp_path / "merged", tok)
    data = json.loads((trained_run / "config.json").read_text())["data"]
    from ftcore.data.config import DataConfig
    from ftcore.schema import build

    merged = evaluate(EvalRunConfig(model=ModelSpec(path=str(tmp_path / "merged")), baseline_path=str(tiny_dir),
                                    data=build(DataConfig, data), eval=EvalConfig(**EVAL), out_dir=str(tmp_path / "m")))  # fmt: skip
    adapter = evaluate(EvalRunConfig(model=ModelSpec(path=str(tiny_dir)), adapter=str(trained_run / "final"),
                                     data=build(DataConfig, data), eval=EvalConfig(**EVAL), out_dir=str(tmp_path / "a")))  # fmt: skip
    assert merged["finetuned"]["accuracy"] == adapter["finetuned"]["accuracy"]
    assert merged["finetuned"]["perplexity"] == pytest.approx(adapter["finetuned"]["perplexity"], rel=1e-4)
    assert merged["baseline"] == adapter["baseline"]


def test_cli(trained_run, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"run_dir={trained_run}",
                        "eval.max_examples=4", "eval.max_new_tokens=3", f"hydra.run.dir={out}"],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 4 and {"accuracy", "perplexity"} <= set(report["finetuned"]) and "baseline" in report
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"run_dir={tmp_path / 'nope'}",
                        f"hydra.run.dir={tmp_path / 'x'}"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: not a training run directory (no config.json)"
