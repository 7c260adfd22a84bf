"""The training loop on a tiny random model with the real SmolLM2 tokenizer and the arithmetic demo data."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ftcore.train.loop
import ftcore.train.step
from ftcore.config import run_config
from ftcore.errors import FtcoreError, NonFiniteLoss
from ftcore.formats.hf import save_pretrained
from ftcore.formats.safetensors import SafetensorsFile
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import count_parameters, load_with_adapter
from ftcore.train import train
from ftcore.train.log import read_metrics

ROOT = Path(__file__).parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random model with SmolLM2's vocabulary and tokenizer files."""
    out = tmp_path_factory.mktemp("tiny")
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model, out / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, out / "model" / name)
    return out / "model"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def tiny_run(tiny_dir, data_cache, run_dir, **overrides) -> dict:
    """A run config dict: LoRA on arithmetic, a few steps, small evals, no W&B, no progress bar."""
    cfg = {
        "model": {"path": str(tiny_dir)},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"path": "arithmetic", "task": "arithmetic", "cache_dir": data_cache, "system_prompt": "Reply with the number only."},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "eval_batches": 2, "device": "cpu"},
        # the forgetting probe and the drift reference are off here: their own tests switch them on
        "eval": {"max_examples": 8, "max_new_tokens": 4, "batch_size": 8, "forgetting": False, "drift_reference": False},
        "logger": {"wandb": {"mode": "disabled"}, "progress": False},
        "run_dir": str(run_dir),
    }
    if overrides.get("peft__method", "lora") not in ("lora", "dora"):
        cfg["peft"] = {}  # the LoRA options above are no options of the other methods
    for dotted, value in overrides.items():
        group, key = dotted.split("__")
        cfg[group][key] = value
    return cfg


def sigterm_during(monkeypatch, at: int):
    """The loop's lr_at sends this process a SIGTERM during step index `at` (the run then stops at a checkpoint);
    returns the real lr_at, to put back."""
    real = ftcore.train.loop.lr_at

    def lr_at_then_sigterm(step, optim, max_steps):
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, optim, max_steps)

    monkeypatch.setattr(ftcore.train.loop, "lr_at", lr_at_then_sigterm)
    return real


def losses(run_dir):
    return [e["loss"] for e in read_metrics(run_dir) if "loss" in e]


def test_loss_decreases(tiny_dir, data_cache, tmp_path):
    cfg = tiny_run(tiny_dir, data_cache, tmp_path, train__max_steps=30, train__eval_every=0, eval__baseline=False,
                   peft__method="full", optim__lr=1e-2)  # fmt: skip
    train(run_config(cfg))
    curve = losses(tmp_path)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5, curve


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_phi3_layout_trains_with_all_linear_lora(smollm2_dir, data_cache, tmp_path, quantize):
    """Phi-3's fused projections and LongRoPE (the demo's prompts pass its 16-token original context) through the
    loop: LoRA on every linear layer (qkv_proj, gate_up_proj, ...), over a float or NF4 base; the loss falls."""
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 16}  # fmt: skip
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, fused_projections=True, partial_rotary_factor=0.5, rope_scaling=rope,
                      max_position_embeddings=256)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model, tmp_path / "phi")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, tmp_path / "phi" / name)
    run = tiny_run(tmp_path / "phi", data_cache, tmp_path / "run", train__max_steps=20, train__eval_every=0,
                   eval__baseline=False, peft__target_modules="all-linear", optim__lr=1e-2, model__quantize=quantize)
    train(run_config(run))
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.25, curve  # measured: 10.56 -> 10.16 nats
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in saved["target_modules"]} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                                       "down_proj"}  # fmt: skip


# P-tuning: the checkpoints hold the encoder's weights (the final adapter only its output); LSTM dropout replays too
RESUMED = {"lora": {}, "ptuning_lstm": {"peft__method": "ptuning", "peft__num_virtual_tokens": 3,
                                        "peft__encoder_reparameterization_type": "LSTM", "peft__encoder_hidden_size": 8,
                                        "peft__encoder_dropout": 0.1},
           "qlora": {"model__quantize": "nf4"}}  # LoRA (dropout 0.1) over an NF4 base, quantized again on resume  # fmt: skip


