"""The training loss: lm_head projection + next-token cross-entropy, without full-vocabulary logits.

    hidden [B, T, D] ─ keep target positions ─> h [N, D] ─┬─ plain:   logits [N, V] = lm_head(h) ─> CE
                                                          └─ chunked: for each C tokens of h:
                                                               logits [C, V] ─> loss, dlogits ─> dh, dW
                                                             (gradients made in forward, scaled in backward)

Transformer.forward calls token_loss_sum when it is given targets. The chunked path (chunk_size > 0;
train.loss_chunk_size, 1024 by default) keeps at most [C, V] logits alive and computes the gradients
while the chunk's logits are at hand, so backward does no second projection. It applies when lm_head is
a plain nn.Linear without bias (inside forward that includes FSDP2's gathered weight); a LoRA/IA3
lm_head takes the plain path, which is the reference in the tests.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.data.format import IGNORE


def batch_loss_sum(model, batch: dict, device, select_targets: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, target count) of a collated batch, both 0-d tensors on `device`.

    `model` may be the Transformer or its DDP/FSDP2 wrapper: the loss is computed inside its forward.
    """
    return model(
        batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        targets=batch["targets"].to(device),
        select_targets=select_targets,
    )


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2's final logits); cap 0: logits unchanged."""
    return torch.tanh(logits / cap) * cap if cap else logits


def token_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                   select_targets: bool = True, stream=None,
                   cap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(summed CE of head(hidden) against targets, target count); hidden [B, T, D], targets [B, T].

    select_targets: only positions with a target go through lm_head (with the loss on answers only, a small
    fraction of the tokens); False projects every position with the ignored ones masked, for fixed shapes.
    stream: a VocabStream whose `head` is set: head.weight used from its FSDP2 shards (vocab_stream.py).
    cap: the logits are soft-capped first (softcap) when > 0.
    """
    keep = targets != IGNORE  # [B, T]
    if select_targets:
        h, t = hidden[keep], targets[keep]  # [N, D], [N]
    else:
        h, t = hidden.flatten(0, 1), targets.flatten()
    if stream is not None and stream.head:
        return stream.loss_sum(head.weight, h, t, cap), keep.sum()
    return lm_head_loss(head, h, t, chunk_size, cap), keep.sum()


def lm_head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                 cap: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Summed cross-entropy of softcap(head(hidden), cap) [N, V] against targets [N] (IGNORE = no loss), in float32."""
    if chunk_size and chunkable(head):
        return linear_cross_entropy(hidden, head.weight, targets, chunk_size, cap)
    return F.cross_entropy(softcap(head(hidden), cap).float(), targets, ignore_index=IGNORE, reduction="sum")


def chunkable(head: nn.Module) -> bool:
    """A plain bias-free Linear whose weight is an ordinary tensor (not an FSDP2 DTensor shard)."""
    return type(head) is nn.Linear and head.bias is None and type(head.weight.data) is torch.Tensor


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 1024, cap: float = 0.0) -> torch.Tensor:  # fmt: skip
    """sum_i CE(softcap(hidden[i] @ weight.T, cap), targets[i]) in chunks of chunk_size rows; IGNORE targets add 0.

    hidden [N, D], weight [V, D], targets [N] int64. Equals
    F.cross_entropy(softcap(F.linear(hidden, weight), cap).float(), targets, ignore_index=IGNORE, reduction="sum")
    and its gradients (same matmul dtypes under autocast), with at most [chunk_size, V] logits alive.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, cap)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = softcap(F.linear(hidden[start : start + chunk_size], weight), cap).float()  # [C, V]
        total = total + F.cross_entropy(logits, targets[start : start + chunk_size], ignore_index=IGNORE,
                                        reduction="sum")  # fmt: skip
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients computed chunk by chunk in forward; backward only scales them.

    For a chunk: p = softmax(logits); dlogits = p - onehot(target) (0 on IGNORE rows);
    dh = dlogits @ W; dW += dlogits.T @ h. dlogits is cast to the logits' matmul dtype first, as
    autograd does for `F.linear(h, W).float()` under autocast. Soft-capped logits c * tanh(raw / c): the softmax
    is over them and dlogits is multiplied by their derivative 1 - tanh(raw / c)^2 on the way to raw.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, cap=0.0):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Grad mode is off inside forward; autocast (if any) is still on, so F.linear picks its dtype.
        dh = torch.empty_like(hidden) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]  # [C, D], [C]
            raw = F.linear(h, weight)  # [C, V] in the matmul dtype
            logits = raw.float()
            if cap:
                tanh = torch.tanh(logits / cap)
                logits = tanh * cap
            valid = t != IGNORE
            safe_t = torch.where(valid, t, 0)
            picked = logits.gather(1, safe_t[:, None])[:, 0]  # [C]
            # softmax and log-sum-exp in place of the float logits: max, exp(x - max), sum, divide
            top = logits.amax(dim=-1)
            probs = logits.sub_(top[:, None]).exp_()
            norm = probs.sum(dim=-1)
            total = total + torch.where(valid, top + norm.log() - picked, 0.0).sum()
            if want_dh or want_dw:
                dlogits = probs.div_(norm[:, None])
                dlogits.scatter_add_(1, safe_t[:, None], torch.full_like(picked, -1.0)[:, None])
                if cap:
                    dlogits.mul_(1 - tanh.square_())
                dlogits = dlogits.to(raw.dtype)
                keep = valid[:, None].to(raw.dtype)  # IGNORE rows: zero gradient, applied on [C, D] not [C, V]
                if want_dh:
                    dh[start : start + chunk_size] = (dlogits @ weight.to(raw.dtype)) * keep
                if want_dw:
                    dw += (dlogits.t() @ (h.to(raw.dtype) * keep)).float()
        ctx.save_for_backward(dh, dw)
        ctx.dw_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dh = (dh * grad).to(dh.dtype) if dh is not None else None
        dw = (dw * grad).to(ctx.dw_dtype) if dw is not None else None
        return dh, dw, None, None, None
