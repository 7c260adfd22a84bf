"""Linear4bit: a frozen linear layer whose weight stays 4-bit (NF4/FP4) and is dequantized per call
(QuantLinear's forward and input gradient, weight.py).

Storage (the tensors FSDP2 shards along dim 0, one row of the weight per row of each):
    packed [out, in / 2] uint8      two 4-bit codes per byte
    absmax [out, in / block]        uint8 codes with double quantization; else the float32 absmax's bits as int32,
                                    so that FSDP2's mixed precision (which casts floating parameters) keeps them exact
    nested_absmax [ceil(out * in / block / 256)] and offset []: float32 as int32 bits, buffers, small, unsharded
"""

from dataclasses import dataclass

import torch
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.quant.fourbit import Quantized4bit, dequantize_4bit, quantize_4bit
from ftcore.quant.weight import QuantLinear


@dataclass(frozen=True)
class QuantSpec:
    """How a base is quantized (from ModelSpec's model.quantize, model.quant_block_size, model.double_quant)."""

    quant_type: str  # nf4 | fp4
    block_size: int
    double_quant: bool


class Linear4bit(QuantLinear):
    def __init__(self, q: Quantized4bit, bias: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = q.shape
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.block_size = q.quant_type, q.block_size
        self.dtype = q.dtype  # the original weight's: what dequantized() and an export give by default
        self.packed = nn.Parameter(q.packed.view(out_features, in_features // 2), requires_grad=False)
        absmax = q.absmax if q.double_quant else q.absmax.view(torch.int32)
        self.absmax = nn.Parameter(absmax.view(out_features, -1), requires_grad=False)
        # float32 stored as int32 bits, as the absmax: a dtype cast of the model (model.to(torch.bfloat16)) leaves them
        self.register_buffer("nested_absmax", None if q.nested_absmax is None else q.nested_absmax.view(torch.int32))
        self.register_buffer("offset", None if q.offset is None else q.offset.view(torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, name: str = "weight",
                    dtype: torch.dtype | None = None) -> "Linear4bit":  # fmt: skip
        """Quantize a [out, in] weight; each row must hold whole blocks (so that rows shard cleanly).
        dtype: what dequantized() gives by default (the weight's own dtype if None)."""
        out_features, in_features = weight.shape
        if in_features % spec.block_size:
            raise FtcoreError(f"{name}: model.quant_block_size={spec.block_size} does not divide the row length "
                              f"{in_features} of this [{out_features}, {in_features}] weight")  # fmt: skip
        q = quantize_4bit(weight, spec.quant_type, spec.block_size, spec.double_quant)
        if dtype is not None:
            q.dtype = dtype
        return cls(q, bias)

    def quantized(self) -> Quantized4bit:
        """The weight as a Quantized4bit over this module's (possibly just gathered) tensors."""
        absmax, nested, offset = self.absmax.reshape(-1), self.nested_absmax, self.offset
        if nested is None:
            absmax = absmax.view(torch.float32)
        else:
            nested, offset = nested.view(torch.float32), offset.view(torch.float32)
        return Quantized4bit(self.packed.reshape(-1), absmax, (self.out_features, self.in_features), self.dtype,
                             self.quant_type, self.block_size, nested, offset)  # fmt: skip

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the original weight's)."""
        return dequantize_4bit(self.quantized(), dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, block={self.block_size}"

