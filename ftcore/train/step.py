"""One training step, in two forms with one call: step(micro, step_tokens) -> (loss sum, grad norm).

Both run the global batch's micro-batches (forward with the loss inside the model, backward), clip the
gradient norm, step the optimizer and zero the gradients. The loss of a micro-batch is scaled by
1/step_tokens (x world size, since DDP and FSDP2 average gradients over ranks), so the gradients are
those of the token-weighted mean over the whole step, however it is split into micro-batches and ranks.

EagerStep: the reference, on any device, with an optional fp16 GradScaler; a non-finite loss leaves the
parameters untouched and raises NonFiniteLoss.

GraphedStep: the same step captured once as a CUDA graph and replayed (train.cuda_graph):

    first call:  batch ─copy─> static inputs ─> warm-up steps on a side stream (lr 0; the optimizer
                 state is put back afterwards, so training starts from where it was) ─> capture:
                   for each micro-batch: forward, loss x 1/tokens, backward (grads accumulate)
                   clip the gradient norm · AdamW (capturable, lr read from a device tensor)
    every call:  batch ─copy─> static inputs · lr ─> device tensor · replay · read loss, grad norm
    new shapes:  that step runs eagerly (the graph stays for the next one)

Fixed shapes come from data.packing (rows of seq_len) or data.static_shape. Inside the graph the loss
runs over every position with the ignored ones masked (select_targets=False): selecting target positions
would need a host sync. Replaying saves the CPU launch overhead of hundreds of small kernels per step,
which is what limits small models on fast GPUs.
"""

import math
from contextlib import nullcontext

import torch
from torch import nn

from ftcore.dtypes import AUTOCAST
from ftcore.errors import NonFiniteLoss
from ftcore.model.loss import batch_loss_sum
from ftcore.peft.lora import LoraLinear
from ftcore.train.parallel import World, grad_sync

WARMUP_STEPS = 2  # eager steps on a side stream before capture (lazy state, cuBLAS workspaces)


def set_fast_paths(model: nn.Module, fused_kernels: bool, loss_chunk_size: int, fused_lora: bool):
    """TrainConfig's speed switches, set on the modules that use them (same results up to rounding)."""
    model.set_fast_paths(fused_kernels=fused_kernels, loss_chunk_size=loss_chunk_size)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.fused = fused_lora


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    """The autocast context of train.precision (fp32: none)."""
    if precision not in AUTOCAST:
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[precision], cache_enabled=cache_enabled)


def saved_on_host():
    """Activation offloading: the tensors autograd saves for backward, in pinned host memory until backward
    (copied back then); parameters (also FSDP2's gathered ones) stay where they are: they are not activations."""

    def pack(t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.device.type == "cpu":
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return t.device, host

    def unpack(saved):
        return saved if isinstance(saved, torch.Tensor) else saved[1].to(saved[0], non_blocking=True)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to the global grad norm (over every rank's shards under FSDP2); the norm before clipping, on device."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): reduce the partial norms of the shards
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class EagerStep:
    """The step as plain PyTorch: forward and backward per micro-batch, then clip, (unscale,) step, zero."""

    def __init__(self, model: nn.Module, optimizer, world: World, precision: str = "fp32", grad_clip: float = 1.0,
                 train_model: nn.Module | None = None, method=None, activation_offload: bool = False):  # fmt: skip
        """model: the (possibly FSDP2-sharded) Transformer; train_model: what forward runs on (DDP's wrapper);
        method: what a PEFT method adds to the step (AdaLoRA's AdaLoraStep: regularizer() joins the loss of
        the last micro-batch once per step, after_step() runs after the update, before the gradients go; COFT's
        OftStep projects the FSDP2 shards after the update). activation_offload (CUDA): the activations autograd
        saves for backward go to pinned host memory in forward and come back in backward (saved_on_host)."""
        self.model, self.train_model, self.method = model, train_model or model, method
        self.optimizer, self.world, self.grad_clip = optimizer, world, grad_clip
        self.device = world.device
        self.offload = activation_offload and self.device.type == "cuda"
        self.autocast = autocast(self.device, precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def __call__(self, micro: list[dict], step_tokens: int) -> tuple[float, float]:
        total = 0.0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with grad_sync(self.train_model, last):
                with self.autocast, saved_on_host() if self.offload else nullcontext():
                    loss_sum, _ = batch_loss_sum(self.train_model, batch, self.device)
                loss = loss_sum / step_tokens * self.world.size
                extra = self.method.regularizer() if self.method is not None and last else None
                # the same on every rank, so the ranks' average gradient is its own (no x world size)
                self.scaler.scale(loss if extra is None else loss + extra).backward()
            total += loss_sum.item()
        total = self.world.sum(total)
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(total / step_tokens)
        self.scaler.unscale_(self.optimizer)
        norm = clip_gradients([p for p in self.model.parameters() if p.grad is not None], self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.method is not None:
            self.method.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm.item()


class GraphedStep:
    """The step captured as a CUDA graph on the first call's shapes; other shapes run `fallback` (an EagerStep).

    The optimizer is switched to capturable with device-tensor learning rates; set_lr's floats are copied
    into those tensors before each replay. A non-finite loss raises NonFiniteLoss after the replayed update
    (train.on_nonfinite=stop is required). capture=False runs the same static step eagerly instead of
    replaying (for tests of the step logic on CPU).
    """

    def __init__(self, model, optimizer, fallback: EagerStep, precision: str = "fp32", grad_clip: float = 1.0,
                 capture: bool = True):  # fmt: skip
        self.model, self.optimizer, self.grad_clip, self.capture = model, optimizer, grad_clip, capture
        self.fallback = fallback
        device = next(p.device for p in model.parameters() if p.requires_grad)
        self.autocast = autocast(device, precision, cache_enabled=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lrs = None
        if capture:
            self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]
            for g, lr in zip(optimizer.param_groups, self.lrs):
                g["capturable"], g["lr"] = True, lr
        self.inv_tokens = torch.zeros((), device=device)
        self.static, self.shapes, self.graph = None, None, None
        self.loss_sum = self.grad_norm = None

    def __call__(self, micro: list[dict], step_tokens: int) -> tuple[float, float]:
        shapes = signature(micro)
        if self.shapes is not None and shapes != self.shapes:
            return self.fallback(micro, step_tokens)
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
        total = self.loss_sum.item()
        if not math.isfinite(total):
            raise NonFiniteLoss(total / step_tokens)
        return total, self.grad_norm.item()

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
                loss_sum, _ = batch_loss_sum(self.model, batch, self.inv_tokens.device, select_targets=False)
            (loss_sum * self.inv_tokens).backward()
            total = total + loss_sum.detach().float()
        norm = clip_gradients([p for p in self.params if p.grad is not None], self.grad_clip)
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
