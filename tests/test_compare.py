"""The comparison suite: budget solving, a 2-method x 2-seed sweep through the CLI whose tables and plots
hold the runs' own numbers, restarts that skip finished runs and resume unfinished ones, learning-rate
trials, print/launch mode (the torchrun path) with Hydra multirun, ablations."""

import csv
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_refs import SMOLLM2
from test_train import ROOT, data_cache, tiny_dir, tiny_run  # noqa: F401  (fixtures)

import ftcore.compare.config
import ftcore.compare.runner
import ftcore.train.loop
from ftcore import peft
from ftcore.compare import compare_config, config_hash, count_trainable, plan_arms, run_comparison, solve_budget, stats
from ftcore.config import run_config
from ftcore.data.tasks import get_task
from ftcore.errors import FtcoreError, NonFiniteLoss
from ftcore.eval.evaluate import headline
from ftcore.model import ModelConfig, Transformer
from ftcore.train.log import read_metrics

TINY = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   tie_word_embeddings=True)  # fmt: skip
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT = {
    "lora": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ALL_LINEAR},
    "dora": {"method": "dora", "r": 8, "alpha": 16, "target_modules": ALL_LINEAR},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 20},
    "prompt": {"method": "prompt", "num_virtual_tokens": 20, "prompt_init": "sample_vocab"},
    "full": {"method": "full"},
    "vera": {"method": "vera", "r": 64, "target_modules": ALL_LINEAR},
    "hira": {"method": "hira", "r": 8, "target_modules": ALL_LINEAR},
    "hra": {"method": "hra", "r": 8, "target_modules": ALL_LINEAR},
    "ln_tuning": {"method": "ln_tuning"},
    "adalora": {"method": "adalora", "init_r": 12, "target_r": 8, "target_modules": ALL_LINEAR},
    "ptuning": {"method": "ptuning", "num_virtual_tokens": 20, "encoder_hidden_size": 64},
    "lily": {"method": "lily", "r": 32, "stride_A": 3, "num_B": 4, "target_modules": ALL_LINEAR},
    "boft": {"method": "boft", "boft_block_size": 4, "target_modules": ALL_LINEAR},
    "oft": {"method": "oft", "r": 0, "oft_block_size": 16, "target_modules": ALL_LINEAR},
}
CLI_BASE = ["train.max_steps=4", "train.eval_every=2", "train.batch_size=4", "train.eval_batches=1",
            "eval.max_examples=4", "eval.max_new_tokens=3", "eval.batch_size=8", "logger.wandb.mode=disabled",
            "logger.progress=false", "optim.warmup_steps=1", "data.system_prompt=Reply with the number only."]  # fmt: skip


