"""ops.py: eager fallbacks on CPU, the switches on the modules, and (on a GPU) each kernel against its fallback."""

import pytest
import torch

from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer, ops
from ftcore.model.decoder import rope_cos_sin, rope_inv_freq

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def test_cpu_runs_eager_even_when_switched_on():
    x, w = torch.randn(3, 5, 8, requires_grad=True), torch.randn(8)
    y = ops.rms_norm(x, w, 1e-5, fused=True)
    s = ops.swiglu(x, x * 2, fused=True)
    assert torch.equal(y, ops.rms_norm_eager(x, w, 1e-5)) and "RMSNormFunction" not in type(y.grad_fn).__name__
    assert torch.equal(s, ops.swiglu_eager(x, x * 2))


def test_switches_live_on_the_modules():
    """A new model runs the eager references; set_fast_paths reaches every module that calls a fused op."""
    cfg = ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2, num_kv_heads=1)
    model = Transformer(cfg)
    switched = [m for m in model.modules() if hasattr(m, "fused_kernels")]
    assert len(switched) == 4 * cfg.num_layers + 1  # 2 norms, attention (RoPE) and MLP per block; the final norm
    assert model.loss_chunk_size == 0 and not any(m.fused_kernels for m in switched)
    model.set_fast_paths(fused_kernels=True, loss_chunk_size=7)
    assert model.loss_chunk_size == 7 and all(m.fused_kernels for m in switched)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_kernels_need_cuda():
    with pytest.raises(FtcoreError, match="fused kernels need a CUDA device; set train.fused_kernels=false"):
        ops.kernels()


def test_kernel_sources_present():
    for name in ops.KERNEL_FILES:
        assert (ops.kernel_dir() / name).is_file(), name


# -- GPU: kernels against the eager fallbacks (forward and gradients) ---------------------------------


def assert_close(got, want, dtype, what):
    tol = TOL[dtype]
    scale = want.float().abs().max().item() or 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale, msg=what)
    assert got.dtype == want.dtype and got.shape == want.shape, what


def fused_and_eager(fn, inputs: list, grad_seed: int = 0):
    """(output, input grads) with kernels on and off, for the same inputs and upstream gradient."""
    results = []
    for fused in (True, False):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*xs, fused=fused)
        if fused:
            assert "Function" in type(out.grad_fn).__name__, "the kernel path was not taken"
        g = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(grad_seed), device=out.device)
        out.backward(g.to(out.dtype))
        results.append((out.detach(), [t.grad for t in xs if t.requires_grad]))
    return results


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])  # fmt: skip
@pytest.mark.parametrize("shape", [(4, 7, 64), (3, 576), (2, 5, 2048), (1, 4100)])
def test_rms_norm_kernel(x_dtype, w_dtype, shape):
    x = torch.randn(shape, device="cuda").to(x_dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(w_dtype).requires_grad_()
    (y, grads), (y_ref, grads_ref) = fused_and_eager(lambda a, b, fused: ops.rms_norm(a, b, 1e-5, fused), [x, w])
    assert_close(y, y_ref, x_dtype, "y")
    for name, a, b in zip(("dx", "dw"), grads, grads_ref):
        assert_close(a, b, x_dtype, name)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype, cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])  # fmt: skip
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_kernel(x_dtype, cos_dtype, cos_batch):
    B, H, T, hd = 2, 3, 11, 64
    cfg = ModelConfig(vocab_size=8, hidden_size=H * hd, intermediate_size=8, num_layers=1, num_heads=H, num_kv_heads=H)
    pos = torch.arange(T, device="cuda")[None].expand(cos_batch, T) + torch.arange(cos_batch, device="cuda")[:, None]
    cos, sin = rope_cos_sin(rope_inv_freq(cfg).cuda(), pos, cos_dtype)
    # q as the model makes it: a transposed view of the projection [B, T, H * hd]
    x = torch.randn(B, T, H * hd, device="cuda").to(x_dtype).view(B, T, H, hd).transpose(1, 2).requires_grad_()
    assert not x.is_contiguous()
    (y, (dx,)), (y_ref, (dx_ref,)) = fused_and_eager(lambda a, fused: ops.rope(a, cos, sin, fused), [x])
    assert_close(y, y_ref, x_dtype, "y")
    assert_close(dx, dx_ref, x_dtype, "dx")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_kernel(dtype):
    g = (3 * torch.randn(5, 13, 96, device="cuda")).to(dtype).requires_grad_()
    u = torch.randn(5, 13, 96, device="cuda").to(dtype).requires_grad_()
    (y, grads), (y_ref, grads_ref) = fused_and_eager(ops.swiglu, [g, u])
    assert_close(y, y_ref, dtype, "y")
    for name, a, b in zip(("dgate", "dup"), grads, grads_ref):
        assert_close(a, b, dtype, name)


def phi_layout(rotary_dim: int, fraction: float) -> dict:
    """Phi-3/4's layout through the kernels: fused qkv_proj / gate_up_proj (chunked views), RoPE on a fraction of
    each head, LongRoPE past 8 tokens."""
    factors = dict(short_factor=[1.0] * (rotary_dim // 2), long_factor=[1.0 + i for i in range(rotary_dim // 2)])
    return dict(fused_projections=True, partial_rotary_factor=fraction, max_position_embeddings=64,
                rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 8, **factors})


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [{}, phi_layout(16, 0.5)], ids=["llama", "phi"])
def test_model_with_kernels_matches_eager(dtype, layout):
    cfg = ModelConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      **layout)  # fmt: skip
    model = Transformer(cfg).cuda()
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    tokens = torch.randint(0, 101, (2, 33), device="cuda")
    out = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        model.set_fast_paths(fused_kernels=fused, loss_chunk_size=0)
        logits = model(tokens)
        logits.float().square().mean().backward()
        out[fused] = (logits.detach(), {k: p.grad for k, p in model.named_parameters()})
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # through two layers
    torch.testing.assert_close(out[True][0].float(), out[False][0].float(), rtol=tol, atol=tol)
    for k, g in out[False][1].items():
        scale = g.float().abs().max().item() or 1.0
        torch.testing.assert_close(out[True][1][k].float(), g.float(), rtol=tol, atol=tol * scale, msg=k)


