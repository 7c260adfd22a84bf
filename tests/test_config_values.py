"""Every config value is range-checked when the config is built, before anything is loaded or trained:
nonsense that used to be accepted silently (or crashed only after training) fails with one line naming the key."""

import pytest

from ftcore.config import run_config
from ftcore.errors import FtcoreError


@pytest.mark.parametrize(
    "group, key, value, expected",
    [
        ("train", "eval_every", -1, "train.eval_every=-1: expected >= 0 (0 = only at the end)"),
        ("train", "save_every", -1, "train.save_every=-1: expected >= 0 (0 = at every evaluation)"),
        ("train", "eval_batches", -1, "train.eval_batches=-1: expected >= 0 (0 = the whole split)"),
        ("train", "early_stopping_patience", -2, "train.early_stopping_patience=-2: expected >= 0 (0 = never)"),
        ("train", "keep_checkpoints", 0, "train.keep_checkpoints=0: expected >= 1"),
        ("train", "max_steps", 0, "train.max_steps=0: expected >= 1"),
        ("train", "epochs", -1, "train.epochs=-1.0: expected >= 0 (0 = train.max_steps sets the length)"),
        ("optim", "grad_clip", -1, "optim.grad_clip=-1.0: expected >= 0 (0 = no clipping)"),
        ("optim", "betas", [0.9], "optim.betas=[0.9]: expected two numbers in [0, 1)"),
        ("optim", "betas", [0.9, 1.5], "optim.betas=[0.9, 1.5]: expected two numbers in [0, 1)"),
        ("optim", "eps", 0, "optim.eps=0.0: expected > 0"),
        ("optim", "weight_decay", -0.1, "optim.weight_decay=-0.1: expected >= 0"),
        ("optim", "lr", float("nan"), "optim.lr=nan: expected a finite number"),
        ("optim", "lr", float("inf"), "optim.lr=inf: expected a finite number"),
        ("eval", "batch_size", 0, "eval.batch_size=0: expected >= 1"),
        ("eval", "max_examples", -1, "eval.max_examples=-1: expected >= 0 (0 = the whole split)"),
        ("eval", "max_new_tokens", -5, "eval.max_new_tokens=-5: expected >= 0 (0 = the task's default)"),
    ],
)
def test_out_of_range_values_fail_naming_the_key(group, key, value, expected):
    with pytest.raises(FtcoreError) as e:
        run_config({group: {key: value}})
    assert str(e.value).startswith(expected)


def test_the_limits_themselves_are_accepted():
    cfg = run_config({"train": {"eval_every": 0, "save_every": 0, "eval_batches": 0, "keep_checkpoints": 1},
                      "optim": {"grad_clip": 0, "betas": [0.0, 0.5], "weight_decay": 0},
                      "eval": {"batch_size": 1, "max_examples": 0, "max_new_tokens": 0}})  # fmt: skip
    assert cfg.optim.betas == (0.0, 0.5) and cfg.eval.batch_size == 1
