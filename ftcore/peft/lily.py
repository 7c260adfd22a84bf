"""Lily (low-rank interconnected adaptation across layers) on nn.Linear layers, with HF PEFT's exact math.

Adapted layers are grouped by (the target_modules entry they match, weight shape), in model order: all q_proj
layers form one group, all v_proj another (a regex target: one group per shape). Within a group

    A_k [r, in]            one per block of stride_A consecutive layers (layer i uses A_{i // stride_A}), shared
    B   [num_B * r, out]   one for the whole group, shared: num_B "experts" B_e [r, out] (B.view(num_B, r, out))
    router [num_B, r]      per layer

    h = A x                                          [..., r]
    p = mean over every token of the call of softmax(router h)    [num_B]   (padding tokens included, as PEFT)
    y = W x + b + scaling * h (sum_e p_e B_e)        no alpha / r

A and the routers start kaiming-uniform (a=sqrt(5)), B at zero (init_weights=True: the base model) or
kaiming-uniform too. The mixing weights p depend on the whole input, so Lily cannot be merged (PEFT refuses too).

The shared A's and B's are Parameters of one root module, `model.lily_projectors` (so FSDP2 shards them once,
with the root); each layer looks its two up by name at every call (never a stale reference: FSDP2 swaps the
registered Parameters between their sharded and gathered forms, and gather_model assigns new ones). On disk they
are saved under every layer that uses them, as PEFT saves them (`...q_proj.lily_A.weight` per layer).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.peft.base_layer import FrozenBase


class LilyProjectors(nn.Module):
    """The shared projectors: `A_<group>_<k>` [r, in] and `B_<group>` [num_B * r, out], float32."""

    def add(self, name: str, shape: tuple[int, int], device) -> str:
        self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device)))
        return name


class LilyLinear(FrozenBase):
    def __init__(self, base: nn.Linear, projectors: LilyProjectors, a_name: str, b_name: str, r: int, num_B: int,
                 scaling: float):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self._projectors = [projectors]  # a reference, not a submodule: the shared tensors exist once
        self.a_name, self.b_name = a_name, b_name
        self.r, self.num_B, self.scaling = r, num_B, scaling
        self.lily_router = nn.Parameter(torch.zeros(num_B, r, device=base.weight.device))  # float32
        self.merged = False  # never: Lily does not merge

    @property
    def lily_A(self) -> nn.Parameter:
        return getattr(self._projectors[0], self.a_name)  # [r, in]

    @property
    def lily_B(self) -> nn.Parameter:
        return getattr(self._projectors[0], self.b_name)  # [num_B * r, out]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, init_a: bool = True, init_b: bool = False,
                         init_weights: bool = True):  # fmt: skip
        """PEFT's order per layer: its A (if it leads a stride block), the router, its B (if it leads the group)."""
        tensors = ([self.lily_A] if init_a else []) + [self.lily_router]
        for t in tensors:
            t.copy_(_kaiming(t.shape, generator))
        if init_b and init_weights:
            self.lily_B.zero_()
        elif init_b:
            self.lily_B.copy_(_kaiming(self.lily_B.shape, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        a, b, router = self.lily_A, self.lily_B, self.lily_router
        h = F.linear(x.to(a.dtype), a)  # [..., r]
        p = F.softmax(F.linear(h, router), dim=-1).reshape(-1, self.num_B).mean(dim=0)  # [num_B]
        combined = torch.einsum("e,eio->io", p, b.reshape(self.num_B, -1, b.shape[1]))  # [r, out]
        return y + (torch.matmul(h, combined) * self.scaling).to(y.dtype)

    def _refuse(self):
        raise FtcoreError("peft.method=lily: its router mixes the shared B projectors by weights computed from each "
                          "input, so it cannot be merged into the base weights (HF PEFT does not merge Lily either)")  # fmt: skip

    def merged_weight(self):
        self._refuse()

    def merged_bias(self):
        self._refuse()

    def merge(self):
        self._refuse()

    def unmerge(self):
        pass  # never merged

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"lily_A.weight": self.lily_A, "lily_B.weight": self.lily_B, "lily_router.weight": self.lily_router}

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, lily, r={self.r}, num_B={self.num_B}, "
                f"A={self.a_name}, B={self.b_name}")  # fmt: skip


def _kaiming(shape, generator) -> torch.Tensor:
    """kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on CPU."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def lily_groups(names: list[str], linears: list[nn.Linear], targets, keys: list[str]) -> dict[tuple, list[int]]:
    """PEFT's grouping: (the matched target entry, weight shape) -> indices into names, in model order.

    PEFT matches an entry by a plain `key.endswith(entry)`; with several matching entries its choice depends on a
    set's order, so ftcore refuses that case.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (name, layer, key) in enumerate(zip(names, linears, keys)):
        if isinstance(targets, str):
            entry = targets
        else:
            hits = sorted({t for t in targets if key.endswith(t)})
            if len(hits) != 1:
                raise FtcoreError(f"peft.target_modules: {key} ends with {len(hits)} entries ({', '.join(hits)}); Lily "
                                  "shares projectors among the layers of one entry, and HF PEFT's pick among several "
                                  "is arbitrary: keep one entry per layer")  # fmt: skip
            entry = hits[0]
        groups.setdefault((entry, tuple(layer.weight.shape)), []).append(i)
    return groups
