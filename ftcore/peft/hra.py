"""HRA (Householder reflection adaptation) on nn.Linear layers, with HF PEFT's exact math.

The frozen weight is multiplied on the right by an orthogonal matrix R [in, in], a chain of r Householder
reflections of the trainable columns of U = hra_u [in, r]:

    u_i = U[:, i] / ||U[:, i]||,   H_i = I - 2 u_i u_i^T
    R = H_1 H_2 ... H_r                          (apply_GS=False, PEFT's default)
    R = I - 2 Q Q^T                              (apply_GS=True; Q = Gram-Schmidt of U's columns, in order)
    y = (W R) x + b,   merged: W' = W R,   unmerged: W = W' R^T (R is orthogonal)

R is never built as [in, in]: the product of reflections has the compact WY form R = I - V T V^T with V [in, r]
the unit columns and T [r, r] upper triangular, T = (I/2 + triu(V^T V, 1))^-1 (LAPACK's dlarft recursion in
closed form; T = 2 I for the orthonormal Gram-Schmidt columns). So y = W (x - V (T^T (V^T x))) + b costs
O(r in) per token beyond the base matmul, where PEFT forms W R every forward.

Init (PEFT's init_weights=True): for even r, r/2 columns kaiming-uniform(a=sqrt(5)) (a [in, r/2] draw), each
repeated twice in place (columns 2k and 2k+1 equal), so the reflections cancel in pairs and R = I (the base
model). Odd r (PEFT warns) and "random" (init_weights=False): all r columns kaiming-uniform, R != I. With
apply_GS the repeated columns orthogonalize to rounding noise, so R != I there too (as in PEFT).
Base Parameters keep their names, as in lora.py.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.peft.base_layer import FrozenBase


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """PEFT's (modified) Gram-Schmidt of the columns of u [in, r], in order: orthonormal columns [in, r]."""
    cols = [u[:, 0] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        ui = u[:, i]
        for q in cols:
            ui = ui - (q @ ui) * q
        cols.append(ui / ui.norm())
    return torch.stack(cols, dim=1)


def wy_factors(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [in, r], T [r, r]) with R = I - V T V^T = the reflections' product (float32, differentiable)."""
    if apply_gs:
        v = gram_schmidt(u)
        return v, 2 * torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    v = u / u.norm(dim=0)  # [in, r] unit columns
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    inv_t = 0.5 * eye + torch.triu(v.T @ v, diagonal=1)  # [r, r], upper triangular, diagonal 1/2
    return v, torch.linalg.solve_triangular(inv_t, eye, upper=True)


class HraLinear(FrozenBase):
    def __init__(self, base: nn.Linear, r: int, apply_gs: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r, self.apply_gs = r, apply_gs
        # float32 whatever the base dtype; uninitialized: apply() calls reset_parameters, load_adapter copies
        self.hra_u = nn.Parameter(torch.empty(self.in_features, r, device=base.weight.device))  # [in, r]
        self.merged = False

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming-uniform", generator: torch.Generator | None = None):
        """PEFT's init_weights=True ("kaiming-uniform": symmetric pairs for even r) or False ("random")."""
        if init == "kaiming-uniform" and self.r % 2 == 0:
            half = torch.empty(self.in_features, self.r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5), generator=generator)
            u = torch.repeat_interleave(half, 2, dim=1)  # columns 2k, 2k+1 = half[:, k]
        else:
            if init == "kaiming-uniform":
                warnings.warn(f"peft.r={self.r}: HRA's symmetric (identity) init needs an even r; the adapter starts "
                              "at random reflections", stacklevel=3)  # fmt: skip
            u = torch.empty(self.hra_u.shape)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5), generator=generator)
        self.hra_u.copy_(u)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.hra_u.device.type, enabled=False):  # tiny [in, r] / [r, r] work, kept in float32
            return wy_factors(self.hra_u.float(), self.apply_gs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        v, t = self.factors()
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            xr = xf - ((xf @ v) @ t.T) @ v.T  # x R^T  [..., in]
        return F.linear(xr.to(self.weight.dtype), self.weight, self.bias)  # [..., out]

    @torch.no_grad()
    def _times_r(self, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """w R (or w R^T) for w [out, in], in float32."""
        v, t = self.factors()
        return w - ((w @ v) @ (t.T if transpose else t)) @ v.T

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if self.merged:
            return self.weight.detach().clone()
        return self._times_r(self.weight.float()).to(self.weight.dtype)

    @torch.no_grad()
    def merged_bias(self):
        return None if self.bias is None else self.bias.detach().clone()  # the bias is left alone

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self._times_r(self.weight.float(), transpose=True).to(self.weight.dtype))
            self.merged = False

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"hra_u": self.hra_u}

    def extra_repr(self) -> str:
        gs = ", apply_GS" if self.apply_gs else ""
        return f"{self.in_features}, {self.out_features}, hra, r={self.r}{gs}, merged={self.merged}"
