"""LN tuning (HF PEFT's LNTuningConfig, peft_type LN_TUNING): train copies of selected RMSNorm layers.

Like PEFT, each targeted norm keeps its frozen base weight and gets a trainable copy (`ln_tuning_layers`, PEFT's
deep copy of the layer) that the forward uses instead:

    y = g' ⊙ x / sqrt(mean(x^2) + eps)     g' = ln_tuning_layers.weight [D] (starts equal to the base g)
    merged: g <- g' (PEFT swaps the copy in), unmerged: g restored

Saved as `...input_layernorm.ln_tuning_layers.weight` [D]. The copy is float32 whatever the base dtype; the
forward casts it to the input's dtype (a bf16 base keeps a bf16 residual stream, as PEFT's bf16 copy does).
Base Parameters keep their names (`layers.0.input_layernorm.weight`).
"""

import torch
from torch import nn

from ftcore.model.decoder import RMSNorm
from ftcore.peft.delta import RestoreMerge


class LnTuningNorm(RestoreMerge, RMSNorm):
    def __init__(self, base: RMSNorm):
        nn.Module.__init__(self)  # RMSNorm's own __init__ would make a new weight
        self.eps, self.fused_kernels, self.style = base.eps, base.fused_kernels, base.style
        self.weight = base.weight  # [D], frozen
        self.dim = base.weight.shape[0]
        self.ln_tuning_layers = RMSNorm(self.dim, base.eps, base.style)  # PEFT's copy of the layer
        self.ln_tuning_layers.weight = nn.Parameter(base.weight.detach().float().clone())  # [D], float32
        self.ln_tuning_layers.fused_kernels = base.fused_kernels
        self.merged = False
        self._unmerged_weight = None  # merge() keeps the base weight to restore it exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.norm_with(x, self.weight)
        w = self.ln_tuning_layers.weight
        return self.norm_with(x, w if w.dtype == x.dtype else w.to(x.dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.ln_tuning_layers.weight.detach().to(self.weight.dtype).clone()

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"ln_tuning_layers.weight": self.ln_tuning_layers.weight}

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, ln_tuning, merged={self.merged}"
