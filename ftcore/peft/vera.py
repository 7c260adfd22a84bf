"""VeRA (vector-based random matrix adaptation) on nn.Linear layers, with HF PEFT's exact math.

One pair of frozen random matrices is shared by every adapted layer; each layer learns two vectors:

    A [r, max in], B [max out, r]   drawn once from a CPU generator seeded with projection_prng_key
                                    (kaiming-uniform: U(+-sqrt(6 / fan_in)), A first, then B)
    y = W x + b + lambda_b ⊙ (B[:out] (lambda_d ⊙ (A[:, :in] dropout(x))))      no scaling
    lambda_d [r] starts at d_initial, lambda_b [out] at zero (the base model)

The shared matrices live once, on the model (`model.vera_projections`, buffers that are not in the state
dict); each layer reads them through a plain reference, so moving the model moves them once.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.delta import DeltaMerge


class VeraProjections(nn.Module):
    """The shared frozen A [r, in_max] and B [out_max, r]."""

    def __init__(self, r: int, in_max: int, out_max: int, device=None):
        super().__init__()
        self.register_buffer("vera_A", torch.zeros(r, in_max, device=device), persistent=False)
        self.register_buffer("vera_B", torch.zeros(out_max, r, device=device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, projection_prng_key: int):
        """PEFT's draw: one CPU generator, A then B, each U(-bound, bound), bound = sqrt(3) sqrt(2) / sqrt(fan_in)."""
        g = torch.Generator(device="cpu").manual_seed(projection_prng_key)
        for t in (self.vera_A, self.vera_B):
            fan_in = t.shape[1]
            bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
            t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=g))


class VeraLinear(DeltaMerge, FrozenBase):
    def __init__(self, base: nn.Linear, projections: VeraProjections, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self._projections = [projections]  # a reference, not a submodule: the matrices exist once
        r = projections.vera_A.shape[0]
        self.r = r
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # float32
        self.vera_lambda_d = nn.Parameter(torch.zeros(r, device=device))
        self.merged = False

    @torch.no_grad()
    def reset_parameters(self, d_initial: float = 0.1):
        self.vera_lambda_b.zero_()
        self.vera_lambda_d.fill_(d_initial)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices: A[:, :in] [r, in] and B[:out] [out, r]."""
        p = self._projections[0]
        return p.vera_A[:, : self.in_features], p.vera_B[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged:
            return y
        a, b = self.projections()
        xa = self.vera_dropout(x.to(self.vera_lambda_d.dtype))
        hidden = self.vera_lambda_d * F.linear(xa, a.to(xa.dtype))  # [..., r]
        return (y + self.vera_lambda_b * F.linear(hidden, b.to(xa.dtype))).to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_b) B diag(lambda_d) A  [out, in], float32."""
        a, b = self.projections()
        return (self.vera_lambda_b.unsqueeze(-1) * b.float()) @ (self.vera_lambda_d.unsqueeze(-1) * a.float())

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, vera, r={self.r}, merged={self.merged}"
