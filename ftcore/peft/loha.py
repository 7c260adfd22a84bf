"""LoHa (low-rank Hadamard product, LyCORIS / FedPara) on nn.Linear layers, with HF PEFT's exact math.

The update is the elementwise product of two rank-r matrices, so its rank can reach r^2:

    dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)      W1a, W2a [out, r]; W1b, W2b [r, in]
    y  = W x + b + dW x                           (dW materialised every forward, as PEFT)
    merged: W' = W + dW

Init (PEFT's init_weights=True): W1a, W1b, W2a kaiming-uniform(a=sqrt(5)), i.e. U(+-1/sqrt(size(1))), drawn in
that order; W2b = 0, so dW = 0 (the base model). The scale alpha / r is always applied.

Training mode only (PEFT's LyCORIS dropouts, drawn from torch's default CPU generator, only when set):
    module_dropout p_m: per forward, the whole update is skipped when torch.rand(1) <= p_m
    rank_dropout   p_r: rows of dW (output features) kept where torch.rand(out) > p_r, then divided by their
                        mean (LoHa always renormalises)
Eval mode uses no randomness. There is no input dropout. The gradient of dW goes through HadaWeight (PEFT's
custom autograd function): it keeps the four factors for backward instead of two [out, in] products.
Base Parameters keep their names, as in lora.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.delta import DeltaMerge


class HadaWeight(torch.autograd.Function):
    """((w1a @ w1b) * (w2a @ w2b)) * scale, recomputing the two products in backward (PEFT's HadaWeight)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx, grad_out):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad_out = grad_out * ctx.scale
        temp = grad_out * (w2a @ w2b)  # [out, in]
        grad_w1a, grad_w1b = temp @ w1b.T, w1a.T @ temp
        temp = grad_out * (w1a @ w1b)
        grad_w2a, grad_w2b = temp @ w2b.T, w2a.T @ temp
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


def row_dropout(delta: torch.Tensor, p: float, renormalise: bool) -> torch.Tensor:
    """PEFT's rank dropout: keep rows of delta [out, in] where torch.rand(out) > p (default CPU generator);
    renormalise divides the mask by its mean."""
    drop = (torch.rand(delta.shape[0]) > p).to(delta.dtype)  # [out], on the CPU as PEFT draws it
    if renormalise:
        drop /= drop.mean()
    return delta * drop.view(-1, 1).to(delta.device)


def module_dropped(p: float) -> bool:
    """PEFT's module dropout: skip the update when torch.rand(1) <= p. No draw when p = 0."""
    return p > 0 and bool(torch.rand(1) <= p)


class LohaLinear(DeltaMerge, FrozenBase):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        device = base.weight.device
        # float32 whatever the base dtype; uninitialized: apply() calls reset_parameters, load_adapter copies
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_features, r, device=device))  # [out, r]
        self.hada_w1_b = nn.Parameter(torch.empty(r, self.in_features, device=device))  # [r, in]
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_features, r, device=device))  # [out, r]
        self.hada_w2_b = nn.Parameter(torch.empty(r, self.in_features, device=device))  # [r, in]
        self.merged = False
        self.train(base.training)  # swapped into an eval-mode model, it stays in eval mode (no dropout draws)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming-uniform", generator: torch.Generator | None = None):
        """PEFT's init_weights=True: w1_a, w1_b, w2_a kaiming-uniform(a=sqrt(5)) in that order (CPU draws), w2_b = 0."""
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            t = torch.empty(p.shape)
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            p.copy_(t)
        self.hada_w2_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) (W1a W1b) ⊙ (W2a W2b)  [out, in], float32, differentiable."""
        return HadaWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged or (self.training and module_dropped(self.module_dropout)):
            return y
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = row_dropout(delta, self.rank_dropout, renormalise=True)
        return (y + F.linear(x.to(delta.dtype), delta)).to(y.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a,
                "hada_w2_b": self.hada_w2_b}  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, loha, r={self.r}, alpha={self.alpha}, merged={self.merged}"
