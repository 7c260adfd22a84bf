"""AdaLoRA: SVD-form adapters whose ranks are reallocated by importance during training (HF PEFT's exact math).

    y = W x + b + ((dropout(x) (A ⊙ E)^T) B^T) * alpha / (ranknum + 1e-5)
        A [r, in] (right singular vectors), E [r, 1] (singular values), B [out, r] (left), r = init_r;
        ranknum = init_r, fixed (pruning zeroes entries of E, it does not rescale)
    init: E = 0, A and B ~ N(0, 0.02^2)

Training adds an orthogonality penalty to the loss, orth_reg_weight * mean over every A and B of
||A A^T - I||_F and ||B^T B - I||_F (not squared; pruned triplets included), and after every optimizer step
RankAllocator.step scores each triplet (E_i, A_i, B_:,i) and keeps the best of a shrinking total budget:

    importance of a tensor  I = |p * grad| (post-step value, pre-step gradient), smoothed:
        Ibar = beta1 Ibar + (1 - beta1) I;   U = beta2 U + (1 - beta2) |I - Ibar|;   s = Ibar * U
    triplet score  s_E[i] + mean_j s_A[i, j] + mean_k s_B[k, i]
    budget(t)      init_r * n for t <= tinit; then cubic down to target_r * n at t = total_step - tfinal;
                   every deltaT steps in between, E of the triplets scoring <= the k-th smallest score over
                   all layers (k = init budget - budget) is set to 0; at t = total_step - tfinal the final mask is
                   fixed (rank_pattern) and re-applied after every later step

The saved adapter holds only the kept triplets (A rows, E rows, B columns) and the rank_pattern, as PEFT's.
Under FSDP2 the allocator gathers each adapter tensor and its gradient whole (they are small), so every rank
keeps the same scores and mask, and masks its own shard of E.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ftcore.peft.base_layer import FrozenBase
from ftcore.peft.delta import DeltaMerge


class AdaLoraLinear(DeltaMerge, FrozenBase):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.hold_base(base)
        self.r, self.alpha = r, alpha
        self.scaling = alpha if alpha > 0 else float(r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))  # float32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))
        # a frozen Parameter, as PEFT's (it counts in the total parameters)
        self.ranknum = nn.Parameter(torch.full((1,), float(r), device=device), requires_grad=False)
        self.merged = False

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        self.lora_E.zero_()
        for p in (self.lora_A, self.lora_B):
            p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=generator))

    @torch.no_grad()
    def keep(self, kept: list[bool]):
        """Shrink to the kept triplets (a pruned adapter being loaded); ranknum stays init_r, as in PEFT."""
        idx = torch.tensor(kept, dtype=torch.bool)
        self.lora_A = nn.Parameter(self.lora_A[idx].clone())
        self.lora_B = nn.Parameter(self.lora_B[:, idx].clone())
        self.lora_E = nn.Parameter(self.lora_E[idx].clone())

    def delta_weight(self) -> torch.Tensor:
        """B (A ⊙ E) * alpha / (ranknum + 1e-5)  [out, in], float32."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged:
            return y
        xa = self.lora_dropout(x.to(self.lora_A.dtype))
        update = (xa @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)
        return (y + update).to(y.dtype)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, adalora, init_r={self.r}, merged={self.merged}"


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 shard (a collective: every rank calls it); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def zero_rows(e: torch.Tensor, drop: torch.Tensor):
    """E[drop] = 0 for a bool mask over the whole E [r, 1]; on an FSDP2 shard, the rows this rank holds."""
    if isinstance(e, DTensor):
        mine = distribute_tensor(drop, e.device_mesh, e.placements, src_data_rank=None)  # no communication
        e.to_local().masked_fill_(mine.to_local(), 0.0)
    else:
        e.masked_fill_(drop, 0.0)


def orth_regularizer(layers: list[AdaLoraLinear]) -> torch.Tensor:
    """Mean over every A and B of ||A A^T - I||_F and ||B^T B - I||_F (PEFT's AdaLoraModel.forward).

    Under FSDP2 each A and B is gathered whole (differentiably: each rank's shard gets its rows' gradient)."""
    total, n = 0, 0
    for layer in layers:
        a, b = whole(layer.lora_A), whole(layer.lora_B)  # [r, in], [out, r]
        for cov in (a @ a.T, b.T @ b):  # [r, r] each
            total = total + torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro")
            n += 1
    return total / n


