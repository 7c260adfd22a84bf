"""model.quantize=gguf: torch GGUF decoders against the numpy reference bit for bit, a GGUF-native model against
the dequantize-on-import model (synthetic GGUFs, tied and untied, with LoRA; the real SmolLM2), its memory,
the demo fine-tune on it, and the one-line errors."""

import numpy as np
import pytest
import torch
from peft_refs import SPECS, our_config, randomize_
from test_gguf import (
    F16,
    F32,
    Q4_1,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_0,
    TINY,
    quantize,
    tiny_gguf,  # noqa: F401 (fixture)
    tiny_gguf_tensors,
    tiny_metadata,
    tiny_weights,
    write_gguf,
)

from ftcore import peft
from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.formats import quants
from ftcore.formats.gguf import import_gguf
from ftcore.formats.hf import load_model, load_pretrained
from ftcore.quant import gguf as qgguf
from ftcore.quant.gguf import EmbeddingGGUF, LinearGGUF
from ftcore.quant.linear import QuantSpec
from ftcore.train import train
from ftcore.train.log import read_metrics

GGUF = QuantSpec("gguf", 64, True)  # block size and double_quant are ignored by gguf
K_SCALE = {Q4_K: 1e-4, Q5_K: 5e-5, Q6_K: 2e-5}  # d (and dmin) that keep random K-quant weights ~0.1


def random_blocks(t: int, rows: int, cols: int, rng, scale: float = 1e-2) -> np.ndarray:
    """[rows, row_bytes] uint8 of type t: real values for float types and Q8_0/Q4_x/Q5_x (test_gguf.quantize),
    random bytes with finite float16 scales for the K-quants."""
    if t not in (Q4_K, Q5_K, Q6_K):
        x = rng.normal(0, 0.1, (rows, cols)).astype(np.float32)
        return np.frombuffer(quantize(x, t), np.uint8).reshape(rows, -1).copy()
    size = quants.block_layout(t)[1]
    raw = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
    d = rng.uniform(0.2, 1, (len(raw), 2)).astype(np.float32) * scale
    d = d.astype(np.float16).view(np.uint8)
    if t == Q6_K:
        raw[:, 208:210] = d[:, :2]
    else:
        raw[:, 0:4] = d
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("t", qgguf.KEPT, ids=quants.type_name)
def test_decoder_equals_numpy_bit_for_bit(t, monkeypatch):
    rng = np.random.default_rng(t)
    cols = 512 if t in (Q4_K, Q5_K, Q6_K) else 96
    raw = random_blocks(t, 7, cols, rng, scale=2e-2)
    raw[1, : quants.block_layout(t)[1]] = 0  # an all-zero block (d = 0)
    want = quants.dequantize(raw.ravel(), t, (7, cols))
    got = qgguf.dequantize(torch.from_numpy(raw), t, cols)
    assert got.dtype == torch.float32 and got.shape == (7, cols)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))  # bit for bit, signed zeros too
    monkeypatch.setattr(qgguf, "_CHUNK", cols * 2)  # rows decoded 2 at a time into the output
    assert torch.equal(qgguf.dequantize(torch.from_numpy(raw), t, cols), got)
    bf16 = qgguf.dequantize(torch.from_numpy(raw), t, cols, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, got.to(torch.bfloat16))  # what an import cast gives


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_big_weight_is_multiplied_by_row_blocks(monkeypatch, dtype):
    """LinearGGUF over more than _CHUNK weights (a vocabulary's lm_head) never dequantizes the whole weight; its
    forward and input gradient equal F.linear with the dequantized weight."""
    rng = np.random.default_rng(0)
    layer = LinearGGUF(torch.from_numpy(random_blocks(Q8_0, 50, 64, rng)), Q8_0, 64, dtype)
    monkeypatch.setattr(qgguf, "_CHUNK", 64 * 16)  # 16 rows a block: 4 blocks, the last one short
    whole = []
    monkeypatch.setattr(qgguf.LinearGGUF, "dequantized", lambda *a, **k: whole.append(1))  # must not be called
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    w = qgguf.dequantize(layer.blocks, Q8_0, 64, dtype)
    x2 = x.detach().clone().requires_grad_()
    want = torch.nn.functional.linear(x2, w)
    want.backward(torch.ones_like(want))
    assert not whole and y.shape == (3, 5, 50) and y.dtype == dtype
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, want, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **(tol if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))


