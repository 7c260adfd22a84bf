"""Merging shared by adapter layers.

DeltaMerge: the update is an additive weight delta, W' = W + delta_weight() (VeRA, AdaLoRA, LoHa, LoKr, LoRA on
embeddings). The layer provides `weight`, `bias`, `merged` and `delta_weight()` (float32); unmerge subtracts the
delta again.

RestoreMerge: merge writes the layer's own merged_weight() and keeps a copy of W, which unmerge puts back exactly
(HiRA, BOFT, LN tuning, whose inverse would be inexact or costly). The layer provides `weight`, `merged`,
`_unmerged_weight = None` and merged_weight() (and `bias` where merged_bias is asked for: not LN tuning's norms).
LoRA/DoRA, IA3, OFT and HRA merge their own way.
"""

import torch


class BiasKept:
    """Both mergers leave the bias alone: a plain Linear's bias is the layer's."""

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()  # the bias is left alone


class DeltaMerge(BiasKept):
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight [out, in] that makes a plain Linear compute this layer (in the base dtype)."""
        if self.merged:
            return self.weight.detach().clone()
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

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


class RestoreMerge(BiasKept):
    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight, self.merged = None, False
