"""The chunked linear cross-entropy equals the plain lm_head + cross-entropy: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from ftcore import peft
from ftcore.data.collate import collate
from ftcore.data.format import IGNORE
from ftcore.model import ModelConfig, Transformer
from ftcore.model.loss import batch_loss_sum, chunkable, linear_cross_entropy, softcap

pytestmark = pytest.mark.usefixtures("one_thread")


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="sum")


def grads(fn, hidden, weight, targets):
    h = hidden.detach().clone().requires_grad_(hidden.requires_grad)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = fn(h, w, targets)
    (2.5 * loss).backward()  # a non-unit upstream gradient reaches both inputs
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_plain_fp32(chunk, train_weight):
    N, D, V = 37, 16, 101
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D).requires_grad_(train_weight)
    targets = torch.randint(0, V, (N,))
    targets[::5] = IGNORE
    ref = grads(plain, hidden, weight, targets)
    got = grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk), hidden, weight, targets)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1] is not None
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    else:
        assert got[2] is None


@pytest.mark.parametrize("chunk", [7, 1000])
def test_soft_capped_logits_match_plain_fp32(chunk):
    """Gemma 2's final soft-cap (cap * tanh(logits / cap)) inside the chunked loss: loss and both gradients equal
    autograd through the capped plain path; the cap (2.0, well under the logits' range) binds."""
    N, D, V, cap = 37, 16, 101, 2.0
    hidden, weight = torch.randn(N, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::5] = IGNORE

    def capped(h, w, t):
        return F.cross_entropy(softcap(F.linear(h, w), cap).float(), t, ignore_index=IGNORE, reduction="sum")

    ref = grads(capped, hidden, weight, targets)
    got = grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk, cap), hidden, weight, targets)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert (ref[0] - plain(hidden, weight, targets)).abs() > 1.0  # the cap changes the loss


def test_no_grad_and_all_ignored():
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (10,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 3), plain(hidden, weight, targets))
    none = torch.full((10,), IGNORE)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, none, 4)
    loss.backward()
    assert loss.item() == 0 and not h.grad.any()


def test_bf16_autocast_close_to_plain():
    N, D, V = 64, 32, 211
    hidden, weight = torch.randn(N, D, requires_grad=True), torch.randn(V, D) * 0.2
    weight.requires_grad_()
    targets = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(plain, hidden, weight, targets)
        got = grads(lambda h, w, t: linear_cross_entropy(h, w, t, 16), hidden, weight, targets)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # the inputs' dtypes
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


def tiny_model(tie: bool) -> Transformer:
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=tie)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    return model


def packed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    docs = []
    for n in (5, 9, 3, 12, 7, 4):
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2 :]})
    return collate([docs[:3], docs[3:]], pad_id=0, length=24, packed=True)


def model_grads(model, batch, select_targets=True):
    model.zero_grad(set_to_none=True)
    loss, n = batch_loss_sum(model, batch, "cpu", select_targets)  # the loss inside the model's forward
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full_tied", "full_untied", "lora", "lora_head"])
def test_batch_loss_sum_chunked_equals_plain(method):
    model = tiny_model(tie=method == "full_tied")
    if method.startswith("lora"):
        targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if method == "lora_head" else [])
        peft.apply(model, peft.PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, target_modules=targets))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter, so its gradients are not trivial
    assert chunkable(model.lm_head) == (method != "lora_head")
    batch = packed_batch()
    model.loss_chunk_size = 0
    ref_loss, ref = model_grads(model, batch)
    model.loss_chunk_size = 5
    loss, got = model_grads(model, batch)
    static_loss, static = model_grads(model, batch, select_targets=False)  # every position, ignored ones masked
    assert ref.keys() == got.keys() == static.keys() and ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(static[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
