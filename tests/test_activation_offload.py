"""train.activation_offload: autograd's saved tensors in pinned host memory (CUDA); the same steps as without it;
a no-op with a warning on CPU; refused with train.cuda_graph."""

import pytest
import torch
from test_cuda_graph import OPTIM, batches, lora_model, run_steps
from test_train import data_cache, tiny_dir, tiny_run  # noqa: F401 - pytest fixtures

from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.train import train
from ftcore.train.parallel import World
from ftcore.train.step import EagerStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def offloaded_step(model, optimizer):
    return EagerStep(model, optimizer, World(device=next(model.parameters()).device), grad_clip=OPTIM.grad_clip,
                     activation_offload=True)  # fmt: skip


def plain_step(model, optimizer):
    return EagerStep(model, optimizer, World(device=next(model.parameters()).device), grad_clip=OPTIM.grad_clip)


@needs_cuda
@pytest.mark.cuda
def test_offloaded_steps_equal_the_plain_ones_on_a_gpu(monkeypatch):
    data = [{k: v.cuda() for k, v in b.items()} for b in batches(8)]
    moved = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):  # the pinned host copies saved_on_host makes
        if kwargs.get("pin_memory"):
            moved.append(args[0])
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counting_empty)
    offloaded = run_steps(lora_model("cuda"), offloaded_step, data, grad_accum=2, steps=4)
    monkeypatch.setattr(torch, "empty", real_empty)
    plain = run_steps(lora_model("cuda"), plain_step, data, grad_accum=2, steps=4)
    assert moved, "no activation went to the host"
    params = {tuple(p.shape) for p in lora_model("cuda").parameters()}
    assert not any(tuple(size) in params and len(size) == 2 and size[0] > 64 for size in moved)  # no weights
    for (a, ga), (b, gb) in zip(offloaded, plain):
        assert a == pytest.approx(b, abs=1e-6) and float(ga) == pytest.approx(float(gb), rel=1e-5)


def test_on_cpu_it_is_a_no_op_with_a_warning(tiny_dir, data_cache, tmp_path):  # noqa: F811
    cfg = tiny_run(tiny_dir, data_cache, tmp_path / "run", train__max_steps=1, train__eval_every=0,
                   eval__baseline=False, eval__max_examples=1, train__activation_offload=True)  # fmt: skip
    with pytest.warns(UserWarning, match=r"^train.activation_offload: a no-op on cpu \(activations are in host"):
        train(run_config(cfg))


def test_cuda_graph_refuses_it():
    with pytest.raises(FtcoreError, match=r"^train.cuda_graph: train.activation_offload copies to the host"):
        run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True, "activation_offload": True}})
