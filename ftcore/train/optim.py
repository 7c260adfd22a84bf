"""AdamW over trainable parameters (no decay on norms, biases and 1-d tensors; or LoRA+'s groups) and lr schedules.

Schedules are pure functions of the step, so a resumed run needs only the step to continue.

    lr
    ^     ____
    |    /    `--.__                cosine / linear decay to floor = lr * min_lr_ratio
    |   /           `--.___
    |  /                   `---- floor
    +--|warmup|--------------------> step
"""

import math

import torch

from ftcore.config import OptimConfig
from ftcore.errors import FtcoreError


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(1, max_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)  # 0 at the end of warmup, 1 at the last step
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (norms, biases, vectors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    if not decay and not no_decay:
        raise FtcoreError("the model has no trainable parameters (check peft.method and freeze patterns)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def loraplus_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """PEFT's create_loraplus_optimizer groups, in its order: A (lr), the embedding's A and B
    (loraplus_lr_embedding), B and 1-d tensors (lr * ratio; decayed), B without decay (biases; lr * ratio).
    lr_scale is each group's lr / lr."""
    a, embedding, b, b_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_embedding_" in name:  # LoraEmbedding's lora_embedding_A / _B
            embedding.append(p)
        elif "lora_B" in name or p.ndim == 1:
            (b_no_decay if "bias" in name else b).append(p)
        else:
            a.append(p)
    if not any("lora_B" in n or "lora_embedding_B" in n for n, p in model.named_parameters() if p.requires_grad):
        raise FtcoreError(f"optim.loraplus_lr_ratio={cfg.loraplus_lr_ratio}: LoRA+ needs a LoRA adapter "
                          "(peft.method=lora or dora)")  # fmt: skip
    ratio, wd = cfg.loraplus_lr_ratio, cfg.weight_decay
    return [
        {"params": a, "weight_decay": wd, "lr_scale": 1.0},
        {"params": embedding, "weight_decay": wd, "lr_scale": cfg.loraplus_lr_embedding / cfg.lr},
        {"params": b, "weight_decay": wd, "lr_scale": ratio},
        {"params": b_no_decay, "weight_decay": 0.0, "lr_scale": ratio},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW, fused on CUDA when all parameters are on one, foreach otherwise; LoRA+ groups if asked."""
    groups = loraplus_groups(model, cfg) if cfg.loraplus_lr_ratio else param_groups(model, cfg.weight_decay)
    for g in groups:
        g["lr"] = cfg.lr * g.setdefault("lr_scale", 1.0)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kind)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    """The schedule's lr for this step, times each group's lr_scale (LoRA+)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