def k_quant_gguf(path, tied: bool, seed: int = 0):
    """A tiny llama GGUF whose rows hold 256 weights, so every weight can be a K-quant: Q4_K, Q5_K, Q6_K linears,
    a Q6_K token embedding (and a Q4_K output if untied); F32 and F16 norms."""
    rng = np.random.default_rng(seed)
    h, f, v, hd = 256, 256, TINY["vocab"], 64
    md = tiny_metadata(**{"llama.embedding_length": h, "llama.feed_forward_length": f, "llama.rope.dimension_count": hd,
                          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2})  # fmt: skip
    kv = 2 * hd
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h), "ffn_gate": (f, h),
              "ffn_up": (f, h), "ffn_down": (h, f)}  # fmt: skip
    types = [Q4_K, Q5_K, Q6_K, Q4_K, Q5_K, Q6_K, Q4_K]

    def weight(name, t, shape):
        return (name, t, shape, random_blocks(t, *shape, rng, K_SCALE[t]).tobytes())

    def norm(name, t):
        x = (1 + 0.1 * rng.normal(size=h)).astype(np.float32)
        return (name, t, (h,), quantize(x, t))

    tensors = [weight("token_embd.weight", Q6_K, (v, h))]
    for i in range(2):
        tensors.append(norm(f"blk.{i}.attn_norm.weight", F32))
        tensors += [weight(f"blk.{i}.{g}.weight", t, shapes[g]) for g, t in zip(shapes, types)]
        tensors.append(norm(f"blk.{i}.ffn_norm.weight", F16))
    tensors.append(norm("output_norm.weight", F32))
    if not tied:
        tensors.append(weight("output.weight", Q4_K, (v, h)))
    return write_gguf(path, md, tensors)


@pytest.fixture(params=["legacy-untied", "legacy-tied", "k-untied", "k-tied"])
def synthetic(request, tiny_gguf, tmp_path):  # noqa: F811
    """(gguf path, the imported fp32 model): Q4_0/Q4_1/Q5_x/Q8_0/F16/BF16/F32 weights (test_gguf's tiny GGUF,
    Q8_0 embedding, F16 output) or K-quants."""
    kind, tie = request.param.split("-")
    tied = tie == "tied"
    if kind == "legacy":
        path, _ = tiny_gguf(tied=tied)
    else:
        path = k_quant_gguf(tmp_path / "k.gguf", tied)
    return path, load_model(import_gguf(path, tmp_path / "imported")).eval()


