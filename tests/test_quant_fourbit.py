"""NF4/FP4 blockwise quantization bit for bit against bitsandbytes (CPU), with and without double quantization."""

import pytest
import torch

from ftcore.quant.fourbit import NESTED_BLOCK, code4, dequantize_4bit, dynamic_map, quantize_4bit

bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the reference (test-only)")

SHAPES = [(64, 512), (96, 200), (7, 33), (1000,)]  # whole blocks, a short last block, an odd count, 1-d


def weights(shape, dtype, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    w.view(-1)[3] = 0.0  # an exact zero
    w.view(-1)[5] = w.abs().max() * 1.5  # a block whose absmax stands out
    return w.to(dtype)


def test_codebooks_and_dynamic_map_equal_bitsandbytes():
    assert torch.equal(code4("nf4"), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code4("fp4"), bnb.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_bytes_absmax_and_dequantized_values_equal_bitsandbytes(quant_type, dtype, block_size, shape):
    w = weights(shape, dtype, seed=0)
    ref, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type=quant_type, compress_statistics=False)
    q = quantize_4bit(w, quant_type, block_size)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, ref.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    chunked = quantize_4bit(w, quant_type, block_size, chunk=3 * block_size)  # 3 blocks at a time: the same
    assert torch.equal(chunked.packed, q.packed) and torch.equal(chunked.absmax, q.absmax)
    ours = dequantize_4bit(q)
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours.view(-1), bnb.dequantize_4bit(ref, state).view(-1))
    # within half a code step of the block's absmax (NF4's widest gap is 0.30, FP4's 0.33)
    assert (ours.float() - w.float()).abs().max() <= 0.17 * w.float().abs().max()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_double_quantization_equals_bitsandbytes(quant_type, dtype, seed):
    """The 8-bit absmax codes: equal, except where bitsandbytes' CPU table search returns the second-nearest
    code of the dynamic map (its CUDA kernel takes the nearest, as ftcore does): each such entry is checked to
    be one. The dequantized weights then equal bitsandbytes' dequantize_4bit of our quantization exactly."""
    w = weights((256, 320), dtype, seed)  # 1280 blocks of 64 -> 5 blocks of 256 absmax values
    ref, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    q = quantize_4bit(w, quant_type, 64, double_quant=True)
    assert torch.equal(q.packed, ref.view(-1)) and torch.equal(q.offset, state.offset)
    assert torch.equal(q.nested_absmax, state.state2.absmax) and q.nested_absmax.numel() == 1280 // NESTED_BLOCK
    code = dynamic_map().clone()  # (bitsandbytes may write into a code it is given)
    absmax = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type)[1].absmax  # the float32 absmax
    target = (absmax - absmax.mean()) / q.nested_absmax.repeat_interleave(NESTED_BLOCK)  # in [-1, 1]
    differ = (q.absmax != state.absmax).nonzero().view(-1)
    ours_dist = (code[q.absmax.long()] - target).abs()
    theirs_dist = (code[state.absmax.long()] - target).abs()
    assert (ours_dist <= theirs_dist).all()  # ours is never farther
    assert (theirs_dist[differ] > ours_dist[differ]).all() and len(differ) < 0.02 * len(target)
    assert ((q.absmax.long() - state.absmax.long())[differ].abs() == 1).all()  # the neighbouring code
    ours_state = bnb.QuantState(absmax=q.absmax, shape=w.shape, code=code4(quant_type).clone(), blocksize=64,
                                quant_type=quant_type, dtype=dtype, offset=q.offset,
                                state2=bnb.QuantState(absmax=q.nested_absmax, code=code, blocksize=NESTED_BLOCK,
                                                       dtype=torch.float32))  # fmt: skip
    assert torch.equal(dequantize_4bit(q), bnb.dequantize_4bit(q.packed.view(-1, 1), ours_state))
