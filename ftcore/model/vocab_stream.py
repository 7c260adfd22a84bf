"""The token table and lm_head used straight from their FSDP2 row shards, one block of rows at a time.

Under FSDP2 a frozen embedding / lm_head weight W [V, D] is a DTensor sharded by rows: rank r of the shard
group holds rows [r * ceil(V / R), ...) (torch.chunk's split). Gathering it whole for each use puts V * D
on every rank (twice while FSDP2 copies the gathered buffer out), the largest transient of a PEFT run with a
big vocabulary. Here each rank broadcasts its rows in blocks and every rank uses a block as it arrives, so at
most one block [rows, D] of the table is alive beyond the rank's own shard:

    embedding  out[i] = W[ids[i]]: each block fills the ids that fall in it
    logits     logits[..., start:stop] = h @ W_block.T
    loss       one pass of an online log-sum-exp over the blocks, per token:
                 m = running max logit, s = sum exp(l - m), a = sum exp(l - m) W_v (both rescaled when m grows)
                 loss = m + log s - l_target;  dloss/dh = a / s - W_target (made in forward, scaled in backward)

Every rank runs the same broadcasts in the same order whatever its batch (the block count depends only on V,
the group and `rows`), so ranks with different batch shapes, or no target tokens, take part alike. No gradient
for W is made: parallelize streams frozen tables only (FSDP2 gathers a trainable one as usual).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ftcore.data.format import IGNORE


@dataclass
class VocabStream:
    """Which tables the model uses from their shards (set by parallelize), in what dtype and block size."""

    embed: bool  # embed_tokens.weight
    head: bool  # lm_head.weight (the same tensor when tied)
    dtype: torch.dtype | None = None  # the compute dtype (FSDP2's param_dtype); None: the shard's own
    rows: int = 8192  # rows per broadcast block
    token_chunk: int = 1024  # the loss's [tokens, rows] logits at most

    def embedding(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return embedding(weight, ids, self.rows, self.dtype)

    def logits(self, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return logits(weight, hidden, self.rows, self.dtype)

    def loss_sum(self, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, cap: float = 0.0):
        return cross_entropy_sum(weight, hidden, targets, self.rows, self.dtype, self.token_chunk, cap)


def blocks(weight: torch.Tensor, rows: int, dtype: torch.dtype | None, device: torch.device):
    """(first row, block [n, D]) for every block of the whole table in row order, on every rank of the group.

    weight: a DTensor sharded by rows on one mesh dimension (replicated on any other, HSDP). The owner of a
    block casts it to `dtype` and broadcasts it within the shard group; the others receive it.
    """
    dim = next(i for i, p in enumerate(weight.placements) if p.is_shard())
    mesh, (V, D) = weight.device_mesh, weight.shape
    group, size, me = mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)
    local = weight.to_local()
    dtype = dtype or local.dtype
    per = -(-V // size)  # torch.chunk's rows per rank, the last ranks' fewer (or none)
    for owner in range(size):
        lo, hi = min(owner * per, V), min((owner + 1) * per, V)
        for start in range(lo, hi, rows):
            n = min(rows, hi - start)
            if owner == me:
                block = local[start - lo : start - lo + n].to(device, dtype).contiguous()
            else:
                block = torch.empty(n, D, dtype=dtype, device=device)
            dist.broadcast(block, src=dist.get_global_rank(group, owner), group=group)
            yield start, block


@torch.no_grad()
def embedding(weight: torch.Tensor, ids: torch.Tensor, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
    """F.embedding(ids, whole weight): ids [...] -> [..., D]; out-of-range ids give zeros."""
    flat = ids.reshape(-1)  # [N]
    out = None
    for start, block in blocks(weight, rows, dtype, ids.device):
        if out is None:
            out = block.new_zeros(flat.shape[0], block.shape[1])  # [N, D]
        at = flat - start
        hit = (at >= 0) & (at < block.shape[0])
        out = torch.where(hit[:, None], block[at.clamp(0, block.shape[0] - 1)], out)  # no host sync
    return out.view(*ids.shape, out.shape[-1])


def logits(weight: torch.Tensor, hidden: torch.Tensor, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
    """F.linear(hidden, whole weight): hidden [..., D] -> [..., V] (the blocks are constants for autograd)."""
    return torch.cat([F.linear(hidden, block) for _, block in blocks(weight, rows, dtype, hidden.device)], dim=-1)


def cross_entropy_sum(weight, hidden, targets, rows: int, dtype: torch.dtype | None, token_chunk: int,
                      cap: float = 0.0) -> torch.Tensor:  # fmt: skip
    """sum_i CE(softcap(hidden[i] @ W.T, cap), targets[i]) in float32 (IGNORE adds 0), with the gradient for hidden.

    hidden [N, D], targets [N]; equals F.cross_entropy(softcap(F.linear(hidden, W), cap).float(), targets,
    reduction="sum"). Soft-capped logits l = c * tanh(raw / c): the exp terms of dh carry dl/draw = 1 - (l / c)^2.
    """
    return StreamedCrossEntropy.apply(hidden, targets, lambda: blocks(weight, rows, dtype, hidden.device),
                                      token_chunk, cap)  # fmt: skip


class StreamedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, make_blocks, token_chunk, cap=0.0):
        want_dh = ctx.needs_input_grad[0]
        N = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        m = torch.full((N,), float("-inf"), **f32)  # running max logit
        s = torch.zeros(N, **f32)  # sum of exp(logit - m)
        picked = torch.zeros(N, **f32)  # the target's logit
        a = torch.zeros(N, hidden.shape[1], **f32) if want_dh else None  # sum of exp(logit - m) * W_v
        w_target = torch.zeros_like(a) if want_dh else None  # W[target]
        valid = targets != IGNORE
        for start, block in make_blocks():
            n = block.shape[0]
            for c in range(0, N, token_chunk):
                i = slice(c, c + token_chunk)
                raw = F.linear(hidden[i], block)  # [C, n] in the matmul dtype
                logit = raw.float()
                if cap:
                    logit = torch.tanh(logit / cap) * cap
                at = targets[i] - start  # the target's row in this block
                hit = valid[i] & (at >= 0) & (at < n)
                at = at.clamp(0, n - 1)
                picked[i] = torch.where(hit, logit.gather(1, at[:, None])[:, 0], picked[i])
                new_m = torch.maximum(m[i], logit.amax(dim=-1))
                rescale = (m[i] - new_m).exp()  # [C]; 0 on the first block (m = -inf)
                slope = 1 - (logit / cap).square() if cap and want_dh else None  # d capped / d raw
                p = logit.sub_(new_m[:, None]).exp_()  # [C, n], in place of the float logits
                s[i] = s[i] * rescale + p.sum(dim=-1)
                m[i] = new_m
                if want_dh:
                    q = p * slope if cap else p
                    a[i] = a[i] * rescale[:, None] + (q.to(raw.dtype) @ block).float()
                    w = block[at].float()
                    if cap:
                        w = w * slope.gather(1, at[:, None])
                    w_target[i] = torch.where(hit[:, None], w, w_target[i])
        total = torch.where(valid, m + s.log() - picked, 0.0).sum()
        dh = None
        if want_dh:
            dh = torch.where(valid[:, None], a / s[:, None] - w_target, 0.0).to(hidden.dtype)
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return (dh * grad).to(dh.dtype) if dh is not None else None, None, None, None, None