def test_gguf_native_logits_equal_the_imported_model(synthetic, one_thread):
    path, imported = synthetic
    native = load_model(path, quant=GGUF).eval()
    assert isinstance(native.embed_tokens, EmbeddingGGUF) and isinstance(native.lm_head, LinearGGUF)
    assert all(isinstance(native.get_submodule(n), LinearGGUF) for n, m in imported.named_modules()
               if n.startswith("layers.") and isinstance(m, torch.nn.Linear))  # fmt: skip
    if native.cfg.tie_word_embeddings:
        assert native.lm_head.blocks is native.embed_tokens.blocks  # one storage, counted once
    assert all(not p.requires_grad or p.dtype.is_floating_point for p in native.parameters())
    assert peft.count_parameters(native)[1] == peft.count_parameters(imported)[1]
    ids = torch.randint(0, native.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = native(ids), imported(ids)
    assert want.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    w = imported.layers[0].self_attn.q_proj.weight  # the un-permuted Q rows, exactly
    assert torch.equal(native.layers[0].self_attn.q_proj.dequantized(), w)
    assert torch.equal(native.embed_tokens.weight.dequantized(), imported.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(native.embed_tokens(ids), imported.embed_tokens(ids))


def lora(model):
    targets = ["q_proj", "k_proj", "v_proj", "down_proj", "lm_head"]
    peft.apply(model, peft.PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, target_modules=targets, seed=3))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter changes the output and every adapter tensor gets a gradient
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_lora_over_gguf_equals_lora_over_the_import(synthetic, one_thread):
    path, imported = synthetic
    native = load_model(path, quant=GGUF)
    lora(native), lora(imported)
    assert peft.count_parameters(native) == peft.count_parameters(imported)
    ids = torch.randint(0, native.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    targets = ids.roll(-1, dims=1)
    results = []
    for model in (native, imported):
        loss, _ = model(ids, targets=targets)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((model(ids).detach(), loss.detach(), grads))
    (got, got_loss, got_grads), (want, want_loss, want_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    assert sorted(got_grads) == sorted(want_grads) and len(got_grads) == 2 * (4 * 2 + 1)
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


# every adapter spec of the parity tests but the base-rewriting inits, the text init and LoRA on the embedding (refused)
OVER_GGUF = [s for s in SPECS if s not in ("pissa", "olora_rslora", "pissa_dora", "prompt_text", "lora_embed")]


@pytest.mark.parametrize("spec", OVER_GGUF)
def test_every_method_over_gguf_equals_it_over_the_import(tiny_gguf, tmp_path, spec, one_thread):  # noqa: F811
    """Each adapter over the GGUF-native base (tied Q8_0 embedding and head, mixed-type linears) computes what it
    computes over the fp32 import: logits and every adapter gradient."""
    path, _ = tiny_gguf(tied=True)
    native, imported = load_model(path, quant=GGUF), load_model(import_gguf(path, tmp_path / "imported"))
    out = []
    for model in (native, imported):
        peft.apply(model, our_config(spec))
        randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], 0, 0.1)
        logits = model.eval()(torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7)))
        logits.pow(2).mean().backward()
        out.append((logits.detach(), [p.grad for p in peft.adapter_parameters(model)]))
    (logits, grads), (ref_logits, ref_grads) = out
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert len(grads) == len(ref_grads) and all(g is not None for g in grads)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-5 * max(1.0, r.abs().max())


def test_merged_export_of_a_gguf_native_model(synthetic, one_thread):
    """merge_and_unload over a GGUF base: a plain model (nn.Linear / nn.Embedding) equal to the adapted GGUF model and
    to the merged imported model; the tied head's merge unties it, as over a plain base."""
    path, imported = synthetic
    native = lora(load_model(path, quant=GGUF)).eval()
    lora(imported)
    plain, ref = peft.merge_and_unload(native), peft.merge_and_unload(imported)
    assert type(plain.embed_tokens) is torch.nn.Embedding and type(plain.layers[1].mlp.up_proj) is torch.nn.Linear
    ids = torch.randint(0, native.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        # merged W + s B A against W x + s B (A x): float rounding, up to 1.3e-5 on the 256-wide K-quant model
        torch.testing.assert_close(plain(ids), native(ids), rtol=0, atol=5e-5)
        torch.testing.assert_close(plain(ids), ref(ids), rtol=0, atol=1e-5)
    assert plain.state_dict().keys() == ref.state_dict().keys()


def test_export_script_merges_over_the_recorded_gguf_base(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    """scripts/export.py on a run over model.quantize=gguf: the base loads GGUF-native again (only its tokenizer is
    imported) and the merged model equals the adapted one."""
    import json

    from test_peft_export import run_script

    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf(tied=True)
    model = lora(load_model(path, quant=GGUF)).eval()
    model.peft_config.base_model_name_or_path = str(path)
    peft.save_adapter(model, tmp_path / "run" / "final")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"quantize": "gguf"}}))
    export = run_script("export.py", tmp_path / "run" / "final", tmp_path / "merged")
    assert export.returncode == 0 and "dequantized from gguf" in export.stdout, export.stderr
    assert not list((tmp_path / "cache").rglob("model.safetensors"))  # no float32 import on the way
    merged = load_model(tmp_path / "merged").eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=0, atol=5e-5)