def test_resume_with_another_global_batch_fails_in_one_line(tiny_dir, data_cache, tmp_path):
    """The data order depends on the global batch: resuming with another one would not continue the run."""
    options = dict(eval__baseline=False, train__max_steps=4, train__eval_every=2, train__batch_size=4)
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path, **options)))
    more = {**options, "train__max_steps": 6, "train__resume": "auto", "train__batch_size": 2}
    with pytest.raises(FtcoreError, match=r"^sampler: the saved run's global batch is 4 x 1 x 1 = 4 .*, this run's "
                                          r"2 x 1 x 1 = 2; resume with the same global batch$"):  # fmt: skip
        train(run_config(tiny_run(tiny_dir, data_cache, tmp_path, **more)))
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path, **{**more, "train__batch_size": 2, "train__grad_accum": 2})))
    assert [e["step"] for e in read_metrics(tmp_path) if "loss" in e] == list(range(1, 7))  # 2 x 2 = 4: it continues


def epoch_files(tmp_path, n_train: int) -> dict:
    """The demo's first lines as a train file of n_train examples, with 20-example validation and test files."""
    lines = (ROOT / "ftcore" / "data" / "demo" / "arithmetic.jsonl").read_text().splitlines()
    files = {"path": lines[:n_train], "val_path": lines[n_train : n_train + 20],
             "test_path": lines[n_train + 20 : n_train + 40]}  # fmt: skip
    for key, rows in files.items():
        (tmp_path / f"{key}.jsonl").write_text("\n".join(rows) + "\n")
    return {f"data__{key}": str(tmp_path / f"{key}.jsonl") for key in files}


def test_epochs_set_the_length_and_resume_bit_exact(tiny_dir, data_cache, tmp_path, monkeypatch):
    """train.epochs=2 on 100 train examples with a global batch of 5 x 2 = 10 is 20 steps: the schedule ends at
    step 20, the data order crosses the epoch boundary, and a run stopped in the second epoch resumes exactly."""
    options = dict(**epoch_files(tmp_path, 100), train__max_steps=None, train__epochs=2, train__batch_size=5,
                   train__grad_accum=2, train__eval_every=10, train__eval_batches=1, eval__baseline=False,
                   eval__max_examples=4)  # fmt: skip
    cfg = run_config(tiny_run(tiny_dir, data_cache, tmp_path / "straight", **options))
    summary = train(cfg)
    assert (summary["step"], summary["max_steps"], summary["steps_per_epoch"]) == (20, 20, 10)
    report = json.loads((tmp_path / "straight" / "data_report.json").read_text())
    assert report["tokenize"]["train"]["examples"] == 100
    events = [e for e in read_metrics(tmp_path / "straight") if "loss" in e]
    assert [e["step"] for e in events] == list(range(1, 21))
    assert [e["epoch"] for e in events][9::10] == [1.0, 2.0] and events[13]["epoch"] == 1.4
    assert events[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)  # the decay ends at step 20
    assert json.loads((tmp_path / "straight" / "eval.json").read_text())["max_steps"] == 20
    assert ftcore.train.loop.epoch_label(cfg, 1.44) == "epoch 1.4/2"

    real_lr_at = sigterm_during(monkeypatch, 12)  # in the second epoch
    stopped = train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "resumed", **options)))
    assert stopped["status"].startswith("stopped by SIGTERM at step 13")
    monkeypatch.setattr(ftcore.train.loop, "lr_at", real_lr_at)
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "resumed", **options, train__resume="auto")))
    got = [e for e in read_metrics(tmp_path / "resumed") if "loss" in e]
    assert [(e["epoch"], e["loss"], e["lr"]) for e in got] == [(e["epoch"], e["loss"], e["lr"]) for e in events]
    # a checkpoint resumed over another train split (110 items: 11 steps an epoch) says so
    other = {**options, **epoch_files(tmp_path / "resumed", 110), "train__eval_every": 0,
             "train__resume": str(tmp_path / "straight" / "checkpoints" / "step_00000010")}  # fmt: skip
    with pytest.warns(UserWarning, match=r"^the train split changed: an epoch is 11 steps now, 10 in the checkpoint"):
        assert train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "other", **other)))["step"] == 22


