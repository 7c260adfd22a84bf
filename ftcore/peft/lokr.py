"""LoKr (low-rank Kronecker product, LyCORIS) on nn.Linear layers, with HF PEFT's exact math.

out and in are split into factor pairs, out = a * b and in = c * d (factorization below), and the update is a
Kronecker product of an [a, c] and a [b, d] matrix, each full or itself low-rank:

    (a, b) = factorization(out, decompose_factor)      (c, d) = factorization(in, decompose_factor)
    W1 [a, c] = lokr_w1,   or lokr_w1_a [a, r] @ lokr_w1_b [r, c]   when decompose_both and r < max(a, c) / 2
    W2 [b, d] = lokr_w2,   or lokr_w2_a [b, r] @ lokr_w2_b [r, d]   when r < max(b, d) / 2
    dW [out, in] = (alpha / r) * kron(W1, W2)          dW[i b + j, k d + l] = (alpha / r) W1[i, k] W2[j, l]
    y  = W x + b + dW x                                (dW materialised every forward, as PEFT)
    merged: W' = W + dW

The scale is alpha / r even when both factors are full (PEFT's rule; upstream LyCORIS uses 1 there).

Init (kaiming = kaiming-uniform(a=sqrt(5)), U(+-1/sqrt(size(1))); zeros draw nothing; in this order):
    "kaiming-uniform" (PEFT's init_weights=True): W1 = 0 (or w1_a = 0, w1_b kaiming); W2 kaiming (w2_a, w2_b)
    "lycoris"         (init_weights="lycoris"):   W1 kaiming (w1_a, w1_b); W2 = 0 (or w2_b = 0, then w2_a kaiming)
Either way dW = 0 (the base model).

Training mode only, as LoHa (loha.py), from torch's default CPU generator and only when set: module_dropout
skips the update when torch.rand(1) <= p; rank_dropout keeps rows of dW where torch.rand(out) > p, divided by
the mask's mean only with rank_dropout_scale. Eval mode uses no randomness; there is no input dropout.
Base Parameters keep their names, as in lora.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.delta import DeltaMerge
from ftcore.peft.loha import module_dropped, row_dropout

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of dimension into m * n.

    factor -1: m is the largest divisor <= sqrt(dimension), m <= n. factor > 0 dividing dimension:
    (factor, dimension // factor) exactly, unsorted. Otherwise the divisor walk stops before a divisor above
    factor, and the pair is sorted. (64, -1) = (8, 8), (64, 16) = (16, 4), (96, 10) = (8, 12), (97, -1) = (1, 97).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # (never updated: PEFT's break on new_m + new_n > length never fires)
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_shapes(out_features: int, in_features: int, r: int, decompose_both: bool, decompose_factor: int) -> dict:
    """The adapter tensors of one layer, name -> shape, in PEFT's creation order."""
    a, b = factorization(out_features, decompose_factor)
    c, d = factorization(in_features, decompose_factor)
    shapes = {}
    if not (decompose_both and r < max(a, c) / 2):
        shapes["lokr_w1"] = (a, c)
    else:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    if not r < max(b, d) / 2:
        shapes["lokr_w2"] = (b, d)
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    return shapes


def full_rank(out_features: int, in_features: int, decompose_both: bool, decompose_factor: int) -> int:
    """The smallest r at which every factor of the layer is a full matrix: its size does not grow past it."""
    a, b = factorization(out_features, decompose_factor)
    c, d = factorization(in_features, decompose_factor)
    need = math.ceil(max(b, d) / 2)  # (r >= max / 2 for an integer r)
    if decompose_both:
        need = max(need, math.ceil(max(a, c) / 2))
    return max(need, 1)


class LokrLinear(DeltaMerge, FrozenBase):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 decompose_both: bool = False, decompose_factor: int = -1, rank_dropout_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.decompose_both, self.decompose_factor = decompose_both, decompose_factor
        device = base.weight.device
        shapes = lokr_shapes(self.out_features, self.in_features, r, decompose_both, decompose_factor)
        # float32 whatever the base dtype; uninitialized: apply() calls reset_parameters, load_adapter copies.
        # The factors a layer does not use are None (not in the state dict, not saved).
        for name in FACTORS:
            shape = shapes.get(name)
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device)) if shape else None)
        self.merged = False
        self.train(base.training)  # swapped into an eval-mode model, it stays in eval mode (no dropout draws)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming-uniform", generator: torch.Generator | None = None):
        """PEFT's init_weights=True ("kaiming-uniform") or "lycoris"; kaiming draws on the CPU in PEFT's order."""
        if init == "lycoris":
            order = [("lokr_w1", "k"), ("lokr_w1_a", "k"), ("lokr_w1_b", "k"), ("lokr_w2", "0"), ("lokr_w2_b", "0"),
                     ("lokr_w2_a", "k")]  # fmt: skip
        else:
            order = [("lokr_w1", "0"), ("lokr_w1_a", "0"), ("lokr_w1_b", "k"), ("lokr_w2", "k"), ("lokr_w2_a", "k"),
                     ("lokr_w2_b", "k")]  # fmt: skip
        for name, kind in order:
            p = getattr(self, name)
            if p is None:
                continue
            if kind == "0":
                p.zero_()
            else:
                t = torch.empty(p.shape)
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
                p.copy_(t)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 [a, c] and W2 [b, d], float32, differentiable."""
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) kron(W1, W2)  [out, in], float32, differentiable."""
        w1, w2 = self.factors()
        return torch.kron(w1, w2.contiguous()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged or (self.training and module_dropped(self.module_dropout)):
            return y
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = row_dropout(delta, self.rank_dropout, renormalise=self.rank_dropout_scale)
        return (y + F.linear(x.to(delta.dtype), delta)).to(y.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in FACTORS if getattr(self, name) is not None}

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n.removeprefix('lokr_')}={list(p.shape)}" for n, p in self.adapter_tensors().items())
        return (f"{self.in_features}, {self.out_features}, lokr, r={self.r}, alpha={self.alpha}, {shapes}, "
                f"merged={self.merged}")  # fmt: skip
