"""Checkpoints: atomic, verified by their manifest (a damaged newest one is skipped for the previous one),
pruned to the newest and the best; a full disk or a damaged file is one FtcoreError."""

import errno
import json
import random
import re

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
    assert checkpoint.newest_valid(tmp_path).name == "step_00000004"
    assert checkpoint.newest_valid(tmp_path / "none") is None


def test_load_rejects_other_model(tmp_path):
    path = checkpoint.save(tmp_path, 1, small_model(), {})
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    other[0].requires_grad_(False)
    with pytest.raises(FtcoreError, match=r"tensor '1\.bias' has shape \[2\], model has \[3\]"):
        checkpoint.load(path, other)


def test_the_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    path = checkpoint.save(tmp_path, 1, small_model(), {})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "ftcore-checkpoint/1"
    assert sorted(manifest["files"]) == ["state.pt", "trainable.safetensors"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint.verify(path) is None


def damage_truncate(path):
    data = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(data[: len(data) // 2])


def damage_flip_a_byte(path):
    data = bytearray((path / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "trainable.safetensors").write_bytes(bytes(data))


def damage_remove_the_parameters(path):
    (path / "trainable.safetensors").unlink()


def damage_corrupt_the_manifest(path):
    (path / "manifest.json").write_text('{"files": [')


@pytest.mark.parametrize("damage, reason", [
    (damage_truncate, r"state\.pt has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    (damage_flip_a_byte, r"trainable\.safetensors differs from the manifest's checksum \(corrupt\)"),
    (damage_remove_the_parameters, r"trainable\.safetensors is missing"),
    (damage_corrupt_the_manifest, r"manifest\.json is corrupt"),
])  # fmt: skip
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage, reason):
    model = small_model()
    for step in (2, 4):
        checkpoint.save(tmp_path, step, model, {}, keep=0)
    damage(tmp_path / "step_00000004")
    assert re.fullmatch(reason, checkpoint.verify(tmp_path / "step_00000004"))
    with pytest.warns(UserWarning, match=f"step_00000004: {reason}; skipped \\(moved to step_00000004.corrupt\\)"):
        assert checkpoint.newest_valid(tmp_path) == tmp_path / "step_00000002"
    assert (tmp_path / "step_00000004.corrupt").is_dir()  # kept for inspection, never the newest for prune
    assert checkpoint.step_dirs(tmp_path) == [tmp_path / "step_00000002"]


def test_a_checkpoint_without_manifest_is_used_if_its_files_load(tmp_path):
    model = small_model()
    (checkpoint.save(tmp_path, 2, model, {}, keep=0) / "manifest.json").unlink()
    assert checkpoint.newest_valid(tmp_path) == tmp_path / "step_00000002"
    (tmp_path / "step_00000002" / "state.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"state\.pt: cannot read it \(0 bytes; truncated or corrupt"):
        assert checkpoint.newest_valid(tmp_path) is None


@pytest.mark.parametrize("content, expected", [
    (b"", r"state\.pt: cannot read it \(0 bytes; truncated or corrupt"),
    (None, r"state\.pt: cannot read it \(\d+ bytes; truncated or corrupt"),  # half of it
])  # fmt: skip
def test_loading_a_truncated_state_is_one_error(tmp_path, content, expected):
    model = small_model()
    path = checkpoint.save(tmp_path, 1, model, {})
    data = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(FtcoreError, match=expected):
        checkpoint.load(path, model)


def test_loading_without_the_parameters_file_is_one_error(tmp_path):
    model = small_model()
    path = checkpoint.save(tmp_path, 1, model, {})
    (path / "trainable.safetensors").unlink()
    with pytest.raises(FtcoreError, match=r"trainable\.safetensors: missing \(the checkpoint is incomplete\)"):
        checkpoint.load(path, model)


def filling_disk(after_bytes: int):
    """An `open` for ftcore.train.checkpoint whose binary files fail with ENOSPC after `after_bytes`."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    return lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k)) if mode == "wb" else \
        real_open(path, mode, *a, **k)  # fmt: skip


def test_a_full_disk_at_the_state_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    model = small_model()
    checkpoint.save(tmp_path, 1, model, {"optimizer": {"x": torch.zeros(100)}})
    monkeypatch.setattr(checkpoint, "open", filling_disk(200), raising=False)
    with pytest.raises(FtcoreError, match=r"step_00000002: cannot write the checkpoint \(No space left on device; "
                       r"[\d.]+ GiB free\); the older checkpoints are intact"):  # fmt: skip
        checkpoint.save(tmp_path, 2, model, {"optimizer": {"x": torch.zeros(100)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no .tmp_step_* left
    assert checkpoint.verify(tmp_path / "step_00000001") is None


def test_a_full_disk_at_the_parameters_write_is_one_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" })')  # fmt: skip

    monkeypatch.setattr(checkpoint, "save_safetensors", full)
    with pytest.raises(FtcoreError, match=r"step_00000001: cannot write the checkpoint \(Error while serializing: "
                       r"IoError.*No space left on device.*GiB free\)"):  # fmt: skip
        checkpoint.save(tmp_path, 1, small_model(), {})
    assert list(tmp_path.iterdir()) == []
