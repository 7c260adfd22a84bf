"""4-bit blockwise quantization (QLoRA's NF4 and FP4), bit for bit as bitsandbytes stores it.

    w [out, in] ─ flatten ─ blocks of `block_size` ─ absmax per block ─ w / absmax in [-1, 1]
                ─ nearest of the 16 code values ─ 4-bit index ─ two per byte (first value in the high nibble)

Double quantization (QLoRA section 3) stores the float32 absmax in 8 bits too: the mean (`offset`) is
subtracted, then blocks of 256 are quantized to the nearest of bitsandbytes' 256-value dynamic map, with
one float32 absmax per block of 256. "Nearest" is exact here, as in bitsandbytes' CUDA kernel; its CPU
library finds the code by an approximate table search that picks the second-nearest code for some values
(tests/test_quant_fourbit.py shows every such difference is one). Dequantizing reverses it: absmax = code8[q] * absmax2 + offset;
w = code4[index] * absmax, computed in float32 and then cast.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch

# QLoRA's NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (bitsandbytes' table)
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
       1.0)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit; bitsandbytes' bias) in bit-pattern order, divided by the max (12)
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCK = 256  # the block of the double quantization


@lru_cache(maxsize=None)
def code4(quant_type: str, device=None) -> torch.Tensor:
    """The 16 values [16] a 4-bit index stands for, float32, in index order (one cached tensor per device:
    do not modify it)."""
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32, device=device)
    raw = torch.tensor(FP4_RAW, dtype=torch.float32, device=device)
    return raw / raw.abs().max()


@lru_cache(maxsize=None)
def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map [256], sorted: per decade 10^-6..10^0 a growing number of
    evenly spaced fraction values (both signs), then 0 and 1 (Dettmers 2015, "8-bit approximations").
    One cached tensor per device: do not modify it."""
    values = []
    for i in range(7):  # max_exponent_bits = 7, 7 non-sign bits
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """values [n] times their block's absmax, float32 [n] (the last block may be shorter)."""
    n = values.numel()
    if n % block == 0:
        return (values.view(-1, block) * absmax.view(-1, 1)).view(-1)
    return values * absmax.repeat_interleave(block)[:n]


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest value of `code` for each entry (code in any order; ties to the lower value)."""
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    position = torch.bucketize(scaled, midpoints, out_int32=True)  # the index into the sorted code
    if torch.equal(order, torch.arange(len(code), device=code.device)):  # NF4, the dynamic map: sorted already
        return position.to(torch.uint8)
    return order.to(torch.uint8)[position]


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block [ceil(n / block)], flat / its block's absmax clamped to [-1, 1]) for a float32 [n]."""
    n = flat.numel()
    full = n - n % block
    absmax = flat[:full].view(-1, block).abs().amax(dim=1)
    scaled = torch.clamp(flat[:full].view(-1, block) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).view(-1)
    if full < n:  # a last, shorter block
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return absmax, scaled


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit: (indices uint8 [n], absmax float32 [ceil(n / block)]) of a flat float tensor."""
    absmax, scaled = _blockwise_absmax(x.reshape(-1).float(), block)
    return _nearest(scaled, code.to(x.device)), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """The float32 [n] values of quantize_blockwise's output."""
    return _scale_blocks(code.to(q.device)[q.reshape(-1).int()], absmax, block)


@dataclass
class Quantized4bit:
    """A 4-bit tensor: packed indices and the block scales, as bitsandbytes' quantize_4bit returns them."""

    packed: torch.Tensor  # uint8 [ceil(n / 2)], two indices per byte
    absmax: torch.Tensor  # float32 [blocks]; with double quantization uint8 [blocks]
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the original tensor (and of dequantize's output by default)
    quant_type: str = "nf4"
    block_size: int = 64
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(blocks / 256)] (double quantization)
    offset: torch.Tensor | None = None  # float32 [] (double quantization): the absmax mean that was subtracted

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False,
                  chunk: int = 1 << 18) -> Quantized4bit:  # fmt: skip
    """QLoRA's blockwise 4-bit quantization of a float tensor (bitsandbytes' quantize_4bit and its
    compress_statistics=True for double_quant). Works through `chunk` values at a time (rounded to whole
    blocks) into preallocated outputs, so the temporaries stay small whatever the tensor's size."""
    flat = w.reshape(-1)
    n = flat.numel()
    step = max(block_size, chunk // block_size * block_size)  # even: only the last chunk can be odd
    code = code4(quant_type, w.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=w.device)
    for start in range(0, n, step):
        part_absmax, scaled = _blockwise_absmax(flat[start : start + step].float(), block_size)
        if scaled.numel() % 2:  # an odd count: the last byte's low nibble holds the code of 0.0
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        index = _nearest(scaled, code)
        torch.bitwise_or(index[0::2] << 4, index[1::2], out=packed[start // 2 : start // 2 + len(index) // 2])
        absmax[start // block_size : start // block_size + len(part_absmax)] = part_absmax
    q = Quantized4bit(packed, absmax, tuple(w.shape), w.dtype, quant_type, block_size)
    if double_quant:
        q.offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_blockwise(absmax - q.offset, dynamic_map(w.device), NESTED_BLOCK)
    return q


def block_absmax(q: Quantized4bit) -> torch.Tensor:
    """The float32 absmax [blocks] (undoing the double quantization)."""
    if not q.double_quant:
        return q.absmax
    return dequantize_blockwise(q.absmax, q.nested_absmax, dynamic_map(q.absmax.device), NESTED_BLOCK) + q.offset


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor [shape] in `dtype` (default: the original's): code4[index] * absmax in float32, then cast."""
    n = 1
    for d in q.shape:
        n *= d
    index = torch.stack([q.packed >> 4, q.packed & 0xF], dim=-1).view(-1)[:n].int()  # [n]
    values = code4(q.quant_type, q.packed.device)[index]  # float32 [n]
    return _scale_blocks(values, block_absmax(q), q.block_size).view(q.shape).to(dtype or q.dtype)
