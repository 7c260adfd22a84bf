"""LoRA (and rsLoRA) on the token embedding (`embed_tokens`), with HF PEFT's exact math and names.

    tokens ─┬─ E [vocab, dim] (frozen) ──────────────────────────────┐
            └─ lookup in A^T [vocab, r] ─ B^T [r, dim] ─ * s ────────┴─ + ─> y      s = alpha / r (rsLoRA: / sqrt r)

A = lora_embedding_A [r, vocab] starts at 0, B = lora_embedding_B [dim, r] ~ N(0, 1) (PEFT's init: the
other way round from the linear layers). PEFT applies no dropout on embeddings; neither do we.
The update as a weight is (B A)^T * s [vocab, dim]. With tied embeddings the adapter acts on the input
lookup only (lm_head keeps the base weight), so a merged export unties them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.peft.delta import DeltaMerge


class LoraEmbedding(DeltaMerge, nn.Module):
    def __init__(self, base: nn.Embedding, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight  # [vocab, dim], frozen; the same Parameter, so a tie to lm_head survives
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        # float32 whatever the base dtype; uninitialized until reset_parameters (or a loaded adapter)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device))
        self.merged = False

    @property
    def bias(self):  # an embedding has none (DeltaMerge's merged_bias reads it)
        return None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        self.lora_embedding_A.zero_()
        self.lora_embedding_B.copy_(torch.randn(self.lora_embedding_B.shape, generator=generator))

    def delta_weight(self) -> torch.Tensor:
        """(B A)^T * s  [vocab, dim], float32."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y = F.embedding(tokens, self.weight, self.padding_idx)  # [..., dim]
        if self.merged:
            return y
        after_a = F.embedding(tokens, self.lora_embedding_A.T, self.padding_idx)  # [..., r]
        return (y + (after_a @ self.lora_embedding_B.T) * self.scaling).to(y.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, merged={self.merged}"
