"""Per-row adapter selection: one batch through one base model, each row through its own adapter's layers.

    routing = attach_routers(base, [adapted_a, adapted_b])   # models made by shared_copy + load_adapter
    routing.select([0, 1, 1, 2])                             # row 0 on the base, rows 1-2 on a, row 3 on b
    base(tokens, ...)                                        # every adapted module routes its rows

Each module that some adapter replaced (a LoRA/DoRA/IA3/LoHa/OFT/... linear, an LN-tuning norm, a LoRA
embedding) becomes a Router holding the base module and each adapter's version of it. A Router splits the
batch's rows (dim 0) by adapter, runs each group through that adapter's module and scatters the results back:
every row still goes through exactly one module, so the batch costs what the adapters' own batches would, and
attention, the KV cache and the unadapted layers run once for all rows. The adapters' modules hold the base's
own Parameters (shared_copy), so n adapters add only their own tensors.
Methods that change the sequence (prefix, prompt tuning, P-tuning) cannot share a batch this way; the server
batches them per adapter (models.py).
"""

import copy

import torch
from torch import nn

from ftcore.peft.attach import ADAPTER_LAYERS


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose Parameters and buffers are the original's (no tensor is copied)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class Routing:
    """Which rows of the current batch go to which adapter: select() before a forward, clear() after."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor]] = []  # (adapter index, row indices), adapter rows only
        self.whole: int | None = 0  # every row on one adapter (0 = the base), else None

    def select(self, adapters: list[int], device=None):
        """adapters[i]: row i's adapter, 0 = the base model, k = the k-th adapted model given to attach_routers."""
        if len(set(adapters)) == 1:
            self.whole, self.groups = adapters[0], []
            return
        self.whole = None
        rows = torch.tensor(adapters, device=device)
        self.groups = [(a, (rows == a).nonzero().squeeze(1)) for a in sorted(set(adapters))]

    def clear(self):
        self.whole, self.groups = 0, []


class Router(nn.Module):
    """A base module and the adapters' versions of it; routes each row (dim 0) of its input by `routing`."""

    def __init__(self, base: nn.Module, adapted: dict[int, nn.Module], routing: Routing):
        super().__init__()
        self.base = base
        self.adapted = nn.ModuleDict({str(k): m for k, m in adapted.items()})
        self._routing = [routing]  # a reference, not a submodule

    def module_for(self, adapter: int) -> nn.Module:
        key = str(adapter)
        return self.adapted[key] if adapter and key in self.adapted else self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self._routing[0]
        if routing.whole is not None:
            return self.module_for(routing.whole)(x)
        parts = [(rows, self.module_for(a)(x.index_select(0, rows))) for a, rows in routing.groups]
        out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))  # [B, ...] as each module returns
        for rows, y in parts:
            out.index_copy_(0, rows, y)
        return out


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules an adapter method swapped in (ADAPTER_LAYERS), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}


def attach_routers(base: nn.Module, adapted_models: list[nn.Module]) -> Routing:
    """Swap every module some adapted model replaced for a Router in `base`; adapter k+1 is adapted_models[k]."""
    routing = Routing()
    by_name: dict[str, dict[int, nn.Module]] = {}
    for k, model in enumerate(adapted_models, 1):
        for name, module in adapted_modules(model).items():
            by_name.setdefault(name, {})[k] = module
    for name, adapted in by_name.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, leaf, Router(getattr(parent, leaf), adapted, routing))
    return routing
