"""ops.lora_linear (train.fused_lora) against LoraLinear's eager forward: values, gradients, dropout, memory."""

import pytest
import torch
from torch import nn

from ftcore import peft
from ftcore.model import ModelConfig, Transformer
from ftcore.peft.lora import LoraLinear
from ftcore.train.step import set_fast_paths

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lora_layer(dtype=torch.float32, bias=False, rslora=False, dropout=0.0, seed=0) -> LoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 20, bias=bias).to(dtype).requires_grad_(False)
    layer = LoraLinear(base, r=4, alpha=8, dropout=dropout, use_rslora=rslora)
    layer.reset_parameters()
    nn.init.normal_(layer.lora_B.weight, std=0.5)  # a non-zero adapter, so every gradient is non-trivial
    if bias:
        layer.bias.requires_grad_(True)
    return layer


def run(layer, x, fused: bool, autocast: bool = False, seed: int = 0):
    """Output and the gradients of x, A, B (and the bias when trained) for a fixed upstream gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout mask
    layer.fused = fused
    with torch.autocast(x.device.type, enabled=autocast):
        y = layer(x)
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)
    (y.float() * dy).sum().backward()
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    if layer.bias is not None and layer.bias.requires_grad:
        grads.append(layer.bias.grad)
    return y, grads


def assert_all_close(got, want, tol):
    (y, gs), (y_ref, gs_ref) = got, want
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    for a, b in zip([y, *gs], [y_ref, *gs_ref], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_eager_fp32(bias, rslora):
    layer = lora_layer(bias=bias, rslora=rslora)
    x = torch.randn(3, 7, 24)
    fused = run(layer, x, True)
    assert type(fused[0].grad_fn).__name__ == "ViewBackward0"  # the fused node sits under the reshape
    assert_all_close(fused, run(layer, x, False), 1e-6)


def test_bf16_base_and_autocast_within_bf16_rounding():
    x = torch.randn(2, 5, 24)
    layer = lora_layer(dtype=torch.bfloat16)
    assert_all_close(run(layer, x.bfloat16(), True), run(layer, x.bfloat16(), False), 1e-2)  # fp32 adapter term
    layer = lora_layer(bias=True)
    got, want = run(layer, x, True, autocast=True), run(layer, x, False, autocast=True)
    assert got[0].dtype == torch.bfloat16
    assert_all_close(got, want, 1e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])])
def test_dropout_applies_the_drawn_mask(device):
    layer = lora_layer(dropout=0.3, bias=True).to(device)
    x = torch.randn(4, 6, 24, device=device)
    y, grads = run(layer, x, True, seed=5)
    torch.manual_seed(5)  # lora_linear draws the mask first, from the default generator
    mask = torch.empty(4 * 6, 24, dtype=torch.bool, device=device).bernoulli_(0.7).view(4, 6, 24)
    assert 0.5 < mask.float().mean() < 0.9

    class Masked(nn.Module):  # eager dropout with this mask
        def forward(self, t):
            return t * mask / 0.7

    layer.lora_dropout = Masked()
    assert_all_close((y, grads), run(layer, x, False), 1e-6)
    layer.lora_dropout = nn.Dropout(0.3)
    layer.eval()  # no dropout in eval: fused equals eager with the identity
    assert_all_close(run(layer, x, True), run(layer, x, False), 1e-6)


@needs_cuda
@pytest.mark.cuda
def test_cuda_bf16_matches_eager(monkeypatch, device="cuda"):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 compared at 1e-5
    x = torch.randn(8, 128, 256, device=device)
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True), (torch.float32, False)):
        torch.manual_seed(0)
        base = nn.Linear(256, 512, bias=True, device=device).to(dtype).requires_grad_(False)
        layer = LoraLinear(base, r=16, alpha=32)
        layer.reset_parameters()
        nn.init.normal_(layer.lora_B.weight, std=0.1)
        xin = x.to(dtype)
        tol = 1e-5 if dtype == torch.float32 and not autocast else 1e-2
        assert_all_close(run(layer, xin, True, autocast), run(layer, xin, False, autocast), tol)


def test_mask_is_seeded():
    layer = lora_layer(dropout=0.5)
    x = torch.randn(2, 3, 24)
    a, b, c = run(layer, x, True, seed=1), run(layer, x, True, seed=1), run(layer, x, True, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_dora_merged_and_trained_weight_stay_eager():
    torch.manual_seed(0)
    dora = LoraLinear(nn.Linear(8, 6).requires_grad_(False), r=2, alpha=4, dora=True)
    dora.reset_parameters()
    merged = lora_layer()
    merged.merge()
    trained = lora_layer()
    trained.weight.requires_grad_(True)
    x = torch.randn(2, 8)
    for layer, inp in ((dora, x), (merged, torch.randn(2, 24)), (trained, torch.randn(2, 24))):
        layer.fused = True
        assert type(layer(inp).grad_fn).__name__ != "ViewBackward0"


def tiny_lora_model(dtype, dropout) -> Transformer:
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    peft.apply(model, peft.PeftConfig(method="lora", r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as train() keeps trainable state
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def test_model_loss_and_gradients_equal_eager():
    model = tiny_lora_model(torch.float32, 0.0)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        set_fast_paths(model, fused_kernels=False, loss_chunk_size=0, fused_lora=fused)
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref), (loss, got) = results
    assert len(ref) == 2 * 7 * 2 and ref.keys() == got.keys()  # A and B of 7 linears in 2 layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def saved_bytes(model, ids, fused: bool) -> int:
    """Bytes autograd keeps for backward over one forward (storages counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    set_fast_paths(model, fused_kernels=False, loss_chunk_size=0, fused_lora=fused)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(storages.values())


def test_keeps_less_for_backward_on_a_bf16_base():
    """Eager keeps a float32 (dropped-out) copy of x per adapted layer; fused keeps x once plus 1-byte masks."""
    model = tiny_lora_model(torch.bfloat16, 0.1)
    ids = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(3))
    eager, fused = saved_bytes(model, ids, False), saved_bytes(model, ids, True)
    assert fused < 0.6 * eager, (fused, eager)
