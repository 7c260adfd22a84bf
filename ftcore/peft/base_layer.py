"""FrozenBase: how an adapter layer holds the frozen linear layer it adapts.

Over a plain nn.Linear the layer keeps the base's Parameters under its own names (`weight`, `bias`), so a
model with adapters still loads base checkpoints and its base keys stay `...q_proj.weight`. Over a quantized
base (model.quantize) it keeps the QuantLinear itself as `base_layer` (PEFT's name), and `self.weight` is that
layer's QuantizedWeight, made at each use from the tensors the layer holds then (FSDP2's gathered ones inside
a forward): the adapter's own code (`F.linear(x, self.weight)`, `self.weight.float()`) is the same for both.
"""

from torch import nn

from ftcore.quant.weight import QuantLinear


class FrozenBase(nn.Module):
    def hold_base(self, base: nn.Module):
        if isinstance(base, QuantLinear):
            self.base_layer = base
        else:
            self.weight = base.weight  # [out, in], frozen; the same Parameter object, so ties (lm_head) survive
            self.register_parameter("bias", base.bias)

    @property
    def quantized_base(self) -> bool:
        return "base_layer" in self._modules

    def __getattr__(self, name: str):
        if name in ("weight", "bias"):
            modules = self.__dict__["_modules"]
            if "base_layer" in modules:
                return getattr(modules["base_layer"], name)
        return super().__getattr__(name)
