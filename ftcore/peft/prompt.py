"""Prompt tuning: P learned soft-token embeddings prepended to the input embeddings.

Attached as `model.prompt_encoder` (the model's prompt-tuning hook, a root module). On the prefill
call the model runs [soft tokens; real tokens] and returns logits for the real tokens only; the soft
tokens stay in the KV cache for decoding. As in HF PEFT they hold positions 0..P-1 and are always
attended (labels need no change: the model never returns their logits).

Init (PEFT's PromptTuningInit): random ~ N(0, 1); sample_vocab = rows of the embedding table for P
random token ids; text = the embeddings of the text's token ids, repeated or cut to P.
"""

import math

import torch
from torch import nn

from ftcore.errors import FtcoreError


class PromptEncoder(nn.Module):
    def __init__(self, num_virtual_tokens: int, hidden_size: int, device=None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, device="meta", dtype=torch.float32)  # [P, D]
        self.to_empty(device=device or "cpu")  # uninitialized until an init_* or load_adapter

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight[None].expand(batch_size, -1, -1)  # [B, P, D]

    @torch.no_grad()
    def init_random(self, generator: torch.Generator | None = None):
        t = torch.empty(self.embedding.weight.shape)
        self.embedding.weight.copy_(nn.init.normal_(t, generator=generator))

    @torch.no_grad()
    def init_from_tokens(self, embed_tokens: nn.Embedding, token_ids: list[int]):
        """Copy the embeddings of `token_ids`, repeated and cut to P tokens (PEFT's TEXT init)."""
        if not token_ids:
            raise FtcoreError("peft.init_text: the text encodes to no tokens")
        P = self.num_virtual_tokens
        ids = (token_ids * math.ceil(P / len(token_ids)))[:P]
        vocab = embed_tokens.num_embeddings
        if max(ids) >= vocab or min(ids) < 0:
            raise FtcoreError(f"peft.init_text: token id {max(ids)} is outside the model's vocabulary of {vocab}")
        idx = torch.tensor(ids, device=embed_tokens.weight.device)
        self.embedding.weight.copy_(embed_tokens(idx).float())  # the rows (a GGUF table: only these dequantized)

    @torch.no_grad()
    def init_sample_vocab(self, embed_tokens: nn.Embedding, generator: torch.Generator | None = None):
        ids = torch.randint(0, embed_tokens.num_embeddings, (self.num_virtual_tokens,), generator=generator)
        self.init_from_tokens(embed_tokens, ids.tolist())

    def extra_repr(self) -> str:
        return f"P={self.num_virtual_tokens}, hidden={self.embedding.embedding_dim}"


def encode_init_text(text: str, tokenizer=None, tokenizer_path: str = "") -> list[int]:
    """Token ids of the init text with `tokenizer` (anything with .encode(text)) or ftcore's from tokenizer_path.

    NOTE: PEFT uses `tokenizer(text)["input_ids"]`, which includes BOS when the tokenizer adds it;
    ftcore's Tokenizer.encode follows the same add_bos_token setting.
    """
    if tokenizer is None:
        from ftcore.formats.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(tokenizer_path)
    ids = tokenizer.encode(text)
    ids = getattr(ids, "ids", ids)  # a `tokenizers` Encoding
    return [int(i) for i in ids]