def compare_cli(*args, cwd=ROOT):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), *args], check=False, capture_output=True, text=True,
                       cwd=cwd)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_budget_solving_is_exact():
    # LoRA on every linear layer of SmolLM2: r * sum(in + out) per layer; the largest r within the budget
    per_rank = 30 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576))
    s = solve_budget(SMOLLM2, PEFT["lora"], 1_000_000, max_size=512)
    assert (s.knob, s.size, s.trainable, s.note) == ("r", 3, 3 * per_rank, "")
    assert count_trainable(SMOLLM2, {**PEFT["lora"], "r": 4}) > 1_000_000
    # DoRA adds one magnitude per output feature of each adapted layer
    s = solve_budget(SMOLLM2, PEFT["dora"], 1_000_000, max_size=512)
    assert (s.size, s.trainable) == (2, 2 * per_rank + 30 * (576 * 2 + 192 * 2 + 1536 * 2 + 576))
    # prefix: P x layers x 2 (k, v) x kv_dim; prompt: P x hidden, capped by max_size
    s = solve_budget(SMOLLM2, PEFT["prefix"], 1_000_000, max_size=100)
    assert (s.size, s.trainable) == (86, 86 * 30 * 2 * 192)
    s = solve_budget(SMOLLM2, PEFT["prompt"], 1_000_000, max_size=100)
    assert (s.size, s.trainable) == (100, 100 * 576) and s.note.startswith("capped at num_virtual_tokens=100")
    # fixed sizes; a budget below the smallest size
    assert solve_budget(SMOLLM2, PEFT["ia3"], 1_000_000, 512).trainable == 30 * (192 + 192 + 1536)
    assert solve_budget(SMOLLM2, PEFT["full"], 1, 512).trainable == 134_515_008
    # LN tuning: one weight [576] per RMSNorm (2 per block and the final norm), no knob
    s = solve_budget(SMOLLM2, PEFT["ln_tuning"], 1_000_000, 512)
    assert (s.knob, s.size, s.trainable) == (None, None, (2 * 30 + 1) * 576)
    s = solve_budget(SMOLLM2, PEFT["lora"], 1000, max_size=512)
    assert (s.size, s.note) == (1, "over budget at the smallest r=1")
    # budget 0 keeps the configured size
    assert solve_budget(SMOLLM2, PEFT["prefix"], 0, 100).size == 20
    # HiRA: r (in + out) per layer, like LoRA; AdaLoRA: init_r (in + out + 1), its target_r kept below init_r
    assert solve_budget(SMOLLM2, PEFT["hira"], 1_000_000, 512).size == 3
    s = solve_budget(SMOLLM2, PEFT["adalora"], 1_000_000, 512)
    assert (s.knob, s.size, s.peft["target_r"]) == ("init_r", 3, 2) and s.trainable == 3 * (per_rank + 30 * 7)
    # VeRA: out + r per layer (the shared matrices are frozen): 7 layers x 30, the rest is the outputs
    outs = 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    s = solve_budget(SMOLLM2, PEFT["vera"], outs + 30 * 7 * 100, 512)
    assert (s.size, s.trainable) == (100, outs + 30 * 7 * 100)
    # BOFT: boft_block_size H, in H + out per layer, H dividing 576 and 1536 (10 would fit, 8 is the largest valid)
    ins = 30 * (6 * 576 + 1536)
    s = solve_budget(SMOLLM2, PEFT["boft"], 10 * ins + outs, 512)
    assert (s.knob, s.size, s.trainable, s.note) == ("boft_block_size", 8, 8 * ins + outs, "")
    # Lily: per r, 10 shared A's (30 layers / stride 3) of each entry's `in`, one B of num_B x `out` per entry,
    # and a [num_B, r] router per layer
    per_r = 10 * (576 * 6 + 1536) + 4 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) + 30 * 7 * 4
    s = solve_budget(SMOLLM2, PEFT["lily"], 1_000_000, 512)
    assert (s.knob, s.size, s.trainable) == ("r", 13, 13 * per_r) and 14 * per_r > 1_000_000
    # P-tuning's MLP encoder: P D + (D H + H) + (H^2 + H) + (H D + D), quadratic in H: the binary search's largest H
    def ptuning(h):
        return 20 * 576 + 576 * h + h + h * h + h + h * 576 + 576

    s = solve_budget(SMOLLM2, PEFT["ptuning"], 500_000, 512)
    assert (s.knob, s.size, s.trainable) == ("encoder_hidden_size", 328, ptuning(328)) and ptuning(329) > 500_000
    s = solve_budget(SMOLLM2, PEFT["ptuning"], 1_000_000, 512)
    assert s.size == 512 and s.note.startswith("capped at encoder_hidden_size=512")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt", "full", "vera", "hira", "hra",
                                    "adalora", "ln_tuning", "lily", "ptuning", "boft", "oft"])
def test_meta_count_equals_a_real_model(method):
    model = Transformer(TINY)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    peft.apply(model, PEFT[method])
    assert count_trainable(TINY, PEFT[method]) == peft.count_parameters(model)[0]


