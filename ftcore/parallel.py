"""How the model runs across devices and memory: activation checkpointing (FSDP2/DDP come later here)."""

import torch.utils.checkpoint
from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them.

    The block's forward is wrapped in place (no wrapper module), so parameter names, state dicts
    and adapter keys are unchanged. Non-reentrant checkpointing restores the RNG (dropout) state.
    """
    for block in model.layers:
        if getattr(block, "_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._checkpointed = True
    return model
