"""The whole training step as one CUDA graph: captured once on static shapes, then replayed.

    first call:  batch ─copy─> static inputs ─> warm-up steps on a side stream (lr 0; the optimizer
                 state is put back afterwards, so training starts from where it was) ─> capture:
                   for each micro-batch: forward, loss x 1/tokens, backward (grads accumulate)
                   clip the gradient norm · AdamW (capturable, lr read from a device tensor)
    every call:  batch ─copy─> static inputs · lr ─> device tensor · replay · read loss, grad norm
    new shapes:  returns None; the loop runs that step eagerly (the graph stays for the next one)

Fixed shapes come from data.packing (rows of seq_len) or data.static_shape. Inside the graph the loss
runs over every position with the ignored ones masked (ftcore.model.loss.static_batch_loss_sum): selecting
target positions would need a host sync. Replaying saves the CPU launch overhead of hundreds of small
kernels per step, which is what limits small models on fast GPUs.
"""

from contextlib import nullcontext

import torch

from ftcore.dtypes import AUTOCAST
from ftcore.errors import FtcoreError
from ftcore.model.loss import static_batch_loss_sum

WARMUP_STEPS = 2  # eager steps on a side stream before capture (lazy state, cuBLAS workspaces)


def check_config(cfg, device: torch.device):
    """Raise one clear line when train.cuda_graph cannot work with this run's other settings."""
    if not cfg.train.cuda_graph:
        return
    why = None
    if not (cfg.data.packing or cfg.data.static_shape):
        why = "it needs fixed batch shapes: set data.packing=true or data.static_shape=true"
    elif device.type != "cuda":
        why = f"it needs a CUDA device (the run is on {device.type})"
    elif cfg.train.precision == "fp16":
        why = "train.precision=fp16's GradScaler reads the inf check on the host; use bf16 or fp32"
    elif cfg.train.on_nonfinite != "stop":
        why = "train.on_nonfinite=skip cannot undo a replayed step; use train.on_nonfinite=stop"
    elif cfg.dist.backend != "single":
        why = "it runs with dist=single only"
    elif cfg.train.gradient_checkpointing:
        why = "capturing activation checkpointing is not supported; set train.gradient_checkpointing=false"
    if why:
        raise FtcoreError(f"train.cuda_graph: {why}")


class GraphedStep:
    """step(micro, step_tokens) -> (loss sum, grad norm), or None for shapes other than the captured ones.

    Owns the step: forward, backward, clipping and optimizer.step() (the caller neither zeroes
    gradients nor steps). The optimizer is switched to capturable with device-tensor learning rates;
    set_lr's floats are copied into those tensors before each replay. capture=False runs the same
    static step eagerly instead of replaying (for tests of the step logic on CPU).
    """

    def __init__(self, model, optimizer, precision: str = "fp32", grad_clip: float = 1.0, capture: bool = True):
        self.model, self.optimizer, self.grad_clip, self.capture = model, optimizer, grad_clip, capture
        dtype = AUTOCAST.get(precision)
        device = next(p.device for p in model.parameters() if p.requires_grad)
        self.autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype else nullcontext()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lrs = None
        if capture:
            self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]
            for g, lr in zip(optimizer.param_groups, self.lrs):
                g["capturable"], g["lr"] = True, lr
        self.inv_tokens = torch.zeros((), device=device)
        self.static, self.shapes, self.graph = None, None, None
        self.loss_sum = self.grad_norm = None

    def __call__(self, micro: list[dict], step_tokens: int):
        shapes = signature(micro)
        if self.shapes is not None and shapes != self.shapes:
            return None
        self.set_lr()
        if self.static is None:
            self.shapes = shapes
            self.static = [{k: v.to(self.inv_tokens.device).clone() for k, v in b.items()} for b in micro]
            if self.capture:
                self.record()
        for dst, src in zip(self.static, micro):
            for k, v in src.items():
                dst[k].copy_(v, non_blocking=True)
        self.inv_tokens.fill_(1.0 / step_tokens)
        if self.capture:
            self.graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.step()
        return self.loss_sum.item(), self.grad_norm.item()

    def set_lr(self):
        """The loop's set_lr() writes floats into the groups; the graph reads these device tensors."""
        if self.lrs is None:
            return
        for g, lr in zip(self.optimizer.param_groups, self.lrs):
            if g["lr"] is not lr:
                lr.fill_(float(g["lr"]))
                g["lr"] = lr

    def step(self):
        """The static step: what the graph records (and what capture=False runs)."""
        total = torch.zeros((), device=self.inv_tokens.device)
        for batch in self.static:
            with self.autocast:
                loss_sum, _ = static_batch_loss_sum(self.model, batch)
            (loss_sum * self.inv_tokens).backward()
            total = total + loss_sum.detach().float()
        params = [p for p in self.params if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self.optimizer.step()
        self.loss_sum, self.grad_norm = total, norm

    def record(self):
        """Warm up on a side stream with lr 0, restore the optimizer state, then capture self.step()."""
        saved = [lr.clone() for lr in self.lrs]
        before = {p: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        for lr in self.lrs:
            lr.zero_()  # AdamW with lr 0 leaves every parameter as it is; only its state moves
        self.inv_tokens.fill_(1.0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, state in self.optimizer.state.items():
                for k, v in state.items():
                    if p in before:
                        v.copy_(before[p][k])
                    else:
                        v.zero_()  # a fresh AdamW state (step, moments) is all zeros
            for lr, value in zip(self.lrs, saved):
                lr.copy_(value)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()


def signature(micro: list[dict]) -> tuple:
    return tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(b.items())) for b in micro)