def test_compare_two_methods_two_seeds_then_restart(tiny_dir, data_cache, tmp_path):  # noqa: F811
    out = tmp_path / "cmp"
    args = ["compare.methods=[lora,ia3]", "compare.seeds=[0,1]", "compare.budget=10000", f"model.path={tiny_dir}",
            f"data.cache_dir={data_cache}", f"hydra.run.dir={out}", "eval.few_shot=2", "eval.forgetting_samples=4",
            "eval.forgetting_tokens=8", *CLI_BASE]  # fmt: skip
    stdout = compare_cli(*args)
    assert stdout.count(": finished") == 4, stdout

    # the tables hold each run's own numbers
    runs = read_csv(out / "runs.csv")
    task = get_task(run_config(json.loads((out / runs[0]["run_dir"] / "config.json").read_text())).data)
    assert [(r["arm"], r["seed"]) for r in runs] == [("lora", "0"), ("lora", "1"), ("ia3", "0"), ("ia3", "1")]
    for r in runs:
        ev = json.loads((out / r["run_dir"] / "eval.json").read_text())
        events = read_metrics(out / r["run_dir"])
        assert float(r["score"]) == headline(task, ev["finetuned"])
        assert int(r["trainable_params"]) == ev["trainable_params"]
        assert float(r["best_val_loss"]) == ev["best_val_loss"]
        assert float(r["forgetting"]) == ev["forgetting"]["increase"] and ev["forgetting"]["tokens"] == 32
        assert "few_shot" not in ev  # the sweep scores the base model few-shot once
        assert float(r["final_val_loss"]) == [e["val_loss"] for e in events if "val_loss" in e][-1]
        assert float(r["tokens_per_s"]) == statistics.median(e["tokens_per_s"] for e in events if "tokens_per_s" in e)
        assert float(r["wall_s"]) > 0 and float(r["peak_mem_gb"]) > 0 and r["status"] == "finished"
        assert json.loads((out / r["run_dir"] / "config.json").read_text())["train"]["seed"] == int(r["seed"])
    # LoRA's rank was solved for the budget: 2 layers x 1024 per rank -> r=4 (8,192 <= 10,000 < 10,240)
    assert {r["trainable_params"] for r in runs if r["arm"] == "lora"} == {"8192"}
    table = read_csv(out / "results.csv")
    for row in table:
        scores = [float(r["score"]) for r in runs if r["arm"] == row["arm"]]
        assert float(row["score_mean"]) == pytest.approx(statistics.fmean(scores), abs=1e-12)
        assert float(row["score_std"]) == pytest.approx(statistics.stdev(scores), abs=1e-12)
        assert row["seeds"] == "2"
    assert [(r["arm"], r["size"], r["trainable_params"]) for r in table] == [("lora", "4", "8192"), ("ia3", "", "384")]
    md = (out / "results.md").read_text()
    for row in table:
        assert f"| {row['arm']} |" in md and f"{float(row['score_mean']):.4f} ± {float(row['score_std']):.4f}" in md
    baseline = json.loads((out / "baseline" / "eval.json").read_text())
    assert f"| base model | — | 0 | — | {baseline['score']:.4f} | [" in md
    # the intervals and tests, recomputed from the runs' own predictions.jsonl (and the base model's)
    preds = {arm: [[json.loads(x) for x in (out / r["run_dir"] / "predictions.jsonl").read_text().splitlines()]
                   for r in runs if r["arm"] == arm] for arm in ("lora", "ia3")}  # fmt: skip
    base_rows = [json.loads(x) for x in (out / "baseline" / "predictions.jsonl").read_text().splitlines()]
    outcomes = {arm: stats.outcomes(task.metric, p) for arm, p in preds.items()}
    few_rows = [json.loads(x) for x in (out / "baseline" / "predictions_few_shot.jsonl").read_text().splitlines()]
    refs = {"base model": stats.outcomes(task.metric, [base_rows]),
            "base model, 2-shot": stats.outcomes(task.metric, [few_rows])}  # fmt: skip
    again = stats.compare_arms(outcomes, refs, 2000, 10000, 0, 0.05)
    for row in table:
        assert float(row["score_mean"]) == pytest.approx(again["arms"][row["arm"]]["score"], abs=1e-12)
        assert (float(row["ci_low"]), float(row["ci_high"])) == again["arms"][row["arm"]]["ci"]
    assert again["arms"]["base model"]["score"] == pytest.approx(baseline["score"], abs=1e-12)
    assert again["arms"]["base model, 2-shot"]["score"] == pytest.approx(baseline["few_shot"]["score"], abs=1e-12)
    assert f"| base model, 2-shot | — | 0 | — | {baseline['few_shot']['score']:.4f} | [" in md
    diffs = read_csv(out / "differences.csv")
    assert [(d["a"], d["b"]) for d in diffs] == [("lora", "ia3"), ("lora", "base model"), ("ia3", "base model"),
                                                 ("lora", "base model, 2-shot"), ("ia3", "base model, 2-shot")]
    for d, want in zip(diffs, again["pairs"]):
        assert (float(d["diff"]), float(d["p"]), float(d["p_holm"])) == (want["diff"], want["p"], want["p_holm"])
    assert "| A | B | A - B | 95% CI | p | p (Holm) | significant |" in md
    for png in ("val_loss.png", "metric_vs_params.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000 and f"({png})" in md

    # a restart skips every finished run (same config hash, same directories)
    evals = sorted((out / "runs").glob("*/eval.json"))
    mtimes = [p.stat().st_mtime_ns for p in evals]
    stdout = compare_cli(*args)
    assert stdout.count("finished, skipped") == 4 and "starting" not in stdout and "resuming" not in stdout, stdout
    assert [p.stat().st_mtime_ns for p in evals] == mtimes

    # an unfinished run (a checkpoint, no eval.json) resumes from its checkpoint
    unfinished = next(p for p in evals if p.parent.name.startswith("lora_s1_"))
    unfinished.unlink()
    stdout = compare_cli(*args)
    assert stdout.count(": resuming") == 1 and stdout.count("finished, skipped") == 3, stdout
    assert "lora_s1_" in stdout.split(": resuming")[0].splitlines()[-1]
    assert "resumed from" in stdout and unfinished.is_file()
    assert len(read_csv(out / "runs.csv")) == 4  # the table is the current plan's


def test_every_method_at_one_budget(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """compare.methods=[all]: one command trains every method ftcore has at one matched budget (1 seed, 2 steps)
    and writes the tables and plots; each sized method's trainable count is within the budget."""
    out, budget = tmp_path / "all", 20_000
    stdout = compare_cli("compare.methods=[all]", "compare.seeds=[0]", f"compare.budget={budget}",
                         f"model.path={tiny_dir}", f"data.cache_dir={data_cache}", f"hydra.run.dir={out}",
                         *CLI_BASE, "train.max_steps=2", "train.eval_every=2", "eval.max_examples=2")  # fmt: skip
    methods = list(ftcore.compare.config.COMPARABLE)
    assert stdout.count(": finished") == len(methods), stdout
    table = read_csv(out / "results.csv")
    assert [r["arm"] for r in table] == methods
    for row in table:
        if row["knob"] and "over budget" not in row["note"]:
            assert 0 < int(row["trainable_params"]) <= budget, row
            assert row["budget"] == str(budget)
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in methods)
    for png in ("val_loss.png", "metric_vs_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_train(calls, losses):
    """A stand-in for ftcore.train.train: writes eval.json and metrics.jsonl; lr -> best_val_loss (or divergence)."""

    def train(cfg):
        calls.append(cfg)
        loss = losses[cfg.optim.lr]
        if loss is None:
            raise NonFiniteLoss(float("nan"), 2)
        run = Path(cfg.run_dir)
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss + 1, "lr": cfg.optim.lr,
                                                       "tokens_per_s": 100.0}) + "\n" +
                                           json.dumps({"step": 1, "val_loss": loss}) + "\n")  # fmt: skip
        report = {"metric": "accuracy", "finetuned": {"accuracy": 1 / loss}, "step": cfg.train.max_steps,
                  "trainable_params": 1, "best_val_loss": loss}  # fmt: skip
        (run / "eval.json").write_text(json.dumps(report))
        return {"status": "finished", "stop_reason": "finished"}

    return train


