"""Fused-kernel entry points, each with an eager PyTorch definition that is the reference.

    RMSNorm / Attention / MLP ──> ops.rms_norm / ops.rope / ops.swiglu (fused=module.fused_kernels)
                                   ├─ eager PyTorch (CPU tensors, or fused=False)
                                   └─ kernels/*.cu via torch.autograd.Function (CUDA tensors, fused=True)
    LoraLinear (fused=True) ──> ops.lora_linear ── LoRALinearFunction (any device)

The switch is an argument: the modules that call these hold it as an attribute, which train() sets from
TrainConfig (ftcore.train.step.set_fast_paths); a bare model runs the eager references. The kernels
(hand-written CUDA C++, no Triton) are compiled once by torch.utils.cpp_extension on first use into
FTCORE_CACHE/kernels (or ~/.cache/ftcore/kernels). Inputs a kernel does not cover (a dtype mix, a too
wide row) take the eager path, so a switch never changes what can run, only how fast.
"""

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ftcore.errors import FtcoreError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ftcore/
# kernels/ at the repository root in a checkout; an install (wheel or `pip install .`) ships it as ftcore/kernels/
KERNEL_DIRS = (PACKAGE_DIR / "kernels", PACKAGE_DIR.parent / "kernels")
KERNEL_SOURCES = ("ftcore_kernels.cpp", "rms_norm.cu", "rope.cu", "swiglu.cu")  # compiled
KERNEL_FILES = (*KERNEL_SOURCES, "common.cuh")  # and included
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RMS_NORM_DIM = 8 * 1024  # the kernel keeps a row in registers: 8 values x up to 1024 threads


