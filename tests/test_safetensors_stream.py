"""StreamedSafetensors: a file written one tensor at a time reads back, with the safetensors library, as the tensors."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ftcore.formats.safetensors import StreamedSafetensors


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"b": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.arange(7), "empty": torch.empty(0, 4),
            "c": torch.randn(2, generator=g).double(), "flag": torch.tensor([True, False])}  # fmt: skip


def test_streamed_file_reads_back_with_the_safetensors_library(tmp_path):
    ts = tensors()
    with StreamedSafetensors(tmp_path / "x.safetensors", {k: (v.shape, v.dtype) for k, v in ts.items()},
                             {"note": "streamed"}) as out:  # fmt: skip
        for k, v in ts.items():
            out.write(k, v)
    got = load_file(tmp_path / "x.safetensors")
    assert got.keys() == ts.keys() and all(got[k].dtype == ts[k].dtype and torch.equal(got[k], ts[k]) for k in ts)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "streamed"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left


def test_a_non_contiguous_tensor_is_written_in_its_logical_order(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t()  # [4, 3], strided
    with StreamedSafetensors(tmp_path / "t.safetensors", {"t": ((4, 3), torch.float32)}) as out:
        out.write("t", t)
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], t)


def test_out_of_order_or_missing_tensors_fail_and_leave_no_file(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    with pytest.raises(ValueError, match=r"tensor 'b' \[3\] torch.float32: expected 'a' \[2\] torch.float32"):
        with StreamedSafetensors(tmp_path / "x.safetensors", specs) as out:
            out.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"tensor 'b' was never written"):
        with StreamedSafetensors(tmp_path / "x.safetensors", specs) as out:
            out.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensor 'a' \[2, 1\] torch.float32: expected 'a' \[2\]"):
        with StreamedSafetensors(tmp_path / "x.safetensors", specs) as out:
            out.write("a", torch.zeros(2, 1))
    assert list(tmp_path.iterdir()) == []
