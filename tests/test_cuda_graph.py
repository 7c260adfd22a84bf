"""The CUDA-graph step against the eager step: config checks, the static step's logic (CPU, no capture), and
capture/replay (GPU)."""

import pytest
import torch

from ftcore import peft
from ftcore.bench.batches import random_batches
from ftcore.config import run_config
from ftcore.data.format import IGNORE
from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer
from ftcore.train.optim import OptimConfig, build_optimizer, lr_at, set_lr
from ftcore.train.parallel import World
from ftcore.train.step import EagerStep, GraphedStep, set_fast_paths

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPTIM = OptimConfig(lr=3e-3, warmup_steps=3, weight_decay=0.01)
STEPS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "needs fixed batch shapes: set data.packing=true or data.static_shape=true"),
        ({"data": {"static_shape": True}, "train": {"precision": "fp16"}}, "precision=fp16"),
        ({"data": {"static_shape": True}, "train": {"on_nonfinite": "skip"}}, "on_nonfinite=stop"),
        ({"data": {"static_shape": True}, "dist": {"backend": "ddp"}}, "dist=single only"),
    ],
)
def test_config_errors(overrides, message):
    """Refused when the config is built, before anything is loaded."""
    d = {"train": {"cuda_graph": True, **overrides.get("train", {})}, "data": overrides.get("data", {}),
         "dist": overrides.get("dist", {})}  # fmt: skip
    with pytest.raises(FtcoreError, match=f"^train.cuda_graph: .*{message}"):
        run_config(d)
    run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True}})


def lora_model(device, fused_kernels: bool = False, fused_lora: bool = False) -> Transformer:
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    model.to(device)
    torch.manual_seed(0)
    peft.apply(model, peft.PeftConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    set_fast_paths(model, fused_kernels=fused_kernels, loss_chunk_size=1024, fused_lora=fused_lora)
    return model.train()


def batches(n: int, B: int = 2, T: int = 32, seed: int = 0) -> list[dict]:
    """Packed rows of random documents, loss on the second half of each (static shape [B, T])."""
    return random_batches(97, B, T, n, seed)


def eager_step(model, optimizer) -> EagerStep:
    """The loop's step: selected-token loss, token-weighted mean over micro-batches, clip, AdamW."""
    return EagerStep(model, optimizer, World(device=next(model.parameters()).device), grad_clip=OPTIM.grad_clip)


def graphed_step(model, optimizer, capture: bool) -> GraphedStep:
    return GraphedStep(model, optimizer, eager_step(model, optimizer), grad_clip=OPTIM.grad_clip, capture=capture)


def run_steps(model, make_step, data, grad_accum: int, steps: int = STEPS) -> list[tuple[float, float]]:
    """(mean loss, grad norm) of `steps` steps of make_step(model, optimizer) over consecutive micro-batches."""
    optimizer = build_optimizer(model, OPTIM)
    step_fn, losses = make_step(model, optimizer), []
    for step in range(steps):
        set_lr(optimizer, lr_at(step, OPTIM, steps))
        micro = data[step * grad_accum : (step + 1) * grad_accum]
        tokens = sum(int((b["targets"] != IGNORE).sum()) for b in micro)
        loss_sum, grad_norm = step_fn(micro, tokens)
        losses.append((loss_sum / tokens, grad_norm))
    return losses


def test_static_step_equals_eager_on_cpu():
    """The step the graph records (all positions, masked loss, device-side clip), run eagerly: 8 steps of 2."""
    data = batches(4) * 4  # the same micro-batches again and again: the loss must fall
    want = run_steps(lora_model("cpu"), eager_step, data, grad_accum=2, steps=8)
    uncaptured = lambda m, o: graphed_step(m, o, capture=False)  # noqa: E731
    got = run_steps(lora_model("cpu"), uncaptured, data, grad_accum=2, steps=8)
    assert [x for pair in got for x in pair] == pytest.approx([x for pair in want for x in pair], rel=1e-5, abs=1e-6)
    assert want[6][0] < want[0][0]  # step 7 sees step 1's micro-batches: it learned


def test_new_shape_falls_back():
    model = lora_model("cpu")
    optimizer = build_optimizer(model, OPTIM)
    eager_calls = []
    step = GraphedStep(model, optimizer, lambda micro, tokens: eager_calls.append(micro) or (1.0, 2.0), capture=False)
    assert step(batches(1), 10) != (1.0, 2.0)
    odd = batches(1, T=16)
    assert step(odd, 10) == (1.0, 2.0) and eager_calls == [odd]  # this step runs eagerly
    assert step(batches(1, seed=3), 10) != (1.0, 2.0) and len(eager_calls) == 1


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("switches", [{}, {"fused_kernels": True, "fused_lora": True}], ids=["eager-ops", "fused"])
def test_graph_replay_equals_eager(grad_accum, switches):
    data = batches(STEPS * grad_accum)
    # the kernels and the fused LoRA node are captured as well
    want = run_steps(lora_model("cuda", **switches), eager_step, data, grad_accum)
    captured = lambda m, o: graphed_step(m, o, capture=True)  # noqa: E731
    got = run_steps(lora_model("cuda", **switches), captured, data, grad_accum)
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in want], rel=1e-5, abs=1e-6)
    assert [norm for _, norm in got] == pytest.approx([norm for _, norm in want], rel=1e-4, abs=1e-6)


@needs_cuda
@pytest.mark.cuda
def test_graph_survives_an_eager_step_in_between():
    """A batch of another shape runs eagerly (the fallback step); replays after it continue the same run."""
    data = batches(6)
    odd = batches(1, T=16, seed=9)[0]
    results = []
    for capture in (False, True):
        model = lora_model("cuda")
        optimizer = build_optimizer(model, OPTIM)
        step_fn, losses = graphed_step(model, optimizer, capture), []
        for i, b in enumerate(data[:3] + [odd] + data[3:]):
            set_lr(optimizer, lr_at(i, OPTIM, 7))
            tokens = int((b["targets"] != IGNORE).sum())
            losses.append(step_fn([b], tokens)[0] / tokens)
        results.append(losses)
    assert results[1] == pytest.approx(results[0], rel=1e-5, abs=1e-6)


def test_train_refuses_before_loading(tmp_path):
    from ftcore.train import train

    cfg = run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True, "device": "cpu"},
                      "run_dir": str(tmp_path)})  # fmt: skip
    with pytest.raises(FtcoreError, match="train.cuda_graph: it needs a CUDA device"):
        train(cfg)
    assert not any(tmp_path.iterdir())
