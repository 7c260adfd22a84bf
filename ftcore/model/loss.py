"""The training loss: lm_head projection + next-token cross-entropy, without full-vocabulary logits.

    hidden [B, T, D] ─ keep target positions ─> h [N, D] ─┬─ plain:   logits [N, V] = lm_head(h) ─> CE
                                                          └─ chunked: for each C tokens of h:
                                                               logits [C, V] ─> loss, dlogits ─> dh, dW
                                                             (gradients made in forward, scaled in backward)

The chunked path (ops.settings.loss_chunk_size > 0, the default) keeps at most [C, V] logits alive
and computes the gradients while the chunk's logits are at hand, so backward does no second
projection. It applies when lm_head is a plain nn.Linear without bias; a LoRA/IA3 lm_head (or an
FSDP-sharded DTensor weight) takes the plain path, which is the reference in the tests.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.data.format import IGNORE
from ftcore.model import ops


def batch_loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over a collated batch and its number of target tokens.

    Only positions that have a target go through lm_head: with the loss on answers only, that is a
    small fraction of the tokens, and the full [B, T, vocab] logits are never built.
    """
    hidden = model(
        batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        return_hidden=True,
    )  # [B, T, D]
    targets = batch["targets"].to(device)
    keep = targets != IGNORE  # [B, T]
    return lm_head_loss(model.lm_head, hidden[keep], targets[keep]), int(keep.sum())


def static_batch_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_loss_sum over every position (ignored ones masked): no host sync, fixed shapes (CUDA graphs).

    Returns the summed loss and the target count, both as device tensors.
    """
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
                   return_hidden=True)  # fmt: skip
    targets = batch["targets"]
    loss = lm_head_loss(model.lm_head, hidden.flatten(0, 1), targets.flatten())
    return loss, (targets != IGNORE).sum()


def lm_head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) [N, V] against targets [N] (IGNORE = no loss), in float32."""
    chunk = ops.settings.loss_chunk_size
    if chunk and chunkable(head):
        return linear_cross_entropy(hidden, head.weight, targets, chunk)
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")


def chunkable(head: nn.Module) -> bool:
    """A plain bias-free Linear whose weight is an ordinary tensor (not an FSDP2 DTensor shard)."""
    return type(head) is nn.Linear and head.bias is None and type(head.weight.data) is torch.Tensor


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 1024) -> torch.Tensor:  # fmt: skip
    """sum_i CE(hidden[i] @ weight.T, targets[i]) in chunks of chunk_size rows; IGNORE targets add 0.

    hidden [N, D], weight [V, D], targets [N] int64. Equals
    F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="sum")
    and its gradients (same matmul dtypes under autocast), with at most [chunk_size, V] logits alive.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = F.linear(hidden[start : start + chunk_size], weight).float()  # [C, V]
        total = total + F.cross_entropy(logits, targets[start : start + chunk_size], ignore_index=IGNORE,
                                        reduction="sum")  # fmt: skip
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients computed chunk by chunk in forward; backward only scales them.

    For a chunk: p = softmax(logits); dlogits = p - onehot(target) (0 on IGNORE rows);
    dh = dlogits @ W; dW += dlogits.T @ h. dlogits is cast to the logits' matmul dtype first, as
    autograd does for `F.linear(h, W).float()` under autocast.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Grad mode is off inside forward; autocast (if any) is still on, so F.linear picks its dtype.
        dh = torch.empty_like(hidden) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]  # [C, D], [C]
            raw = F.linear(h, weight)  # [C, V] in the matmul dtype
            logits = raw.float()
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
        return dh, dw, None, None