# -- eager references (the definitions the kernels are tested against) --------------------------------


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32, cast back before the scale (as HF Llama does).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_float32_scale(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """(offset + weight) * RMSNorm(x), the scale in float32 and then cast to x's dtype (OLMo 2: offset 0; Gemma: 1)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (offset + weight.float())).to(x.dtype)


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF convention): x [B, H, T, hd], cos/sin [B|1, 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def swiglu_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# -- dispatch ------------------------------------------------------------------------------------------


def _fused(fused: bool, *tensors: torch.Tensor) -> bool:
    return (
        fused
        and all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors)
        and not torch.compiler.is_compiling()
    )


def _float_or_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The kernels take a second operand of the first one's dtype or float32 (trained fp32 norms, cos/sin)."""
    return b.dtype == a.dtype or b.dtype == torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim; x [..., D], weight [D]; output dtype promote(x, weight)."""
    if _fused(fused, x, weight) and _float_or_same(x, weight) and x.shape[-1] <= MAX_RMS_NORM_DIM:
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_eager(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, hd] (any strides) with cos/sin [B|1, 1, T, hd] (no gradient)."""
    ok = cos.dim() == 4 and cos.shape[1] == 1 and cos.shape[0] in (1, x.shape[0]) and cos.shape[2:] == x.shape[2:]
    if ok and _fused(fused, x, cos, sin) and _float_or_same(x, cos) and sin.dtype == cos.dtype and not cos.requires_grad:
        return RoPEFunction.apply(x, cos, sin)
    return rope_eager(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate, up [..., I] of one dtype."""
    if _fused(fused, gate, up) and gate.dtype == up.dtype and gate.shape == up.shape:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_eager(gate, up)


# -- autograd Functions over the kernels ---------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [N, D]
        y, rstd = kernels().rms_norm_fwd(x2, weight.contiguous(), eps)  # y [N, D], rstd [N] float32
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw_partial = kernels().rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight.contiguous(), rstd)
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None  # [blocks, D] -> [D]
        return dx.view(ctx.x_shape), dw, None


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos3, sin3 = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [B|1, T, hd]
        x = x if x.stride(-1) == 1 else x.contiguous()
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        kernels().rope(x, cos3, sin3, False, out)
        ctx.save_for_backward(cos3, sin3)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        cos3, sin3 = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = torch.empty(dy.shape, dtype=ctx.x_dtype, device=dy.device)
        kernels().rope(dy, cos3, sin3, True, dx)  # the transposed rotation
        return dx, None, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)  # silu(gate) is recomputed in backward: one activation less kept
        return kernels().swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = kernels().swiglu_bwd(dy.contiguous(), gate, up)
        return dgate, dup


# -- LoRA: y = x W^T + b + s * dropout(x) A^T B^T in one autograd node ------------------------------------


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout: float) -> torch.Tensor:
    """A LoRA layer's output [..., out] from x [..., in], W [out, in], A [r, in], B [out, r].

    Same math as LoraLinear's eager forward; what it saves over it:
    - the output is one buffer: `y.addmm_(h, B^T, alpha=s)` adds the low-rank term in place, where eager
      makes the [N, out] product, its scaled copy, a dtype copy and the sum;
    - for backward it keeps x itself (shared by q/k/v, and by gate/up, which read the same x) and a 1-byte
      dropout mask, where eager keeps a float32 (or dropped-out) copy of x in every adapted layer;
    - backward adds the adapter's input gradient into the base's with one addmm.
    Under autocast both matmuls run in the autocast dtype, as eager's do. `dropout` is the probability
    (0 = none); the mask is drawn here from the default generator.
    """
    if torch.is_autocast_enabled(x.device.type):
        base_dtype = lora_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        base_dtype, lora_dtype = x.dtype, lora_a.dtype
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    mask = None
    if dropout > 0:
        mask = torch.empty(x2.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - dropout)  # [N, in]
    y = LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, scaling, mask, 1 - dropout, base_dtype, lora_dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


class LoRALinearFunction(torch.autograd.Function):
    """Forward and backward of a LoRA layer with a frozen W; see lora_linear. x [N, in], mask [N, in] bool or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, mask, keep, base_dtype, lora_dtype):
        with torch.autocast(x.device.type, enabled=False):
            xb = x.to(base_dtype)  # x itself unless autocast casts it
            y = F.linear(xb, weight.to(base_dtype), None if bias is None else bias.to(base_dtype))
            xl = _masked(xb if lora_dtype == base_dtype else x.to(lora_dtype), mask)  # [N, in], not kept
            h = xl @ a.to(lora_dtype).t()  # [N, r]
            if mask is not None:
                h.div_(keep)  # inverted dropout's 1/keep, applied on [N, r] rather than [N, in]
            bt = b.to(lora_dtype).t()  # [r, out]
            if y.dtype == lora_dtype:
                y.addmm_(h, bt, alpha=scaling)  # [N, out] += s h B^T
            else:  # bf16 base, float32 adapter: round the adapter term once, as eager does
                y += torch.mm(h, bt).mul_(scaling).to(y.dtype)
        ctx.save_for_backward(x, weight, a, b, h, mask)
        ctx.scaling, ctx.keep, ctx.base_dtype, ctx.lora_dtype = scaling, keep, base_dtype, lora_dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy [N, out]
        x, weight, a, b, h, mask = ctx.saved_tensors
        s, lora_dtype = ctx.scaling, ctx.lora_dtype
        dyl = dy.to(lora_dtype)
        al = a.to(lora_dtype)
        g = (dyl @ b.to(lora_dtype)).mul_(s if mask is None else s / ctx.keep)  # [N, r] = s dy B (/ keep)
        dx = da = db = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dy.to(ctx.base_dtype) @ weight.to(ctx.base_dtype)  # [N, in]
            if mask is None and dx.dtype == lora_dtype:
                dx.addmm_(g, al)  # += s dy B A
            elif mask is None:
                dx += (g @ al).to(dx.dtype)
            else:
                dx += _masked(g @ al, mask).to(dx.dtype)  # += s dy B A * mask / keep
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[3]:
            da = (g.t() @ _masked(x.to(lora_dtype), mask)).to(a.dtype)  # [r, in] = s B^T dy^T (x * mask / keep)
        if ctx.needs_input_grad[4]:
            db = (dyl.t() @ h).mul_(s).to(b.dtype)  # [out, r]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0)
        return dx, None, dbias, da, db, None, None, None, None, None


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x * mask, or x itself when there is no mask (the callers fold dropout's 1/keep into [N, r] factors)."""
    return x if mask is None else torch.where(mask, x, 0.0)  # where: no float copy of the bool mask on CPU


# -- build ---------------------------------------------------------------------------------------------


def kernel_dir() -> Path:
    """Where the CUDA C++ sources are: the installed package's copy, else the checkout's kernels/."""
    for d in KERNEL_DIRS:
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    raise FtcoreError(f"the kernel sources ({', '.join(KERNEL_FILES)}) are in none of {', '.join(map(str, KERNEL_DIRS))}")


def build_dir() -> Path:
    root = Path(os.environ.get("FTCORE_CACHE", Path.home() / ".cache" / "ftcore"))
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return root / "kernels" / tag


@functools.cache
def kernels():
    """The compiled extension (built on first use, then loaded from the cache; rebuilt when a source changes)."""
    if not torch.cuda.is_available():
        raise FtcoreError("fused kernels need a CUDA device; set train.fused_kernels=false")
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return load(
            name="ftcore_kernels",
            sources=[str(kernel_dir() / s) for s in KERNEL_SOURCES],
            build_directory=str(out),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],  # no fast math: fp32 parity within 1e-5
            verbose=os.environ.get("FTCORE_VERBOSE_BUILD") == "1",
        )
    except (RuntimeError, OSError, ImportError) as e:  # compiler output is pages long: one line, and a hint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtcoreError(
            f"building kernels/ failed ({first}); FTCORE_VERBOSE_BUILD=1 shows the compiler output, "
            f"train.fused_kernels=false runs without them"
        ) from None