class RankAllocator:
    """PEFT's importance-based budget: call step() after each optimizer step, before the gradients are zeroed.

    layers: {our module name: AdaLoraLinear} in model order. `rank_pattern` ({name: [bool] * init_r}) is the
    latest mask (None before the first). state_dict() holds everything a resumed run needs.
    """

    def __init__(self, layers: dict[str, AdaLoraLinear], init_r: int, target_r: int, tinit: int, tfinal: int,
                 delta_t: int, beta1: float, beta2: float, total_step: int):  # fmt: skip
        self.layers = layers
        self.init_budget, self.target_budget = init_r * len(layers), target_r * len(layers)
        self.tinit, self.tfinal, self.delta_t, self.total_step = tinit, tfinal, delta_t, total_step
        self.beta1, self.beta2 = beta1, beta2
        self.ipt, self.unc = {}, {}  # (layer, tensor) -> smoothed importance / uncertainty
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.steps = 0  # optimizer steps taken (PEFT's 0-based global_step of the next call)

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask at this step)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        progress = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * (progress**3) + self.target_budget)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def update_importance(self):
        for name, layer in self.layers.items():
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B), ("E", layer.lora_E)):
                p, grad = whole(p.detach()), whole(p.grad)
                if (name, key) not in self.ipt:
                    self.ipt[name, key], self.unc[name, key] = torch.zeros_like(p), torch.zeros_like(p)
                ipt = (p * grad).abs()
                self.ipt[name, key] = self.beta1 * self.ipt[name, key] + (1 - self.beta1) * ipt
                spread = (ipt - self.ipt[name, key]).abs()  # against the updated average, as PEFT
                self.unc[name, key] = self.beta2 * self.unc[name, key] + (1 - self.beta2) * spread

    @torch.no_grad()
    def mask_to_budget(self, budget: int):
        scores = {}
        for name in self.layers:
            s = {k: self.ipt[name, k] * self.unc[name, k] for k in ("A", "B", "E")}
            s_ab = torch.cat([s["A"].mean(dim=1, keepdim=True), s["B"].mean(dim=0).view(-1, 1)], dim=1).sum(dim=1)
            scores[name] = (s["E"].view(-1) + s_ab.view(-1)).view(-1, 1)  # [r, 1]
        threshold = torch.kthvalue(torch.cat([v.view(-1) for v in scores.values()]), k=self.init_budget - budget)[0]
        threshold = threshold.item()
        self.rank_pattern = {}
        for name, layer in self.layers.items():
            drop = scores[name] <= threshold  # [r, 1]
            zero_rows(layer.lora_E, drop.to(layer.lora_E.device))
            self.rank_pattern[name] = (~drop).view(-1).tolist()

    @torch.no_grad()
    def step(self):
        """After optimizer.step(), before zero_grad: score, and mask on the schedule (PEFT's update_and_allocate)."""
        step, final = self.steps, self.total_step - self.tfinal
        if step < final:
            self.update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.target_budget)  # the final pattern, from the scores up to the previous step
            self.ipt, self.unc = {}, {}
        else:
            for name, layer in self.layers.items():
                kept = torch.tensor(self.rank_pattern[name], device=layer.lora_E.device).unsqueeze(-1)  # [r, 1]
                zero_rows(layer.lora_E, ~kept)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc), "rank_pattern": self.rank_pattern, "steps": self.steps}

    def load_state_dict(self, state: dict):
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        self.rank_pattern, self.steps = state["rank_pattern"], state["steps"]


class AdaLoraStep:
    """What the training step adds for AdaLoRA: the penalty on the loss, the allocator after the update."""

    def __init__(self, allocator: RankAllocator, orth_reg_weight: float):
        self.allocator, self.orth_reg_weight = allocator, orth_reg_weight

    def regularizer(self) -> torch.Tensor | None:
        if not self.orth_reg_weight:
            return None
        return self.orth_reg_weight * orth_regularizer(list(self.allocator.layers.values()))

    def after_step(self):
        self.allocator.step()