def test_runs_set_in_epochs_trial_a_quarter_of_them(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    """train.epochs runs: each learning-rate trial runs epochs / 4 (warmup scaled alike); compare.lr_steps, which
    has no step count of the run to scale the warmup by, fails in one line."""
    calls = []
    monkeypatch.setattr(ftcore.compare.runner, "train", fake_train(calls, {1e-3: 2.0, 1e-2: 1.5}))
    base = tiny_run(tiny_dir, data_cache, tmp_path, train__max_steps=None, train__epochs=2, optim__warmup_steps=8)
    options = {"methods": ["lora"], "lrs": [1e-3, 1e-2], "peft": PEFT, "baseline": False, "plots": False}
    result = run_comparison(compare_config(options), base, tmp_path / "cmp")
    trials, finals = calls[:2], calls[2:]
    assert {(c.train.epochs, c.train.max_steps, c.optim.warmup_steps) for c in trials} == {(0.5, None, 2)}
    assert [(c.train.epochs, c.train.max_steps, c.optim.lr) for c in finals] == [(2.0, None, 1e-2)]
    assert [r["lr"] for r in result["results"]] == [1e-2]
    assert "2 epochs of 4 x 1 examples" in (tmp_path / "cmp" / "results.md").read_text()
    with pytest.raises(FtcoreError) as e:
        run_comparison(compare_config({**options, "lr_steps": 5}), base, tmp_path / "cmp2")
    assert str(e.value) == ("compare.lr_steps=5: the runs are train.epochs=2 long, which has no step count to scale "
                            "a trial's warmup by; expected compare.lr_steps=0 (trials of a quarter of the epochs) or "
                            "runs set by train.max_steps")  # fmt: skip


def test_lr_trials_choose_by_validation_loss(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr(
        ftcore.compare.runner, "train", fake_train(calls, {1e-3: 2.0, 1e-2: 1.5, 1e-1: None, 3e-2: 1.0})
    )
    base = tiny_run(tiny_dir, data_cache, tmp_path, train__max_steps=40, optim__warmup_steps=8)
    cc = compare_config({"methods": ["lora", "ia3"], "seeds": [0, 1], "lrs": [1e-3, 1e-2, 1e-1], "lr_steps": 5,
                         "method_lrs": {"ia3": [3e-2, 1e-3]}, "peft": PEFT, "baseline": False, "plots": False})  # fmt: skip
    result = run_comparison(cc, base, tmp_path / "cmp")
    trials, finals = calls[:5], calls[5:]
    assert [c.optim.lr for c in trials] == [1e-3, 1e-2, 1e-1, 3e-2, 1e-3]
    assert {c.train.max_steps for c in trials} == {5} and {c.optim.warmup_steps for c in trials} == {1}  # 8 * 5/40
    assert [(c.peft.method, c.optim.lr, c.train.seed, c.peft.seed) for c in finals] == [
        ("lora", 1e-2, 0, 0), ("lora", 1e-2, 1, 1), ("ia3", 3e-2, 0, 0), ("ia3", 3e-2, 1, 1)]  # fmt: skip
    assert {c.train.max_steps for c in finals} == {40} and all(c.train.resume == "auto" for c in calls)
    assert len({c.logger.wandb.group for c in calls}) == 1
    statuses = [r["status"] for r in result["lr_trials"]]
    assert statuses == ["finished", "finished", "diverged", "finished", "finished"]
    assert [r["lr"] for r in result["results"]] == [1e-2, 3e-2]
    # a restart trains nothing: finished and diverged runs are skipped; a changed config is a new run
    calls.clear()
    run_comparison(cc, base, tmp_path / "cmp")
    assert calls == []
    # a run made before a config key existed (its config.json lacks it) is still found and skipped
    old = next((tmp_path / "cmp" / "runs").glob("lora_s0_*"))
    saved = json.loads((old / "config.json").read_text())
    del saved["train"]["keep_checkpoints"]
    (old / "config.json").write_text(json.dumps(saved))
    old.rename(old.with_name("lora_s0_0ld0ld00"))
    result = run_comparison(cc, base, tmp_path / "cmp")
    assert calls == [] and result["runs"][0]["run_dir"] == "runs/lora_s0_0ld0ld00"
    cc.seeds = [0, 1, 2]
    run_comparison(cc, base, tmp_path / "cmp")
    assert [(c.peft.method, c.train.seed) for c in calls] == [("lora", 2), ("ia3", 2)]
    calls.clear()
    base["train"]["batch_size"] = 2
    run_comparison(cc, base, tmp_path / "cmp")
    assert len(calls) == 5 + 6 and len(list((tmp_path / "cmp" / "runs").iterdir())) == 6 + 6


def test_print_mode_multirun_and_launching_a_printed_command(tiny_dir, data_cache, tmp_path):  # noqa: F811
    args = ["-m", "compare.budget=2048,4096", "compare.methods=[lora]", "compare.launch=print", f"model.path={tiny_dir}",
            f"data.cache_dir={data_cache}", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=b${compare.budget}",
            *CLI_BASE]  # fmt: skip
    compare_cli(*args)
    for budget, r in ((2048, 1), (4096, 2)):
        plan = json.loads((tmp_path / f"b{budget}" / "plan.json").read_text())
        assert [(a["name"], a["size"], a["trainable_params"]) for a in plan["arms"]] == [("lora", r, 2048 * r)]
    commands = (tmp_path / "b4096" / "commands.sh").read_text().splitlines()[4:]
    assert len(commands) == 1 and "scripts/train.py --config-dir=" in commands[0]
    # launch=subprocess runs exactly the printed command (python here, torchrun with compare.launcher=...)
    stdout = compare_cli(*[a for a in args if a not in ("-m", "compare.budget=2048,4096", "compare.launch=print")],
                         "compare.budget=4096", "compare.launch=subprocess", "compare.baseline=false",
                         f"hydra.run.dir={tmp_path / 'b4096'}")  # fmt: skip
    assert "$ " + commands[0] in stdout and ": finished" in stdout
    run = json.loads((tmp_path / "b4096" / "plan.json").read_text())["runs"][0]
    assert config_hash(json.loads((Path(run["run_dir"]) / "config.json").read_text())) == run["config_hash"]
    assert (Path(run["run_dir"]) / "train.log").is_file()
    row = read_csv(tmp_path / "b4096" / "runs.csv")[0]
    assert row["status"] == "finished" and row["trainable_params"] == "4096" and row["score"] != ""
    assert row["peak_mem_kind"] == "rss" and float(row["peak_mem_gb"]) > 0.1  # the child's peak, from wait4


def test_variant_arms_start_from_their_methods_settings():
    """compare.variants adds named arms of a method with other settings (PiSSA: LoRA with init=pissa), sized for
    the same budget; they trial their method's learning rates."""
    cc = compare_config({"methods": ["lora", "ia3"], "budget": 5000, "peft": PEFT, "lrs": [1e-3, 1e-2],
                         "variants": {"pissa": {"method": "lora", "init": "pissa"}}})  # fmt: skip
    arms = plan_arms(cc, TINY)
    assert [a.name for a in arms] == ["lora", "ia3", "pissa"]
    lora, pissa = arms[0], arms[2]
    assert pissa.method == "lora" and pissa.sized.peft["init"] == "pissa" and "init" not in lora.sized.peft
    assert pissa.sized.size == lora.sized.size and pissa.sized.trainable == lora.sized.trainable
    assert {k: v for k, v in pissa.sized.peft.items() if k != "init"} == {k: v for k, v in lora.sized.peft.items()
                                                                          if k != "init"}  # fmt: skip
    assert cc.lrs_by_method()["lora"] == [1e-3, 1e-2]
    with pytest.raises(FtcoreError, match=r"compare.variants.x.method='nope'"):
        compare_config({"variants": {"x": {"method": "nope"}}})
    with pytest.raises(FtcoreError, match=r"compare.variants.lora="):
        compare_config({"methods": ["lora"], "variants": {"lora": {"method": "lora"}}})
    with pytest.raises(FtcoreError, match=r"peft.init='bogus': expected one of"):
        compare_config({"variants": {"p": {"method": "lora", "init": "bogus"}}})


def test_report_only_keys_do_not_change_a_runs_hash():
    """A comparison started before the evaluation extras existed (trials now measure no forgetting) still finds its
    runs: those keys change what a run reports, not what it trains or scores."""
    base = {"model": {"path": "x"}, "train": {"max_steps": 8}}
    extras = {"eval": {"forgetting": False, "forgetting_samples": 3, "report_failures": 0, "drift_reference": False},
              "data": {"group_field": "kind"}}  # fmt: skip
    assert config_hash({**base, **extras}) == config_hash(base)
    assert config_hash({**base, "eval": {"few_shot": 2}}) != config_hash(base)  # a baseline the sweep scores


def test_ablation_plans(tmp_path):
    cc = compare_config({"methods": ["lora"], "budget": 5000, "peft": PEFT,
                         "vary": {"key": "target_modules", "values": [["q_proj", "v_proj"], ALL_LINEAR]}})  # fmt: skip
    arms = plan_arms(cc, TINY)
    assert [(a.name, a.sized.size, a.sized.trainable) for a in arms] == [
        ("lora target_modules=q+v", 11, 11 * 2 * (128 + 96)), ("lora target_modules=q+k+v+o+gate+up+down", 2, 2 * 2048)]  # fmt: skip
    cc = compare_config({"methods": ["lora"], "budget": 5000, "peft": PEFT, "vary": {"key": "r", "values": [1, 2]}})
    with pytest.raises(FtcoreError, match="compare.vary.key=r is lora's size knob; set compare.budget=0"):
        plan_arms(cc, TINY)
    cc = compare_config({"methods": ["prefix"], "peft": PEFT, "vary": {"key": "num_virtual_tokens", "values": [1, 5]}})
    assert [a.sized.trainable for a in plan_arms(cc, TINY)] == [1 * 2 * 2 * 32, 5 * 2 * 2 * 32]


def test_ablate_script_and_errors(tiny_dir, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablate.py"), "prefix_length", f"model.path={tiny_dir}",
                        "compare.launch=print", "compare.seeds=[0]", f"hydra.run.dir={tmp_path}"],
                       check=False, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [a["size"] for a in plan["arms"]] == [1, 5, 10, 20, 50]
    assert plan["command"].startswith("python scripts/compare.py compare=prefix_length")
    for cmd, message in [
        (["ablate.py", "lora_rnak"], "error: usage: scripts/ablate.py NAME [overrides]; NAME is one of lora_rank"),
        (["compare.py", "compare.methods=[lora,lorra]"], "error: compare.methods='lorra': expected one of full, lora"),
        (["compare.py", "compare.seeds=[0,0]"], "error: compare.seeds=[0, 0]: expected distinct seeds"),
        (["compare.py", "model.quantize=nf4", "compare.methods=[lora,full]", f"model.path={tiny_dir}"],
         "error: compare.methods: full fine-tuning trains the base weights, which model.quantize=nf4 keeps frozen"),
    ]:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / cmd[0]), *cmd[1:], f"hydra.run.dir={tmp_path}"],
                           check=False, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stopped_sweep_resumes_where_it_stopped(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    real_lr_at = ftcore.train.loop.lr_at

    def lr_at_then_sigterm(step, cfg, max_steps):  # a SIGTERM (or Ctrl-C) arrives during step index 2
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, cfg, max_steps)

    monkeypatch.setattr(ftcore.train.loop, "lr_at", lr_at_then_sigterm)
    base = tiny_run(tiny_dir, data_cache, tmp_path)
    cc = compare_config({"methods": ["ia3"], "peft": PEFT, "baseline": False, "plots": False})
    with pytest.raises(KeyboardInterrupt):
        run_comparison(cc, base, tmp_path / "cmp")
    (run_dir,) = (tmp_path / "cmp" / "runs").iterdir()
    assert json.loads((run_dir / "compare_status.json").read_text())["status"] == "stopped"
    monkeypatch.setattr(ftcore.train.loop, "lr_at", real_lr_at)
    result = run_comparison(cc, base, tmp_path / "cmp")
    assert [e["step"] for e in read_metrics(run_dir) if "loss" in e] == list(range(1, 9))
    status = json.loads((run_dir / "compare_status.json").read_text())
    assert (status["status"], status["attempts"], result["runs"][0]["status"]) == ("finished", 2, "finished")


@pytest.mark.dist
def test_torchrun_launched_runs(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """compare.launch=subprocess with a torchrun launcher: each run is a 2-process DDP run (gloo on CPU)."""
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2"
    stdout = compare_cli("compare.methods=[ia3]", "compare.launch=subprocess", f"compare.launcher='{launcher}'",
                         "dist=ddp", "train.device=cpu", "compare.baseline=false", f"model.path={tiny_dir}",
                         f"data.cache_dir={data_cache}", f"hydra.run.dir={tmp_path}", *CLI_BASE)  # fmt: skip
    assert "torch.distributed.run --standalone --nproc_per_node=2" in stdout and ": finished" in stdout
    row = read_csv(tmp_path / "runs.csv")[0]
    assert row["status"] == "finished" and row["trainable_params"] == "384"
    assert json.loads((tmp_path / row["run_dir"] / "config.json").read_text())["dist"]["backend"] == "ddp"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), "dist=ddp", f"model.path={tiny_dir}",
                        f"hydra.run.dir={tmp_path / 'x'}"], check=False, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "error: dist=ddp runs need torchrun: add compare.launch=subprocess" in r.stderr
