"""QuantLinear and QuantizedWeight: a frozen linear layer whose weight stays quantized, and the tensor it shows
(QuantStorage: what a quantized linear layer and a quantized GGUF embedding share).

    x [..., in] ─ @ dequantize(W)^T [in, out] (compute dtype) ─ + b ─> y [..., out]

A QuantLinear keeps its weight in some packed storage (4-bit NF4/FP4 in linear.py, GGUF blocks in gguf.py) and
implements `dequantized(dtype)`. The weight gets no gradient; the input's gradient is grad_y @ dequantize(W),
dequantized again in the backward, so autograd keeps only the quantized tensors between forward and backward
(as bitsandbytes' MatMul4Bit), never a full-precision copy of W.

`layer.weight` is a QuantizedWeight: a tensor subclass of shape [out, in] that holds no values, only the
layer. `F.linear(x, layer.weight, b)` runs the memory-saving matmul above; any other op (`w.float()`, `w + d`,
`torch.linalg.norm(w)`) sees the dequantized tensor; in-place ops are refused (the base is frozen). That is
how every adapter layer written against `F.linear(x, self.weight)` and `self.weight.float()` works over a
quantized base unchanged. It reads the layer's tensors when used, so under FSDP2 it sees the gathered ones.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from ftcore.errors import FtcoreError


class QuantStorage(nn.Module):
    """A frozen module whose [out, in] weight stays in quantized storage: a linear layer (QuantLinear) or a GGUF
    token embedding. Subclasses set in_features, out_features, dtype and implement dequantized(dtype) -> [out, in];
    storage tensors are Parameters (requires_grad=False) whose dim 0 is the weight's rows, so FSDP2 shards them."""

    in_features: int
    out_features: int
    dtype: torch.dtype  # the original weight's: what dequantized() and an export give by default

    @property
    def weight(self) -> "QuantizedWeight":
        return QuantizedWeight(self)

    def empty_copy(self) -> "QuantStorage":
        """The same kind of module (shape, settings) whose tensors are still to be assigned, e.g. by
        load_state_dict(assign=True) from a gathered state dict; until then it shares this module's tensors."""
        clone = copy.copy(self)
        clone._parameters, clone._buffers, clone._modules = dict(self._parameters), dict(self._buffers), {}
        return clone


class QuantLinear(QuantStorage):
    """A frozen linear layer over quantized storage (sets bias too); forward is the memory-saving matmul."""

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias) [..., out]; W is dequantized to x's dtype, or to autocast's when it is on."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _QuantMatmul.apply(x.to(dtype), self, dtype)  # [..., out]
        return y if bias is None else y + bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class _QuantMatmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward (nothing full-precision is saved)."""

    @staticmethod
    def forward(ctx, x, layer: QuantLinear, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantized(dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.dequantized(ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class QuantizedWeight(torch.Tensor):
    """The [out, in] weight of a QuantLinear as a tensor; its values are dequantized where an op needs them."""

    layer: QuantStorage

    @staticmethod
    def __new__(cls, layer: QuantStorage):
        device = next(iter(layer.parameters())).device
        return torch.Tensor._make_wrapper_subclass(cls, (layer.out_features, layer.in_features), dtype=layer.dtype,
                                                   device=device, requires_grad=False)  # fmt: skip

    def __init__(self, layer: QuantStorage):
        self.layer = layer

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.layer.dequantized(dtype)

    def __repr__(self):
        return f"QuantizedWeight({self.layer.out_features}, {self.layer.in_features}, {self.layer.extra_repr()})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, bias = (*args, *[kwargs.get(k) for k in ("input", "weight", "bias")[len(args):]])
            if isinstance(w, cls) and not isinstance(x, cls) and isinstance(w.layer, QuantLinear):
                return w.layer.matmul(x, bias)  # (a GGUF embedding's table takes the dequantizing path below)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            raise FtcoreError(f"{func.overloadpacket.__name__}: the base weight is quantized (model.quantize) and frozen; it cannot "
                              "be changed in place (merge by exporting: scripts/export.py dequantizes and merges)")  # fmt: skip
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return cls(args[0].layer)  # `.detach()`, `.data`: still the view, so a write through them is refused too
        return func(*tree_map(_dequantized, args), **tree_map(_dequantized, kwargs or {}))


def _dequantized(t):
    return t.dequantized() if isinstance(t, QuantizedWeight) else t
