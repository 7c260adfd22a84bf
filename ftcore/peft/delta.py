"""Merging for adapter layers whose update is an additive weight delta: W' = W + delta_weight() [out, in].

VeRA, AdaLoRA, LoHa and LoKr share it (LoRA/DoRA, HiRA and IA3 merge differently). The layer provides
`weight`, `bias`, `merged` and `delta_weight()` (float32); unmerge subtracts the delta again.
"""

import torch


class DeltaMerge:
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight [out, in] that makes a plain Linear compute this layer (in the base dtype)."""
        if self.merged:
            return self.weight.detach().clone()
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()  # the bias is left alone

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False
