"""OFT (orthogonal fine-tuning) on nn.Linear layers, with HF PEFT 0.21.2's exact math and storage.

The input is rotated by a block-diagonal matrix of n_b blocks of size b (n_b b = in) before the frozen layer:

    Q_i  = skew(q_i)                  q_i [b (b - 1) / 2], the strict upper triangle (PEFT's oft_R.weight row i)
    R_i  = I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1)    Cayley-Neumann, k = num_cayley_neumann_terms (default)
         = (I - Q)(I + Q)^-1                               exact Cayley (use_cayley_neumann=False)
    y    = W (blockdiag(R_1..R_nb)^T x) + b                in row form: x_block_i @ R_i, then the base layer
    merged: W' = W blockdiag(R)^T  (the input side; the bias is left alone)

PEFT sizes a layer by exactly one of r (n_b) and oft_block_size (b); a value that does not divide `in` moves
to the nearest divisor (ties to the smaller; b >= in becomes in), with a warning, as PEFT. oft_R.weight is
[n_b, b (b - 1) / 2] (block_share: [1, ...], one block repeated). Init (init_weights=True): zeros, R = I.
COFT (coft=True): at each forward the vectors are projected in place (no grad; PEFT's behaviour) so that every
block's ||Q_i||_F <= eps / sqrt(rows of oft_R.weight); merges use a projected copy and leave the vectors as they
are. Under FSDP2 the forward projects the gathered copy only; OftStep projects the stored shards after each update.
module_dropout is recorded but, as in PEFT 0.21.2's Linear (which builds its MultiplicativeDropoutLayer and never
calls it), has no effect.
The rotation is computed in the adapter's dtype (float32), the rotated input cast back to the input's dtype.
Base Parameters keep their names, as in lora.py; every forward reads the parameters anew (FSDP2's unsharded).
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ftcore.peft.base_layer import FrozenBase


def adjust(in_features: int, value: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of in_features nearest to value (ties: the smaller)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def resolve(in_features: int, r: int, block_size: int) -> tuple[int, int]:
    """(n_blocks, block_size) as PEFT's update_layer resolves them from exactly one of r / oft_block_size."""
    if r == 0:
        if in_features % block_size != 0 or block_size > in_features:
            new = adjust(in_features, block_size)
            warnings.warn(f"Invalid `oft_block_size` ({block_size})! Adjusted `oft_block_size` to ({new}).",
                          stacklevel=3)  # fmt: skip
            block_size = new
        return in_features // block_size, block_size
    if in_features % r != 0 or r > in_features:
        new = adjust(in_features, r)
        warnings.warn(f"Invalid `r` ({r})! Adjusted `r` to ({new}).", stacklevel=3)
        r = new
    return r, in_features // r


