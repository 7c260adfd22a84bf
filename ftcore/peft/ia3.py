"""(IA)^3: learned per-channel scaling of a Linear layer's output, or of its input for feedforward layers.

    attention (k_proj, v_proj):  y = (W x + b) * l      l [out, 1]   (PEFT's ia3_l shape)
    feedforward (down_proj):     y = W (x * l) + b      l [1, in]

The vectors start at 1 (the base model). Base Parameters keep their names, as in lora.py.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.peft.base_layer import FrozenBase


class IA3Linear(FrozenBase):
    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device))  # float32
        self.merged = False

    @torch.no_grad()
    def reset_parameters(self):
        self.ia3_l.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_l.flatten()  # [in] or [out]
        if self.feedforward:
            return F.linear((x.to(scale.dtype) * scale).to(x.dtype), self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        return (y * scale).to(y.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.feedforward or self.merged:
            return None if self.bias is None else self.bias.detach().clone()
        return (self.bias * self.ia3_l.flatten()).to(self.bias.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W * l: scales columns (feedforward) or rows (others), in the base dtype."""
        if self.merged:
            return self.weight.detach().clone()
        return (self.weight * self.ia3_l).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        bias = self.merged_bias()
        self.weight.copy_(self.merged_weight())
        if bias is not None:
            self.bias.copy_(bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if (self.ia3_l == 0).any():
            raise FtcoreError("IA3 unmerge: a scaling vector ia3_l has zeros, so the merged weights cannot be undone")
        self.weight.copy_((self.weight / self.ia3_l).to(self.weight.dtype))
        if self.bias is not None and not self.feedforward:
            self.bias.copy_((self.bias / self.ia3_l.flatten()).to(self.bias.dtype))
        self.merged = False

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def extra_repr(self) -> str:
        kind = "feedforward (scales input)" if self.feedforward else "scales output"
        return f"{self.in_features}, {self.out_features}, {kind}, merged={self.merged}"