@pytest.mark.parametrize("method", list(RESUMED))
def test_resume_after_sigterm_is_bit_exact(tiny_dir, data_cache, tmp_path, monkeypatch, method):
    options = {"eval__baseline": False, **RESUMED[method]}
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "straight", **options)))
    expected = read_metrics(tmp_path / "straight")

    real_lr_at = sigterm_during(monkeypatch, 4)
    stopped = train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "resumed", **options)))
    assert stopped["status"].startswith("stopped by SIGTERM at step 5")
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000005").is_dir()
    assert not (tmp_path / "resumed" / "final").exists()
    monkeypatch.setattr(ftcore.train.loop, "lr_at", real_lr_at)
    if method == "ptuning_lstm":
        saved = SafetensorsFile(tmp_path / "resumed" / "checkpoints" / "step_00000005" / "trainable.safetensors")
        assert {"prompt_encoder.embedding.weight", "prompt_encoder.lstm_head.weight_hh_l1_reverse",
                "prompt_encoder.mlp_head.2.weight"} <= set(saved.names())  # fmt: skip
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "resumed", **options, train__resume="auto")))
    got = read_metrics(tmp_path / "resumed")
    assert [e.get("loss") for e in got] == [e.get("loss") for e in expected]  # bit for bit, not approx
    assert [e.get("val_loss") for e in got] == [e.get("val_loss") for e in expected]
    a = json.loads((tmp_path / "straight" / "eval.json").read_text())["finetuned"]
    b = json.loads((tmp_path / "resumed" / "eval.json").read_text())["finetuned"]
    assert a == b
    if method == "ptuning_lstm":  # the final adapter is PEFT's: the encoder's output only
        assert SafetensorsFile(tmp_path / "resumed" / "final" / "adapter_model.safetensors").names() == [
            "prompt_embeddings"]


def test_early_stopping_keeps_best(tiny_dir, data_cache, tmp_path, monkeypatch):
    val = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])  # best at the 2nd evaluation, then 2 worse ones

    def fake_validation_loss(model, batcher, batches, device, autocast=None):
        return next(val) * 100, 100

    monkeypatch.setattr(ftcore.train.loop, "validation_loss", fake_validation_loss)
    cfg = tiny_run(tiny_dir, data_cache, tmp_path, train__max_steps=20, train__eval_every=2,
                   train__early_stopping_patience=2, train__keep_checkpoints=1, eval__baseline=False)  # fmt: skip
    result = train(run_config(cfg))
    assert result["status"] == "early stopping at step 8: no improvement in 2 evaluations"
    assert result["best_step"] == 4 and result["best_val_loss"] == 4.0
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()  # the best is never pruned


def test_cli_end_to_end(tiny_dir, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"model.path={tiny_dir}", "train.max_steps=4",
           "train.eval_every=2", "train.batch_size=4", "train.eval_batches=1", "eval.max_examples=4",
           "eval.max_new_tokens=3", "logger.wandb.mode=disabled", "logger.progress=false", f"data.cache_dir={data_cache}",
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "run_info.json", "data_report.json"):
        assert (run_dir / name).is_file(), name
    adapter_config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_dir)  # so export/generate find the base
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    gen = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--adapter", str(run_dir / "final"),
                          "--raw", "--max-new-tokens", "3", "1 + 2 ="], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert gen.returncode == 0 and gen.stdout.startswith(">>> 1 + 2 =\n"), gen.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    events = read_metrics(run_dir)
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4]
    assert all("lr" in e for e in events if "loss" in e)
    assert [e["step"] for e in events if "val_loss" in e] == [2, 4]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["metric"] == "accuracy" and report["n"] == 4 and "accuracy" in report["baseline"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["versions"]["torch"] and "sha" in info["git"]
    assert "max_steps: 4" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.schedule=cosin", "error: optim.schedule='cosin': expected one of cosine, linear, constant"),
        ("peft=lorra", "Could not find 'peft/lorra'"),
        ("train.max_stepz=3", "Key 'max_stepz' is not in struct"),
    ],
)
def test_cli_bad_config_names_the_key(override, message, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), override, f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_gradient_checkpointing_and_accumulation_keep_the_losses(tiny_dir, data_cache, tmp_path):
    base = dict(eval__baseline=False, train__max_steps=3, train__eval_every=0, peft__dropout=0.0)
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "a", **base)))
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "b", train__gradient_checkpointing=True, **base)))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)
    # batch 4 = 2 micro-batches of 2: the step loss is the same token-weighted mean
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "c", **{**base, "train__batch_size": 2}, train__grad_accum=2)))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "c"), abs=1e-5)


