"""AdaLoRA: 20 steps of ftcore's training step against a plain PyTorch loop over HF PEFT's AdaLoRA model on the same
batches (same losses, same rank pattern), the pruned adapter both ways, config errors."""

import copy

import pytest
import torch
from test_train import data_cache, tiny_dir, tiny_run  # noqa: F401 - pytest fixtures

from ftcore.config import OptimConfig
from ftcore.data.format import IGNORE
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.peft import PeftConfig, apply, count_parameters, load_adapter, save_adapter
from ftcore.peft.adalora import AdaLoraStep
from ftcore.train.optim import build_optimizer
from ftcore.train.parallel import World
from ftcore.train.step import EagerStep

peft = pytest.importorskip("peft")

STEPS = 20
SCHEDULE = dict(init_r=6, target_r=2, tinit=3, tfinal=6, deltaT=2, total_step=STEPS)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def batches(vocab: int):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (4, 12), generator=g) for _ in range(STEPS)]


def ours_batch(tokens):
    b, t = tokens.shape
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]  # HF's shifted labels
    return {"input_ids": tokens, "targets": targets, "attention_mask": torch.ones_like(tokens),
            "position_ids": torch.arange(t).expand(b, t)}  # fmt: skip


def peft_run(ref, data):
    """PEFT's documented loop: loss (with the regularizer: task_type=CAUSAL_LM and labels), backward, step,
    update_and_allocate(step), zero_grad."""
    config = peft.AdaLoraConfig(**SCHEDULE, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(ref), config)
    init = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i, x in enumerate(data):
        loss = pm(input_ids=x, labels=x).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(i)
        opt.zero_grad()
    return pm, init, losses


def ours_run(path, init, data):
    model = apply(load_model(path), PeftConfig(method="adalora", **SCHEDULE, alpha=8, dropout=0.0,
                                               target_modules=TARGETS))  # fmt: skip
    with torch.no_grad():  # PEFT's initial values (its init draws from the global RNG in another order)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(init[f"base_model.model.model.{n}.default"])
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.01, grad_clip=0.0))
    step = EagerStep(model, optimizer, World(), grad_clip=0.0, method=AdaLoraStep(model.adalora, 0.5))
    losses = []
    for x in data:
        batch = ours_batch(x)
        tokens = int((batch["targets"] != IGNORE).sum())
        with torch.no_grad():
            reg = step.method.regularizer().item()
        loss_sum, _ = step([batch], tokens)
        losses.append(loss_sum / tokens + reg)  # what PEFT reports: the task loss plus the penalty
    return model, losses


@pytest.fixture(scope="module")
def runs(hf_checkpoint):
    path, ref = hf_checkpoint("llama_gqa_llama3")
    data = batches(ref.config.vocab_size)
    pm, init, peft_losses = peft_run(ref, data)
    model, our_losses = ours_run(path, init, data)
    return path, ref, pm, model, peft_losses, our_losses


def test_losses_and_rank_pattern_equal_peft(runs):
    _, _, pm, model, peft_losses, our_losses = runs
    diffs = [abs(a - b) for a, b in zip(our_losses, peft_losses)]
    print(f"max abs loss diff over {STEPS} steps: {max(diffs):.2e}")
    assert max(diffs) < 1e-5
    assert peft_losses[-1] < peft_losses[0] - 0.1  # it trains
    expected = {k.removesuffix(".default"): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    ours = {f"model.{n}.lora_E": kept for n, kept in model.adalora.rank_pattern.items()}
    assert ours == expected
    kept = [sum(v) for v in ours.values()]
    assert sum(kept) == 2 * len(ours) and len(set(kept)) > 1  # the budget, unevenly allocated


def test_pruned_adapter_moves_both_ways(runs, tmp_path):
    path, ref, pm, model, _, _ = runs
    tokens = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    pm.eval()
    model.eval()
    with torch.no_grad():
        expected = pm(input_ids=tokens).logits
        assert (model(tokens) - expected).abs().max() < 1e-4
    save_adapter(model, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "ours", is_trainable=True).eval()
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(load_model(path).eval(), tmp_path / "peft")
    with torch.no_grad():
        assert (again(input_ids=tokens).logits - expected).abs().max() < 1e-4
        assert (loaded(tokens) - expected).abs().max() < 1e-4
    assert count_parameters(loaded) == again.get_nb_trainable_parameters()  # the pruned sizes


@pytest.mark.parametrize("change, expected", [
    (dict(target_r=6), r"peft.target_r=6: expected an integer in \[0, init_r=6\)"),
    (dict(tinit=14), r"peft.tinit=14: expected < total_step - tfinal = 14"),
    (dict(beta1=1.0), r"peft.beta1=1.0: expected a number in \(0, 1\)"),
    (dict(deltaT=0), r"peft.deltaT=0: expected >= 1"),
])  # fmt: skip
def test_bad_schedule_fails_naming_the_key(change, expected):
    with pytest.raises(FtcoreError, match=expected):
        PeftConfig(method="adalora", **{**SCHEDULE, **change})


def test_an_adalora_option_on_another_method_fails():
    with pytest.raises(FtcoreError, match=r"peft.target_r=2: expected it unset: it is an option of adalora, not of "):
        PeftConfig(method="lora", target_r=2)


def test_the_loop_trains_and_resumes_exactly(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    """train() with AdaLoRA: the allocator's averages, mask and step count go into checkpoints, so a run stopped
    at step 5 and resumed ends exactly as the uninterrupted one (losses and the saved rank pattern)."""
    import json
    import os
    import signal

    import ftcore.train.loop
    from ftcore.config import run_config
    from ftcore.train import train
    from ftcore.train.log import read_metrics

    over = dict(peft__method="adalora", peft__init_r=4, peft__target_r=2, peft__tinit=1, peft__tfinal=2,
                eval__baseline=False, train__eval_every=0, train__save_every=0)  # fmt: skip
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "straight", **over)))
    real = ftcore.train.loop.lr_at

    def sigterm_at_5(step, cfg, max_steps):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, cfg, max_steps)

    monkeypatch.setattr(ftcore.train.loop, "lr_at", sigterm_at_5)
    assert train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "resumed", **over)))["signal"] == "SIGTERM"
    monkeypatch.undo()
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "resumed", **over, train__resume="auto")))
    losses = [[e["loss"] for e in read_metrics(tmp_path / d) if "loss" in e] for d in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    configs = [json.loads((tmp_path / d / "final" / "adapter_config.json").read_text())
               for d in ("straight", "resumed")]  # fmt: skip
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"] and configs[0]["total_step"] == 8
    assert sum(map(sum, configs[0]["rank_pattern"].values())) == 2 * len(configs[0]["rank_pattern"])
