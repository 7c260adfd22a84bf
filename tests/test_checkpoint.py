"""Atomic checkpoints: only complete ones are found, pruning keeps the newest and the best."""

import random

import numpy as np
import pytest
import torch

from ftcore.errors import FtcoreError
from ftcore.train import checkpoint


def small_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


def test_round_trip_restores_params_and_rng(tmp_path):
    model = small_model()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    path = checkpoint.save(tmp_path, 7, model, {"optimizer": {"x": 1}})
    expected = (torch.rand(3), random.random(), np.random.rand())
    saved = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = checkpoint.load(path, model)
    assert state["step"] == 7 and state["optimizer"] == {"x": 1}
    assert torch.equal(model[1].weight, saved["1.weight"])  # trainable: restored
    assert torch.equal(model[0].weight, saved["0.weight"] + 1)  # frozen: not in the checkpoint
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_latest_ignores_partial_and_prunes(tmp_path):
    model = small_model()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, {"best_step": 2}, keep=2)
    (tmp_path / ".tmp_step_crashed").mkdir()  # what a crash mid-write leaves
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000002", "step_00000003", "step_00000004"]  # newest 2 + the best
    assert checkpoint.latest(tmp_path).name == "step_00000004"
    assert checkpoint.latest(tmp_path / "none") is None


def test_load_rejects_other_model(tmp_path):
    path = checkpoint.save(tmp_path, 1, small_model(), {})
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    other[0].requires_grad_(False)
    with pytest.raises(FtcoreError, match=r"tensor '1\.bias' has shape \[2\], model has \[3\]"):
        checkpoint.load(path, other)