class OftRotation(nn.Module):
    """Holds oft_R.weight [rows, b (b - 1) / 2] (rows = n_blocks, or 1 with block_share) under PEFT's name."""

    def __init__(self, rows: int, block_size: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, block_size * (block_size - 1) // 2, device=device))


class OftLinear(FrozenBase):
    def __init__(self, base: nn.Linear, r: int = 0, oft_block_size: int = 32, coft: bool = False, eps: float = 6e-5,
                 block_share: bool = False, use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5,
                 module_dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r, self.block_size = resolve(self.in_features, r, oft_block_size)
        self.coft, self.eps, self.block_share = coft, eps, block_share
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.module_dropout = module_dropout  # inert, as PEFT's Linear
        # float32 whatever the base dtype; uninitialized: apply() calls reset_parameters, load_adapter copies
        self.oft_R = OftRotation(1 if block_share else self.r, self.block_size, base.weight.device)
        self.merged = False

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """PEFT's init_weights=True: zeros (every block is the identity; no draw)."""
        self.oft_R.weight.zero_()

    # -- the rotation -----------------------------------------------------------------------------------

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        """[rows, n] -> [rows, b, b]: the vector on the strict upper triangle, minus its transpose."""
        b = self.block_size
        rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
        m = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
        m[:, rows, cols] = vec
        return m - m.transpose(-2, -1)

    @torch.no_grad()
    def project(self, vec: torch.Tensor, rows: int) -> torch.Tensor:
        """COFT: each block's skew matrix scaled into the Frobenius ball of radius eps / sqrt(rows) (PEFT's
        _project_batch, same expressions); returned as vectors again. `rows`: oft_R.weight's whole row count."""
        q = self.skew(vec)
        eps = self.eps * 1 / torch.sqrt(torch.tensor(rows))
        zero = torch.zeros((q.size(1), q.size(1)), device=q.device, dtype=q.dtype).unsqueeze(0).expand_as(q)
        diff = q - zero
        norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
        out = torch.where((norm <= eps).bool(), q, zero + eps * (diff / norm))
        b = self.block_size
        r_idx, c_idx = torch.triu_indices(b, b, 1, device=vec.device)
        return out[:, r_idx, c_idx]

    @torch.no_grad()
    def project_(self):
        """COFT's in-place projection of oft_R.weight (what PEFT does at every use). On an FSDP2 shard (rows of
        a DTensor) the rows held here are projected: the projection is row by row."""
        w = self.oft_R.weight
        if isinstance(w, DTensor):
            local = w.to_local()
            if local.numel():
                local.copy_(self.project(local, w.shape[0]))
        else:
            w.copy_(self.project(w, w.shape[0]))

    def blocks(self, write: bool = True) -> torch.Tensor:
        """R_i [rows, b, b] from oft_R.weight, in its dtype, differentiable. With coft the vectors are projected
        first: in place (PEFT's forward), or on a copy with write=False (merges and exports leave the model as is)."""
        w = self.oft_R.weight
        if self.coft and write:
            self.project_()
        elif self.coft:
            w = self.project(w.detach(), w.shape[0])
        q = self.skew(w)
        b, n = self.block_size, w.shape[0]
        if self.use_cayley_neumann:
            terms = self.num_cayley_neumann_terms
            r = torch.eye(b, device=w.device, dtype=w.dtype).repeat(n, 1, 1)
            if terms > 1:
                r.add_(q, alpha=2.0)
                if terms > 2:
                    q2 = torch.bmm(q, q)
                    r.add_(q2, alpha=2.0)
                    power = q2
                    for _ in range(3, terms - 1):
                        power = torch.bmm(power, q)
                        r.add_(power, alpha=2.0)
                    power = torch.bmm(power, q)
                    r.add_(power)
            return r
        eye = torch.eye(b, device=w.device).unsqueeze(0).expand(n, b, b)
        # PEFT's torch.linalg.solve without its host-side singularity check (I + Q is invertible for a skew Q;
        # no sync, so a CUDA graph can capture it): the same solution
        return torch.linalg.solve_ex(eye + q, eye - q, left=False)[0].to(w.dtype)

    def all_blocks(self, write: bool = True) -> torch.Tensor:
        """[n_blocks, b, b]: the shared block repeated with block_share."""
        rot = self.blocks(write)
        return rot.repeat(self.r, 1, 1) if self.block_share else rot

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x blockdiag(R) [..., in], in the adapter's dtype (PEFT's OFTRotationModule.forward)."""
        x = x.to(self.oft_R.weight.dtype)
        rot = self.all_blocks()
        xr = x.reshape(*x.shape[:-1], self.r, self.block_size)
        return torch.einsum("...rk,rkc->...rc", xr, rot).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.rotate(x).to(x.dtype), self.weight, self.bias).to(x.dtype)

    # -- merge ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _apply_blocks(self, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        """weight [out, in] -> weight blockdiag(R)^T (or blockdiag(R)^-T), float32, block by block."""
        rot = self.all_blocks(write=False).float()
        if inverse:
            rot = torch.linalg.inv(rot)
        w = weight.float().reshape(self.out_features, self.r, self.block_size)
        return torch.einsum("oik,ick->oic", w, rot).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight [out, in] that makes a plain Linear compute this layer (in the base dtype)."""
        if self.merged:
            return self.weight.detach().clone()
        return self._apply_blocks(self.weight, inverse=False).to(self.weight.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()  # the bias is left alone

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W = W' blockdiag(R)^-T (the Neumann series is not exactly orthogonal: an inverse, as PEFT)."""
        if self.merged:
            self.weight.copy_(self._apply_blocks(self.weight, inverse=True).to(self.weight.dtype))
            self.merged = False

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"oft_R.weight": self.oft_R.weight}

    def extra_repr(self) -> str:
        kind = "oft" + (", coft" if self.coft else "") + (", block_share" if self.block_share else "")
        return (f"{self.in_features}, {self.out_features}, {kind}, r={self.r}, oft_block_size={self.block_size}, "
                f"merged={self.merged}")  # fmt: skip


@torch.no_grad()
def project_shards(model: nn.Module):
    """COFT under FSDP2: project every coft layer's sharded oft_R.weight (a DTensor) in place. In one process the
    layer's projection at each use writes the stored parameter (PEFT's behaviour); under FSDP2 it writes only
    the gathered copy, so the training step calls this after each update (OftStep) to keep the stored shards,
    which the optimizer updates, projected as in one process. Plain parameters are left to the layer."""
    for layer in model.modules():
        if isinstance(layer, OftLinear) and layer.coft and isinstance(layer.oft_R.weight, DTensor):
            layer.project_()


class OftStep:
    """What the training step adds for COFT: the shards projected at the start and after every update."""

    def __init__(self, model: nn.Module):
        self.model = model
        project_shards(model)

    def regularizer(self):
        return None

    def after_step(self):
        project_shards(self.model)
