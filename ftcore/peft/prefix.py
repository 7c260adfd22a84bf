"""Prefix tuning: P learned key/value vectors per layer, prepended to every attention's keys and values.

Attached as `model.prefix_encoder` (the model's prefix-tuning hook, a root module). Layout is HF PEFT's:

    embedding [P, 2 * L * n_kv * hd]  (or embedding [P, n_kv * hd] ─> Linear ─> tanh ─> Linear, if projected)
        view [P, 2L, n_kv, hd] ─> permute [2L, n_kv, P, hd] ─> layer i: k = [2i], v = [2i + 1]

Keys and values are per KV head (GQA: n_kv heads, PEFT's token_dim = n_kv * hd), carry no RoPE, and
sit at positions 0..P-1: the real tokens' positions start at P (model.py), as in PEFT + transformers.
The projection (MLP reparameterization) is only a training aid: save_adapter folds it into the
prefix it computes, which is what PEFT saves too.
"""

import math

import torch
from torch import nn

from ftcore.model import ModelConfig


class PrefixEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, projection: bool = False, hidden_size: int = 0,
                 device=None):
        super().__init__()
        self.num_layers, self.n_kv, self.hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.num_virtual_tokens = P = num_virtual_tokens
        self.token_dim = self.n_kv * self.hd
        self.hidden_size = hidden_size or self.token_dim
        out_dim = self.num_layers * 2 * self.token_dim
        f32 = {"device": "meta", "dtype": torch.float32}  # materialized below, uninitialized (see reset_parameters)
        if projection:
            self.embedding = nn.Embedding(P, self.token_dim, **f32)
            self.transform = nn.Sequential(
                nn.Linear(self.token_dim, self.hidden_size, **f32), nn.Tanh(), nn.Linear(self.hidden_size, out_dim, **f32)
            )
        else:
            self.embedding = nn.Embedding(P, out_dim, **f32)
            self.transform = None
        self.to_empty(device=device or "cpu")

    @property
    def projection(self) -> bool:
        return self.transform is not None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """PEFT's (torch's) default init: embedding ~ N(0, 1); the MLP as nn.Linear. Drawn on CPU, then copied."""
        w = self.embedding.weight
        w.copy_(torch.randn(w.shape, generator=generator))
        for layer in self.transform or []:
            if isinstance(layer, nn.Linear):
                weight, bias = torch.empty(layer.weight.shape), torch.empty(layer.bias.shape)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_(weight)
                layer.bias.copy_(nn.init.uniform_(bias, -bound, bound, generator=generator))

    def flat(self) -> torch.Tensor:
        """The prefix in PEFT's saved layout: [P, 2 * L * n_kv * hd]."""
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P = self.num_virtual_tokens
        kv = self.flat().view(P, 2 * self.num_layers, self.n_kv, self.hd).permute(1, 2, 0, 3)  # [2L, n_kv, P, hd]
        kv = kv[:, None].expand(-1, batch_size, -1, -1, -1)  # [2L, B, n_kv, P, hd]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def load_flat(self, prompt_embeddings: torch.Tensor):
        """Load PEFT's `prompt_embeddings` [P, 2 * L * n_kv * hd] (only without projection)."""
        self.embedding.weight.copy_(prompt_embeddings)

    def extra_repr(self) -> str:
        return f"P={self.num_virtual_tokens}, layers={self.num_layers}, kv_heads={self.n_kv}, head_dim={self.hd}"
