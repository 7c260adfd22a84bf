"""LoRA initializations from W itself: PiSSA (principal singular vectors) and OLoRA (QR), as HF PEFT does them.

The adapter starts at a rank-r part of W and the frozen base keeps the residual, so the model computes
exactly what the base did (in eval; up to float rounding), but training moves the principal directions:

    PiSSA   W = U S Vh,  S' = S[:r] / s:   A = diag(sqrt S') Vh[:r]  [r, in],   B = U[:, :r] diag(sqrt S')  [out, r]
            (pissa_niter_N: U, S, V from a randomized SVD with N subspace iterations instead)
    OLoRA   W = Q R:                        A = R[:r]                 [r, in],   B = Q[:, :r]               [out, r]
    base    W_res = W - s B A   (s = the layer's scaling; PiSSA's S' / s makes s B A = U_r S_r V_r^T)

All in float32; the residual is cast back to the base dtype. The layer keeps (A0, B0) so that the saved
adapter can be converted to a plain LoRA on the *original* W (PEFT's path_initial_model_for_weight_conversion):
A' = [A; A0] [2r, in], B' = [B, -B0] [out, 2r], alpha doubled (x sqrt 2 for rsLoRA) so s stays, and
W + s B' A' = W_res + s B A.
"""

import torch

from ftcore.peft.config import PISSA_NITER


def svd_lowrank(w: torch.Tensor, q: int, niter: int, generator: torch.Generator | None = None):
    """torch.svd_lowrank's algorithm (Halko et al.) with an explicit generator: (U [m, q], S [q], V [n, q])."""
    m, n = w.shape
    a = w.mT if m < n else w  # [M, N], M >= N
    r = torch.randn(a.shape[-1], q, dtype=a.dtype, generator=generator).to(a.device)
    basis = torch.linalg.qr(a @ r).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    u, v = basis @ u, vh.mH
    return (v, s, u) if m < n else (u, s, v)


@torch.no_grad()
def principal_init(layer, init: str, generator: torch.Generator | None = None):
    """Set layer.lora_A/lora_B from W by `init` (pissa | pissa_niter_N | olora), leave W_res in the base weight,
    and keep A0, B0 for the conversion at save."""
    w = layer.weight.float()  # [out, in]
    r, s = layer.r, layer.scaling
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        niter = PISSA_NITER.fullmatch(init)
        if niter:
            u, sv, v = svd_lowrank(w, r, int(niter.group(1)), generator)
            vh = v.t()
        else:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        ur, sr, vhr = u[:, :r], sv[:r] / s, vh[:r]
        a = torch.diag(torch.sqrt(sr)) @ vhr
        b = ur @ torch.diag(torch.sqrt(sr))
    # PEFT casts the adapter to the base dtype before upcasting it to float32: the same rounding here
    dtype = layer.weight.dtype
    layer.lora_A.weight.copy_(a.to(dtype).float())
    layer.lora_B.weight.copy_(b.to(dtype).float())
    layer.weight.copy_((w - s * (b @ a)).to(dtype))
    layer.lora_A0 = layer.lora_A.weight.detach().clone()  # buffers (not saved in state_dict), moved with the layer
    layer.lora_B0 = layer.lora_B.weight.detach().clone()


def converted_tensors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [2r, in], B' [out, 2r]): the trained delta as a plain LoRA on the original W."""
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    return torch.cat([a, layer.lora_A0.to(a)], dim=0), torch.cat([b, -layer.lora_B0.to(b)], dim=1)