# -- CPU: the autograd Functions over a PyTorch stand-in for the extension ------------------------------


class FakeKernels:
    """The extension's API in PyTorch, following each kernel's math line by line (float32 math, casts where
    the kernels cast). Checks the Functions' plumbing and the derivations (RMSNorm dx, RoPE's transposed
    rotation, SwiGLU's derivative) against eager autograd without a GPU; the CUDA code itself is
    checked by the cuda-marked tests above."""

    @staticmethod
    def rms_norm_fwd(x, w, eps):
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1) + eps)  # [N]
        n = (xf * r[:, None]).to(x.dtype).float()
        out = torch.promote_types(x.dtype, w.dtype)
        return (w.float() * n).to(out), r

    @staticmethod
    def rms_norm_bwd(dy, x, w, rstd):
        d, r = dy.float(), rstd[:, None]
        xhat = x.float() * r
        g = d * w.float()
        dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        partial = (d * xhat.to(x.dtype).float()).view(2, -1, x.shape[1]).sum(1) if x.shape[0] % 2 == 0 else None
        if partial is None:
            partial = (d * xhat.to(x.dtype).float()).sum(0, keepdim=True)
        return dx.to(x.dtype), partial  # [blocks, D]: two "blocks" when the rows split evenly

    @staticmethod
    def rope(x, cos, sin, backward, out):
        h = x.shape[-1] // 2
        xf, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]  # [B|1, 1, T, hd]
        x1, x2 = xf[..., :h], xf[..., h:]
        c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
        if not backward:
            o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        else:
            o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        out.copy_(torch.cat([o1, o2], dim=-1))

    @staticmethod
    def swiglu_fwd(g, u):
        a = g.float()
        return (a / (1 + torch.exp(-a)) * u.float()).to(g.dtype)

    @staticmethod
    def swiglu_bwd(dy, g, u):
        a, d = g.float(), dy.float()
        sig = 1 / (1 + torch.exp(-a))
        return (d * u.float() * sig * (1 + a * (1 - sig))).to(g.dtype), (d * a * sig).to(g.dtype)


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(ops, "kernels", lambda: FakeKernels)
    monkeypatch.setattr(ops, "_fused", lambda fused, *tensors: fused)  # CPU tensors take the kernel path


def fused_vs_eager_cpu(fn, inputs):
    out = {}
    for fused in (True, False):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        y = fn(*xs, fused=fused)
        assert ("Function" in type(y.grad_fn).__name__) == fused
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        out[fused] = (y.detach(), [t.grad for t in xs if t.requires_grad])
    return out[True], out[False]


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])  # fmt: skip
def test_rms_norm_function_on_cpu(fake_kernels, x_dtype, w_dtype):
    x = torch.randn(2, 3, 40).to(x_dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(40)).to(w_dtype).requires_grad_()
    (y, grads), (y_ref, grads_ref) = fused_vs_eager_cpu(lambda a, b, fused: ops.rms_norm(a, b, 1e-5, fused), [x, w])
    assert_close(y, y_ref, x_dtype, "y")
    for name, a, b in zip(("dx", "dw"), grads, grads_ref):
        assert_close(a, b, x_dtype, name)


@pytest.mark.parametrize("x_dtype, cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_function_on_cpu(fake_kernels, x_dtype, cos_dtype, cos_batch):
    B, H, T, hd = 2, 3, 7, 16
    cfg = ModelConfig(vocab_size=8, hidden_size=H * hd, intermediate_size=8, num_layers=1, num_heads=H, num_kv_heads=H)
    pos = torch.arange(T)[None].expand(cos_batch, T) + torch.arange(cos_batch)[:, None]
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), pos, cos_dtype)
    x = torch.randn(B, T, H * hd).to(x_dtype).view(B, T, H, hd).transpose(1, 2).requires_grad_()
    (y, (dx,)), (y_ref, (dx_ref,)) = fused_vs_eager_cpu(lambda a, fused: ops.rope(a, cos, sin, fused), [x])
    assert_close(y, y_ref, x_dtype, "y")
    assert_close(dx, dx_ref, x_dtype, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_on_cpu(fake_kernels, dtype):
    g, u = (3 * torch.randn(4, 6, 24)).to(dtype).requires_grad_(), torch.randn(4, 6, 24).to(dtype).requires_grad_()
    (y, grads), (y_ref, grads_ref) = fused_vs_eager_cpu(ops.swiglu, [g, u])
    assert_close(y, y_ref, dtype, "y")
    for name, a, b in zip(("dgate", "dup"), grads, grads_ref):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("layout", [{}, phi_layout(12, 0.75)], ids=["llama", "phi"])
def test_model_through_functions_on_cpu(fake_kernels, layout):
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      **layout)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 101, (2, 17))
    out = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        model.set_fast_paths(fused_kernels=fused, loss_chunk_size=0)
        logits = model(tokens)
        logits.square().mean().backward()
        out[fused] = (logits.detach(), {k: p.grad for k, p in model.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for k, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], g, rtol=1e-4, atol=1e-6 * g.abs().max().item(), msg=k)
