"""HiRA (Hadamard high-rank adaptation) on nn.Linear layers, with HF PEFT's exact math.

The update is the frozen weight times a low-rank matrix, elementwise, so its rank is not bounded by r:

    y = W x + b + (W ⊙ (B A)) dropout(x)        A [r, in], B [out, r]; no scaling
    merged: W' = W ⊙ (1 + B A)

A starts kaiming-uniform (a=sqrt(5)) or N(0, 1/r) ("gaussian"), B at zero (the base model). Base Parameters
keep their names, as in lora.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.delta import RestoreMerge


class HiraLinear(RestoreMerge, FrozenBase):
    def __init__(self, base: nn.Linear, r: int, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r = r
        self.hira_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.hira_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))  # float32
        self.hira_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.merged = False
        self._unmerged_weight = None  # merge() keeps W to restore it exactly

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming-uniform", generator: torch.Generator | None = None):
        a = torch.empty(self.hira_A.shape)
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r, generator=generator)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.hira_A.copy_(a)
        self.hira_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged:
            return y
        xa = self.hira_dropout(x.to(self.hira_A.dtype))
        update = self.weight * (self.hira_B @ self.hira_A)  # [out, in], in float32 (the adapter's dtype)
        return (y + F.linear(xa, update)).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if self.merged:
            return self.weight.detach().clone()
        w = self.weight.float()
        return (w + w * (self.hira_B @ self.hira_A)).to(self.weight.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"hira_A": self.hira_A, "hira_B": self.hira_B}

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, hira, r={self.r}, merged={self.merged}"
