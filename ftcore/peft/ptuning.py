"""P-tuning (HF PEFT's PromptEncoderConfig, peft_type P_TUNING): soft tokens computed by a small encoder.

Attached as `model.prompt_encoder`, the prompt-tuning hook (prompt.py): the same P soft tokens before the input
embeddings, at positions 0..P-1, on the prefill call. What changes is where they come from:

    embedding [P, D] ─> encoder ─> soft tokens [P, D]     (computed once per forward, shared by the batch)
    MLP:  Linear(D, H) ─> ReLU ─> Linear(H, H) ─> ReLU ─> Linear(H, D)
    LSTM: bidirectional LSTM(D, H, encoder_num_layers, dropout=encoder_dropout) [P, 2H]
          ─> Linear(2H, 2H) ─> ReLU ─> Linear(2H, D)

Init is torch's default, as in PEFT (embedding N(0, 1); Linear kaiming-uniform(a=sqrt(5)) and bias
U(+-1/sqrt(in)); LSTM U(+-1/sqrt(H))), drawn from a generator. The encoder is a training aid: PEFT saves its
output as `prompt_embeddings` [P, D] and loads that as fixed soft tokens (no encoder, its inference mode); so does
ftcore (`load_fixed`). Training checkpoints hold the encoder's own weights (they are the trainable parameters).
"""

import math

import torch
from torch import nn


class PTuningEncoder(nn.Module):
    def __init__(self, num_virtual_tokens: int, hidden_size: int, encoder_type: str = "MLP", encoder_hidden_size: int = 0,
                 num_layers: int = 2, dropout: float = 0.0, device=None):  # fmt: skip
        super().__init__()
        self.num_virtual_tokens = P = num_virtual_tokens
        self.encoder_type = encoder_type
        D, H = hidden_size, encoder_hidden_size or hidden_size
        f32 = {"device": "meta", "dtype": torch.float32}  # materialized below, uninitialized (see reset_parameters)
        self.embedding = nn.Embedding(P, D, **f32)  # [P, D]
        self.lstm_head = None
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(D, H, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True,
                                     **f32)  # fmt: skip
            self.mlp_head = nn.Sequential(nn.Linear(2 * H, 2 * H, **f32), nn.ReLU(), nn.Linear(2 * H, D, **f32))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(D, H, **f32), nn.ReLU(), nn.Linear(H, H, **f32), nn.ReLU(),
                                          nn.Linear(H, D, **f32))  # fmt: skip
        self.to_empty(device=device or "cpu")
        if self.lstm_head is not None:
            self.lstm_head.flatten_parameters()

    @property
    def fixed(self) -> bool:
        """True once loaded from a saved adapter: the soft tokens are the embedding itself (no encoder)."""
        return self.mlp_head is None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """torch's default inits (PEFT's), each drawn on CPU from `generator`, then copied."""
        w = self.embedding.weight
        w.copy_(torch.randn(w.shape, generator=generator))
        if self.lstm_head is not None:
            bound = 1 / math.sqrt(self.lstm_head.hidden_size)
            for p in self.lstm_head.parameters():
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
        for layer in self.mlp_head or []:
            if isinstance(layer, nn.Linear):
                weight = nn.init.kaiming_uniform_(torch.empty(layer.weight.shape), a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_(weight)
                layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=generator))

    def output(self) -> torch.Tensor:
        """The soft tokens [P, D] (what PEFT saves as prompt_embeddings)."""
        x = self.embedding.weight
        if self.fixed:
            return x
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]  # [P, 2H]
        return self.mlp_head(x)

    @torch.no_grad()
    def saved_output(self) -> torch.Tensor:
        """output() in eval mode (no LSTM dropout draw): the prompt_embeddings an adapter file holds."""
        training = self.training
        self.eval()
        try:
            return self.output()
        finally:
            self.train(training)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.output()[None].expand(batch_size, -1, -1)  # [B, P, D]

    @torch.no_grad()
    def load_fixed(self, prompt_embeddings: torch.Tensor):
        """PEFT's saved soft tokens [P, D]: they become the embedding, and the encoder goes (PEFT's inference mode)."""
        self.mlp_head = self.lstm_head = None
        self.embedding.weight.copy_(prompt_embeddings)

    def extra_repr(self) -> str:
        return f"P={self.num_virtual_tokens}, encoder={'fixed' if self.fixed else self.encoder_type}"
