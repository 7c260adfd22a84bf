"""Batches: padding (length bucketing happens in the sampler) or packing, optionally static-shape.

Every batch is a dict of tensors:
    input_ids       [B, T] int64
    targets         [B, T] int64: targets[:, t] is what logits[:, t] should predict (already shifted
                    inside each document; -100 = no loss). Loss:
                    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    position_ids    [B, T] int64, restarting at 0 for each packed document
    attention_mask  padding: [B, T] bool (True = real token);
                    packing: [B, 1, T, T] bool, block-diagonal causal (True = attend)

A packed row holding documents a (3 tokens) and b (2 tokens), padded to T = 6:

    input_ids     a0 a1 a2 b0 b1 <pad>
    position_ids   0  1  2  0  1  0
    targets       a1 a2  -  b1  -  -      a2 never predicts b0: labels do not cross documents
    mask          a sees a (causal), b sees b, the padding sees itself: attention never crosses documents
"""

import bisect

import torch

from ftcore.data.format import IGNORE
from ftcore.errors import FtcoreError


def pad_token_id(tokenizer) -> int:
    """The id used for padding (never attended to or learned): pad, else eos, else 0."""
    for tid in (tokenizer.pad_id, tokenizer.eos_id):
        if tid is not None:
            return tid
    return 0


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: group example indices into rows whose lengths sum to at most seq_len."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []  # free: sorted (space left, row index)
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise FtcoreError(f"an example of {n} tokens does not fit in data.seq_len={seq_len}; lower data.max_length")
        k = bisect.bisect_left(free, (n, -1))  # the fullest row that still fits it
        if k == len(free):
            rows.append([i])
            space, r = seq_len - n, len(rows) - 1
        else:
            space, r = free.pop(k)
            rows[r].append(i)
            space -= n
        if space:
            bisect.insort(free, (space, r))
    return rows


def collate(rows: list[list[dict]], pad_id: int, length: int | None = None, packed: bool = False) -> dict:
    """Rows of tokenized examples -> a batch (see the module docstring); length fixes T (static shape)."""
    B = len(rows)
    T = length or max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # document index per token; -1 = padding
    for b, row in enumerate(rows):
        t = 0
        for d, ex in enumerate(row):
            n = len(ex["input_ids"])
            if t + n > T:
                raise FtcoreError(f"a batch row of {t + n} tokens does not fit in length {T}; lower data.max_length")
            input_ids[b, t : t + n] = torch.tensor(ex["input_ids"])
            targets[b, t : t + n - 1] = torch.tensor(ex["labels"][1:], dtype=torch.long)
            position_ids[b, t : t + n] = torch.arange(n)
            doc[b, t : t + n] = d
            t += n
        # padding keeps position 0: no real token sees it, and LongRoPE picks its factors by the largest position
    if packed:
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attention_mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
    else:
        attention_mask = doc >= 0  # [B, T]
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "attention_mask": attention_mask}


class Batcher:
    """A split's training items (examples, or packed rows of examples) and how to batch a list of them.

    `lengths` (tokens per item) feeds the sampler's bucketing; `batcher(indices)` returns a batch.
    """

    def __init__(self, examples: list[dict], pad_id: int, *, packing: bool = False, seq_len: int = 1024,
                 static_shape: bool = False):  # fmt: skip
        self.examples, self.pad_id, self.packing = examples, pad_id, packing
        lengths = [len(ex["input_ids"]) for ex in examples]
        self.rows = pack(lengths, seq_len) if packing else [[i] for i in range(len(examples))]
        self.lengths = [sum(lengths[i] for i in row) for row in self.rows]
        self.length = seq_len if packing or static_shape else None  # fixed T, or the longest in the batch

    @classmethod
    def from_config(cls, examples: list[dict], cfg, pad_id: int) -> "Batcher":
        return cls(examples, pad_id, packing=cfg.packing, seq_len=cfg.seq_len, static_shape=cfg.static_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, indices: list[int], pad_to: int | None = None) -> dict:
        """The batch of items `indices`; pad_to adds empty rows (all padding, no loss) up to that many."""
        rows = [[self.examples[i] for i in self.rows[j]] for j in indices]
        rows += [[] for _ in range((pad_to or 0) - len(rows))]
        return collate(rows, self.pad_id, self.length, self.packing)