def test_adapter_over_gguf_saves_and_loads(tiny_gguf, tmp_path):  # noqa: F811
    """save_adapter / load_adapter over a GGUF-native base (the tied lm_head adapted too): the same outputs."""
    path, _ = tiny_gguf(tied=True)
    model = lora(load_model(path, quant=GGUF)).eval()
    peft.save_adapter(model, tmp_path / "adapter")
    again = peft.load_adapter(load_model(path, quant=GGUF), tmp_path / "adapter").eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
        assert not torch.allclose(again(ids), load_model(path, quant=GGUF)(ids), atol=1e-3)  # the adapter acts


def resident_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()  # a tied one once
    return sum(t.numel() * t.element_size() for t in tensors)


def test_smollm2_gguf_native(smollm2_gguf, smollm2_dir, one_thread):
    native, tok = load_pretrained(smollm2_gguf, quant=GGUF)
    imported = load_model(smollm2_dir)
    assert tok.encode("hello world") == load_pretrained(smollm2_dir)[1].encode("hello world")
    assert native.lm_head.blocks is native.embed_tokens.blocks and native.embed_tokens.ggml_type == Q8_0
    assert {m.ggml_type for m in native.modules() if isinstance(m, LinearGGUF)} == {Q4_1, Q8_0}
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(native.eval()(ids), imported.eval()(ids), rtol=0, atol=1e-5)
    ratio = resident_bytes(native) / resident_bytes(imported)
    assert ratio <= 0.3, ratio  # ~0.18: Q4_1 linears at 0.625 bytes per weight, the Q8_0 table at 1.0625
    assert peft.count_parameters(native)[1] == peft.count_parameters(imported)[1] == 134_515_008


def test_bench_memory_row_for_a_gguf(tiny_gguf):  # noqa: F811
    """scripts/bench.py --memory's gguf row (a fresh process): the resident bytes of the GGUF-native model."""
    from ftcore.bench.memory import measure

    path, _ = tiny_gguf(tied=True)
    row = measure(path, "gguf")
    model = load_model(path, quant=GGUF)
    assert row["stored_bytes"] == resident_bytes(model) and row["params"] == peft.count_parameters(model)[1]
    assert row["bytes_per_param"] < 2  # 8-bit and smaller blocks, F16/BF16, two F32 weights of 14 (~1.54)


def demo_run(gguf, data_cache, run_dir, quantize: str, **train) -> dict:
    """The demo recipe (LoRA, the arithmetic set) cut to a few steps and a tiny evaluation."""
    return {
        "model": {"path": str(gguf), "quantize": quantize},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": "arithmetic", "task": "arithmetic", "cache_dir": data_cache},
        "train": {"max_steps": 2, "batch_size": 2, "eval_every": 0, "eval_batches": 1, "device": "cpu", **train},
        "eval": {"baseline": False, "max_examples": 1, "max_new_tokens": 1, "batch_size": 1},
        "logger": {"wandb": {"mode": "disabled"}, "progress": False}, "run_dir": str(run_dir),
    }  # fmt: skip


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir) if "loss" in e]


def test_demo_fine_tune_on_a_gguf_native_base(smollm2_gguf, tmp_path, one_thread):
    """The demo recipe on SmolLM2 with model.quantize=gguf, 2 steps: it trains and saves the adapter."""
    got = train(run_config(demo_run(smollm2_gguf, str(tmp_path / "data"), tmp_path / "run", "gguf")))
    assert got["status"] == "finished" and got["step"] == 2, got
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert len(losses(tmp_path / "run")) == 2 and all(np.isfinite(losses(tmp_path / "run")))


