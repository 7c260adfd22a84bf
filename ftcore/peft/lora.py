"""LoRA, rsLoRA and DoRA on nn.Linear layers, with HF PEFT's exact math.

The eager forward below is the reference; with `fused = True` (what train() sets from `train.fused_lora`,
on by default) plain LoRA and rsLoRA layers run through ops.lora_linear instead: one autograd node that
adds the adapter term in place and keeps less for backward (DoRA and merged layers stay eager).

    x ─┬─ W (frozen, + b) ──────────────────────────┐
       └─ dropout ─ A [r, in] ─ B [out, r] ─ * s ───┴─ + ─> y        s = alpha / r  (rsLoRA: alpha / sqrt(r))

DoRA rescales each output row: y = m / ||W + s B A||_row * (W x + s B A x) + b, where the
magnitude m [out] is learned and the row norm is detached from the graph (DoRA paper, section 4.3;
PEFT does the same). The norm is computed from `self.weight` at every forward, so it works on
whatever the weight is at that moment (e.g. FSDP2's unsharded parameter).

The module keeps the base layer's Parameters under their own names (`weight`, `bias`), so a model
with adapters still loads base checkpoints and its base keys stay `...q_proj.weight`; over a
quantized base it keeps the quantized layer as `base_layer` (base_layer.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.model import ops
from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.config import is_principal
from ftcore.peft.lora_init import principal_init


class LoraLinear(FrozenBase):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        # Adapter parameters are float32 whatever the base dtype (trainable state stays fp32); built
        # uninitialized (no draw from the global RNG): apply() calls reset_parameters, load_adapter copies.
        self.lora_A = _empty_linear(self.in_features, r, device)  # weight [r, in]
        self.lora_B = _empty_linear(r, self.out_features, device)  # weight [out, r]
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, device=device))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        # PiSSA/OLoRA: the adapter's initial values (lora_init.py), to convert the saved adapter to a plain LoRA
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        self.merged = False
        self.fused = False  # ops.lora_linear instead of the eager forward (set by train() from train.fused_lora)
        self._merged_norm = None  # DoRA: the row norm used by merge(), needed to undo it

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def principal(self) -> bool:
        """Initialized by PiSSA/OLoRA: the base weight holds the residual W - s B0 A0."""
        return self.lora_A0 is not None

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming-uniform", generator: torch.Generator | None = None):
        """PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) or N(0, 1/r), B = 0; or PiSSA/OLoRA from W (lora_init.py,
        which changes the base weight to the residual); DoRA's m = ||W + s B A||_row."""
        if is_principal(init):
            principal_init(self, init, generator)
        else:
            a = torch.empty(self.lora_A.weight.shape)
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r, generator=generator)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            nn.init.zeros_(self.lora_B.weight)
        if self.dora:
            self.lora_magnitude_vector.copy_(self.weight_norm(self.weight.float()))

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A [out, in] in float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row [out], detached from the graph (as PEFT / the DoRA paper)."""
        return torch.linalg.norm(weight + self.delta_weight().to(weight.dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not (self.merged or self.dora or self.weight.requires_grad):
            p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return ops.lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged:
            return y
        xa = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(xa))  # [..., out]
        if not self.dora:
            return y + (lora * self.scaling).to(y.dtype)
        weight = self.weight.to(xa.dtype)
        scale = (self.lora_magnitude_vector / self.weight_norm(weight)).view(1, -1)  # [1, out]
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = (y if self.bias is None else y - self.bias).to(xa.dtype)  # W x
        else:
            # W dropout(x), as PEFT; a quantized base's own matmul keeps no dequantized copy for backward
            base = F.linear(xa, self.weight if self.quantized_base else weight)
        return y + ((scale - 1) * base + scale * lora * self.scaling).to(y.dtype)

    # -- merge ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight [out, in] that makes a plain Linear compute this layer (in the base dtype)."""
        if self.merged:
            return self.weight.detach().clone()
        w = self.weight.float()
        merged = w + self.delta_weight()
        if self.dora:
            merged = (self.lora_magnitude_vector / self.weight_norm(w)).view(-1, 1) * merged
        return merged.to(self.weight.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()  # LoRA leaves the bias alone

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if self.dora:
            self._merged_norm = self.weight_norm(self.weight.float())
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.weight.float()
        if self.dora:
            w = w / (self.lora_magnitude_vector / self._merged_norm).view(-1, 1)
            self._merged_norm = None
        self.weight.copy_((w - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def restore_base(self):
        """PiSSA/OLoRA: put the original W back into the base weight (W_res + s B0 A0), e.g. when unloading."""
        if self.principal:
            w = self.weight.float() + self.scaling * (self.lora_B0 @ self.lora_A0)
            self.weight.copy_(w.to(self.weight.dtype))
            self.lora_A0 = self.lora_B0 = None

    # -- PEFT checkpoint names --------------------------------------------------------------------------

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """Trainable tensors under PEFT's names relative to the module (`lora_A.weight`, ...)."""
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.dora:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out

    def extra_repr(self) -> str:
        kind = "dora" if self.dora else "rslora" if self.use_rslora else "lora"
        kind += ", principal init" if self.principal else ""
        return f"{self.in_features}, {self.out_features}, {kind}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _empty_linear(in_features: int, out_features: int, device) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=torch.float32)
    return layer.to_empty(device=device)