def test_bf16_autocast_trains_fp32_adapters(tiny_dir, data_cache, tmp_path):
    cfg = tiny_run(tiny_dir, data_cache, tmp_path, train__precision="bf16", model__dtype="bfloat16", eval__baseline=False,
                   train__max_steps=4)  # fmt: skip
    train(run_config(cfg))
    curve = losses(tmp_path)
    assert len(curve) == 4 and all(math.isfinite(x) for x in curve)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(policy, tiny_dir, data_cache, tmp_path, monkeypatch):
    real = ftcore.train.step.batch_loss_sum
    calls = {"n": 0}

    def nan_on_second_step(model, batch, device, *args):
        calls["n"] += 1
        loss, n = real(model, batch, device, *args)
        return (loss * float("nan") if calls["n"] == 2 else loss), n

    monkeypatch.setattr(ftcore.train.step, "batch_loss_sum", nan_on_second_step)
    cfg = run_config(tiny_run(tiny_dir, data_cache, tmp_path, train__on_nonfinite=policy, train__eval_every=0,
                              train__max_steps=4, eval__baseline=False))  # fmt: skip
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match="non-finite loss nan at step 2; lower optim.lr"):
            train(cfg)
    else:
        train(cfg)
        events = read_metrics(tmp_path)
        assert [e["step"] for e in events if e.get("skipped")] == [2]
        assert all(math.isfinite(e["loss"]) for e in events if "loss" in e and not e.get("skipped"))


def test_multirun_sweep(tiny_dir, data_cache, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "peft=lora,ia3", f"model.path={tiny_dir}",
           "train.max_steps=2", "train.eval_every=0", "train.batch_size=4", "eval.baseline=false", "eval.max_examples=2",
           "eval.max_new_tokens=2", "logger.wandb.mode=disabled", "logger.progress=false", f"data.cache_dir={data_cache}",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${peft.method}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for method in ("lora", "ia3"):
        assert json.loads((tmp_path / method / "final" / "adapter_config.json").read_text())["peft_type"] == method.upper()
        assert len(losses(tmp_path / method)) == 2


def test_cli_hra_and_ln_tuning(tiny_dir, data_cache, tmp_path):
    """peft=hra / peft=ln_tuning (conf/peft/*.yaml) train through the CLI; the adapters load back on their base."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "peft=hra,ln_tuning", f"model.path={tiny_dir}",
           "train.max_steps=2", "train.eval_every=0", "train.batch_size=4", "eval.baseline=false", "eval.max_examples=2",
           "eval.max_new_tokens=2", "logger.wandb.mode=disabled", "logger.progress=false", f"data.cache_dir={data_cache}",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${peft.method}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for method, peft_type, trainable in (("hra", "HRA", 2 * 8 * (6 * 64 + 128)), ("ln_tuning", "LN_TUNING", 5 * 64)):
        config = json.loads((tmp_path / method / "final" / "adapter_config.json").read_text())
        assert config["peft_type"] == peft_type and len(losses(tmp_path / method)) == 2
        model, _ = load_with_adapter(tmp_path / method / "final")
        assert model.peft_config.method == method and count_parameters(model)[0] == trainable


@pytest.mark.slow
def test_wandb_offline_run(tiny_dir, data_cache, tmp_path):
    pytest.importorskip("wandb")
    cfg = tiny_run(tiny_dir, data_cache, tmp_path, eval__baseline=False, train__max_steps=2, train__eval_every=0)
    cfg["logger"]["wandb"] = {"mode": "offline", "project": "ftcore-test", "group": "g", "tags": ["t"], "name": "n"}
    train(run_config(cfg))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
