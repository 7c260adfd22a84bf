"""Linear4bit: the dequantize-then-matmul forward, the input gradient, what autograd keeps, bad block sizes."""

import pytest
import torch
import torch.nn.functional as F

from ftcore.errors import FtcoreError
from ftcore.quant import Linear4bit, dequantize_4bit, quantize_4bit
from ftcore.quant.linear import QuantSpec


def layer(dtype=torch.float32, quant_type="nf4", double_quant=True, bias=True):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 128, generator=g) * 0.1).to(dtype)
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    return Linear4bit.from_weight(w, b, QuantSpec(quant_type, 64, double_quant)), w, b


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_input_gradient_equal_plain_autograd(quant_type, double_quant):
    lin, w, b = layer(quant_type=quant_type, double_quant=double_quant)
    deq = dequantize_4bit(quantize_4bit(w, quant_type, 64, double_quant))
    assert torch.equal(lin.dequantized(), deq) and (deq - w).abs().max() <= 0.17 * w.abs().max()  # half the widest gap
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = lin(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, deq, b)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert (x.grad - ref_x.grad).abs().max() < 1e-5
    assert all(p.grad is None and not p.requires_grad for p in lin.parameters())


def test_autograd_keeps_no_full_precision_weight():
    lin, _, _ = layer()
    saved = []
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x).sum().backward()
    assert not any(t.numel() >= 48 * 128 for t in saved), [tuple(t.shape) for t in saved]


def test_bf16_input_and_autocast_compute_in_bf16():
    lin, w, _ = layer(dtype=torch.bfloat16, bias=False)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert torch.equal(lin(x), F.linear(x, lin.dequantized(torch.bfloat16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(torch.randn(2, 128))
    assert y.dtype == torch.bfloat16


def test_storage_shapes_shard_by_rows():
    lin, _, _ = layer()
    assert lin.packed.shape == (48, 64) and lin.packed.dtype == torch.uint8
    assert lin.absmax.shape == (48, 2) and lin.absmax.dtype == torch.uint8  # double-quantized codes
    assert lin.nested_absmax.shape == (1,) and lin.offset.shape == ()
    plain, _, _ = layer(double_quant=False)
    assert plain.absmax.dtype == torch.int32 and plain.nested_absmax is None  # float32 bits, exact under FSDP2 bf16
    assert torch.equal(plain.quantized().absmax, quantize_4bit(plain.dequantized(), "nf4", 64).absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_dtype_cast_of_the_model_leaves_the_scales_exact(double_quant):
    """model.to(torch.bfloat16) casts floating tensors: the float32 scales are stored as int32 bits, so it cannot."""
    lin, _, _ = layer(double_quant=double_quant)
    before = lin.dequantized()
    assert torch.equal(torch.nn.Sequential(lin).to(torch.bfloat16)[0].dequantized(), before)


def test_the_weight_view_routes_f_linear_and_refuses_writes():
    """F.linear with keywords takes the 4-bit matmul too; writes through .data or .detach() are refused like copy_."""
    lin, _, b = layer()
    x = torch.randn(2, 128)
    ref = F.linear(x, lin.dequantized(), b)
    assert torch.equal(F.linear(x, weight=lin.weight, bias=b), ref)
    assert torch.equal(F.linear(input=x, weight=lin.weight, bias=b), ref)
    for view in (lin.weight.data, lin.weight.detach()):
        with pytest.raises(FtcoreError, match=r"^copy_: the base weight is quantized \(model.quantize\) and frozen"):
            view.copy_(torch.zeros(48, 128))
    assert torch.equal(lin.weight.float(), lin.dequantized()) and lin.weight.shape == (48, 128)


def test_a_block_size_that_does_not_divide_the_row_names_the_tensor():
    with pytest.raises(FtcoreError, match=r"^layers.0.mlp.up_proj.weight: model.quant_block_size=64 does not divide "
                                          r"the row length 96 of this \[8, 96\] weight"):  # fmt: skip
        Linear4bit.from_weight(torch.randn(8, 96), None, QuantSpec("nf4", 64, True), "layers.0.mlp.up_proj.weight")


def test_equals_bitsandbytes_matmul_4bit():
    bnb = pytest.importorskip("bitsandbytes")
    lin, w, b = layer(bias=False)
    qw, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    plain = Linear4bit.from_weight(w, None, QuantSpec("nf4", 64, False))
    x = torch.randn(3, 128)
    ref = bnb.matmul_4bit(x, qw.t(), quant_state=state)
    assert (plain(x) - ref).abs().max() < 1e-5
