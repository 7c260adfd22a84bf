"""BOFT (butterfly orthogonal fine-tuning) on nn.Linear layers, with HF PEFT's exact math.

The frozen weight is rotated on its input side by an orthogonal matrix R [in, in] made of m butterfly factors
(m = boft_n_butterfly_factor), and its output rows are scaled by a learned vector s:

    y  = s ⊙ (W R^T x) + b                  (PEFT: base(x @ R) with the bias kept out of the scaling)
    R  = B_{m-1} ... B_1 B_0                B_i = P_i diag(Q_i,1 .. Q_i,D) P_i^T   [in, in]
    Q  = (I - S)(I + S)^-1                  S = (boft_R - boft_R^T) / 2   (Cayley: Q orthogonal, Q = I at 0)
    merged: W' = s ⊙ (W R^T)                (row o of W R^T times s_o)

    boft_R [m, D, H, H]   D = block_num, H = block_size, D H = in; boft_s [out, 1]   (PEFT's names and shapes)

P_i is PEFT's block butterfly permutation (block_butterfly_perm; P_0 = I): a fixed matrix, not saved (PEFT's
boft_P is a non-persistent buffer). We keep its index form, and apply each factor to x as a gather, a batched
[H, H] product per block and a gather, x B_i = (x[..., inv_i] diag(Q_i))[..., perm_i], instead of PEFT's dense
products with P (the same sums, O(T in H m) instead of O(T in^2 + m in^3); on 2 CPU cores, forward + backward
of 1024 tokens, 1.1-1.3x slower than the dense form at in = 576, 1.4-2.3x faster at in = 1536; not timed on a
GPU). boft_R's
symmetric part plays no part (only its skew part enters Q) but is stored and counted, as PEFT does.

Init (PEFT's init_weights=True): boft_R = 0 (R = I), s = 1: the base model. No random draws.
Training mode only, boft_dropout p > 0 (PEFT's MultiplicativeDropoutLayer, torch's default CPU generator): per
forward one factor n = randint(m) is chosen and int(p D) of its D blocks (randperm) are replaced by I.
HF PEFT's CUDA extension (fbd_cuda) only builds block diagonals; it is not used. NOTE: without it PEFT itself
silently trains with m = 1 whatever boft_n_butterfly_factor says (its boft_R then has 1 factor): load_adapter
follows the tensors' shape (io.py).
Base Parameters keep their names, as in lora.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.delta import RestoreMerge


def block_layout(in_features: int, block_size: int, block_num: int, n_butterfly_factor: int) -> tuple[int, int] | str:
    """(block_num D, block_size H) with D H = in_features, or why PEFT refuses the combination (its checks)."""
    f = n_butterfly_factor - 1  # PEFT's (the paper's) count of butterfly factors after the first
    if f >= in_features.bit_length():  # 2^f blocks cannot fit (and 2^f need not be computed)
        return f"boft_n_butterfly_factor={n_butterfly_factor} is too large for in_features {in_features}"
    if block_size == 0:
        if in_features % block_num:
            return f"in_features {in_features} is not a multiple of boft_block_num={block_num}"
        if f and (f > int(math.log2(block_num)) or block_num % 2**f):
            return (f"boft_block_num={block_num} must be a multiple of 2^{f} (boft_n_butterfly_factor="
                    f"{n_butterfly_factor})")  # fmt: skip
        block_size = in_features // block_num
    else:
        if in_features % block_size:
            return f"in_features {in_features} is not a multiple of boft_block_size={block_size}"
        if f and in_features % (block_size * 2**f):
            return (f"in_features {in_features} is not a multiple of boft_block_size * 2^{f} = {block_size * 2**f} "
                    f"(boft_n_butterfly_factor={n_butterfly_factor})")  # fmt: skip
        block_num = in_features // block_size
    if f and (block_num % 2 or block_size % 2):
        return (f"the {block_num} blocks of size {block_size} must both be even numbers with "
                f"boft_n_butterfly_factor={n_butterfly_factor}")  # fmt: skip
    return block_num, block_size


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's block_butterfly_perm(n, b, r, f): indices p with P[i, p[i]] = 1 (identity when f = 0)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = n // b
    step = block_size / r
    chunks = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))  # even chunks of r, then odd ones
    order = torch.empty(block_size, dtype=torch.long)
    for i, pos in enumerate(chunks):
        order[int(i * r) : int(i * r + r)] = torch.arange(block_size)[int(pos * r) : int(pos * r + r)]
    return torch.cat([torch.arange(i, i + block_size)[order] for i in range(0, n, block_size)])


def cayley(data: torch.Tensor) -> torch.Tensor:
    """[b, H, H] -> orthogonal (I - S)(I + S)^-1 with S the skew part of data (PEFT's cayley_batch), float32."""
    data = data.float()
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(data.shape[1], device=data.device).unsqueeze(0).expand_as(data)
    # solve_ex: torch.linalg.solve without its singularity check (a host sync; I + S is never singular)
    return torch.linalg.solve_ex(eye + skew, eye - skew, left=False)[0]


class BoftLinear(RestoreMerge, FrozenBase):
    def __init__(self, base: nn.Linear, block_size: int, block_num: int, n_butterfly_factor: int = 1,
                 dropout: float = 0.0, name: str = ""):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        layout = block_layout(self.in_features, block_size, block_num, n_butterfly_factor)
        if isinstance(layout, str):
            key, value = ("boft_block_size", block_size) if block_size else ("boft_block_num", block_num)
            raise FtcoreError(f"peft.{key}={value}: {name or 'a target'}: {layout}")
        self.block_num, self.block_size = layout
        self.n_butterfly_factor, self.boft_dropout = n_butterfly_factor, dropout
        m, device = n_butterfly_factor, base.weight.device
        perms = [butterfly_perm(self.in_features, self.block_num // 2**i, self.block_size // 2, m - 1)
                 for i in range(m)]  # fmt: skip
        self.permuted = [not torch.equal(p, torch.arange(self.in_features)) for p in perms]  # P_0 = I: no gathers
        # index form of PEFT's boft_P [m, in, in] (not saved, as PEFT's): perm and its inverse per factor
        self.register_buffer("boft_perm", torch.stack(perms).to(device), persistent=False)  # [m, in]
        self.register_buffer("boft_perm_inv", torch.stack([p.argsort() for p in perms]).to(device), persistent=False)
        # float32 whatever the base dtype; apply() calls reset_parameters, load_adapter copies
        self.boft_R = nn.Parameter(torch.empty(m, self.block_num, self.block_size, self.block_size, device=device))
        self.boft_s = nn.Parameter(torch.empty(self.out_features, 1, device=device))  # [out, 1]
        self.merged = False
        self._unmerged_weight = None  # merge() keeps W to restore it exactly

    @torch.no_grad()
    def reset_parameters(self):
        """PEFT's init_weights=True: boft_R = 0 (R = I), boft_s = 1 (no draws)."""
        self.boft_R.zero_()
        self.boft_s.fill_(1.0)

    def blocks(self, dropout: bool) -> torch.Tensor:
        """The orthogonal blocks Q [m, D, H, H] (float32); PEFT's multiplicative dropout if `dropout`."""
        m, d, h, _ = self.boft_R.shape
        q = cayley(self.boft_R.reshape(m * d, h, h)).view(m, d, h, h)
        if dropout and self.boft_dropout > 0:
            n = torch.randint(0, m, (1,)).item()  # PEFT's draws, in its order, on the CPU
            num = int(self.boft_dropout * d)
            mask = torch.cat([torch.ones(num), torch.zeros(d - num)])[torch.randperm(d)].to(q.device)
            eye = torch.eye(h, device=q.device)
            q = q.clone()
            q[n] = torch.where(mask.bool().view(d, 1, 1), eye, q[n])
        return q

    def rotate(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x @ R for x [..., in] (float32): x B_{m-1} first, B_0 last."""
        lead = x.shape[:-1]
        for i in reversed(range(q.shape[0])):
            if self.permuted[i]:
                x = x[..., self.boft_perm_inv[i]]
            x = torch.einsum("...dh,dhk->...dk", x.reshape(*lead, self.block_num, self.block_size), q[i])
            x = x.reshape(*lead, self.in_features)
            if self.permuted[i]:
                x = x[..., self.boft_perm[i]]
        return x

    def rotation(self) -> torch.Tensor:
        """R [in, in] (float32, eval mode: no dropout)."""
        return self.rotate(torch.eye(self.in_features, device=self.boft_R.device), self.blocks(dropout=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        q = self.blocks(dropout=self.training)
        y = F.linear(self.rotate(x.to(q.dtype), q).to(self.weight.dtype), self.weight)  # [..., out] = W R^T x
        out = y.to(self.boft_s.dtype) * self.boft_s.view(-1)
        if self.bias is not None:
            out = out + self.bias
        return out.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """s ⊙ (W R^T) [out, in] in the base dtype: a plain Linear computing this layer."""
        if self.merged:
            return self.weight.detach().clone()
        return ((self.weight.float() @ self.rotation().T) * self.boft_s.float()).to(self.weight.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, boft, blocks={self.block_num}x{self.block_size}, "
                f"butterfly_factors={self.n_butterfly_factor}, merged={self.merged}")  # fmt: skip