@pytest.mark.parametrize("tied", [False, True])
def test_train_on_gguf_equals_train_on_the_import(tiny_gguf, tmp_path, monkeypatch, tied, one_thread):  # noqa: F811
    """train() over the tiny GGUF, native and imported: the same losses step by step (the same weights)."""
    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path / "cache"))  # the import (and the tokenizer) lands here
    path, _ = tiny_gguf(tied=tied)
    runs = {q: demo_run(path, str(tmp_path / "data"), tmp_path / q, q, max_steps=4, eval_every=2) for q in ("gguf", "none")}
    for q, cfg in runs.items():
        cfg["peft"]["target_modules"] = ["q_proj", "v_proj", "down_proj", "lm_head"]
        assert train(run_config(cfg))["status"] == "finished"
        imported = sorted(p.parent.name for p in (tmp_path / "cache").rglob("tokenizer.json"))
        weights = list((tmp_path / "cache").rglob("model.safetensors"))
        if q == "gguf":  # the tokenizer files only were imported, no float32 weights written
            assert len(imported) == 1 and imported[0].endswith("-tokenizer") and not weights, imported
    got, want = losses(tmp_path / "gguf"), losses(tmp_path / "none")
    assert len(got) == 4 and got[-1] != got[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    val = [[e["val_loss"] for e in read_metrics(tmp_path / q) if "val_loss" in e] for q in runs]
    assert len(val[0]) == 2 and np.allclose(val[0], val[1], rtol=1e-5)


def test_a_type_that_cannot_stay_quantized_fails_in_one_line(tmp_path):
    tensors, _ = tiny_gguf_tensors(tiny_weights())
    bad = [(n, 10 if n == "blk.0.attn_q.weight" else t, s, raw) for n, t, s, raw in tensors]  # Q2_K, never read
    path = write_gguf(tmp_path / "q2k.gguf", tiny_metadata(), bad)
    with pytest.raises(FtcoreError) as e:
        load_model(path, quant=GGUF)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: tensor 'blk.0.attn_q.weight' has type Q2_K, which ")
    assert "(kept types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)" in msg
    norm = [(n, Q8_0, s, quantize(np.ones(s, np.float32), Q8_0)) if n == "blk.1.ffn_norm.weight" else (n, t, s, raw)
            for n, t, s, raw in tensors]  # fmt: skip
    path = write_gguf(tmp_path / "q8norm.gguf", tiny_metadata(), norm)
    with pytest.raises(FtcoreError, match=r"tensor 'blk\.1\.ffn_norm\.weight' has type Q8_0; with model\.quantize="
                                          r"gguf a norm must be F32, F16 or BF16$"):  # fmt: skip
        load_model(path, quant=GGUF)
    assert import_gguf(path, tmp_path / "out").is_dir()  # the import dequantizes it


def test_gguf_needs_a_gguf_file(tmp_path, smollm2_dir):
    for load in (lambda: run_config({"model": {"path": str(smollm2_dir), "quantize": "gguf"}}),
                 lambda: load_model(smollm2_dir, quant=GGUF), lambda: load_pretrained(smollm2_dir, quant=GGUF)):
        with pytest.raises(FtcoreError, match=r"^model\.quantize=gguf: model\.path '.*' is not a \.gguf file "
                                              r"\(gguf keeps a GGUF file's quantized blocks; [^\n]*\)$"):  # fmt: skip
            load()
    with pytest.raises(FtcoreError, match=r"missing\.gguf: GGUF file not found$"):
        load_model(tmp_path / "missing.gguf", quant=GGUF)
    with pytest.raises(FtcoreError, match=r"^model\.quantize=gguf: full fine-tuning trains the base weights"):
        run_config({"model": {"path": "x.gguf", "quantize": "gguf"}, "peft": {"method": "full"}})
    assert run_config({"model": {"quantize": "gguf"}}).model.path.endswith(".gguf")  # the demo model is one


def test_lora_refuses_a_gguf_embedding(tiny_gguf):  # noqa: F811
    path, _ = tiny_gguf(tied=True)
    model = load_model(path, quant=GGUF)
    cfg = peft.PeftConfig(method="lora", r=2, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(FtcoreError, match=r"^peft\.target_modules: embed_tokens keeps its GGUF blocks "
                                          r"\(model\.quantize=gguf\), and LoRA on an embedding needs a float table; "
                                          r"leave it out or use model\.quantize=none$"):  # fmt: skip
        peft.apply(model, cfg)
