"""GGUF import: dequantization vs plain references, Q/K un-permutation, a synthetic GGUF end to end,
error messages, the cache, and the real SmolLM2 file loaded and run by transformers."""

import json
import math
import os
import struct
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from ftcore.errors import FtcoreError
from ftcore.formats import quants
from ftcore.formats.gguf import GGUFReader, cached_import, import_gguf, llama3_rope_factors, unpermute_qk

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30

# ---------------------------------------------------------------- reference quantizers (one block at a time)


def _h(x) -> bytes:
    return np.float16(x).tobytes()


def _hf(b: bytes) -> float:
    return float(np.frombuffer(b, np.float16)[0])


def quantize(x: np.ndarray, t: int) -> bytes:
    """Pack float32 `x` (any shape, rows along the last axis) into ggml type `t`, block by block."""
    if t == F32:
        return x.astype("<f4").tobytes()
    if t == F16:
        return x.astype("<f2").tobytes()
    if t == BF16:
        return (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()  # truncation is fine for a test
    out = b""
    for blk in x.reshape(-1, 32).astype(np.float64):
        if t == Q8_0:
            d = np.abs(blk).max() / 127
            q = np.round(blk / d if d else blk * 0).astype(np.int8)
            out += _h(d) + q.tobytes()
        elif t in (Q4_0, Q5_0):
            levels = 8 if t == Q4_0 else 16
            amax = blk[np.argmax(np.abs(blk))]
            d = amax / -levels
            q = np.clip(np.floor(blk / d + levels + 0.5) if d else np.full(32, levels), 0, 2 * levels - 1)
            q = q.astype(np.uint8)
            nib = (q[:16] & 15) | ((q[16:] & 15) << 4)
            qh = b"" if t == Q4_0 else struct.pack("<I", sum(int(q[i] >> 4) << i for i in range(32)))
            out += _h(d) + qh + nib.tobytes()
        elif t in (Q4_1, Q5_1):
            top = 15 if t == Q4_1 else 31
            lo, hi = blk.min(), blk.max()
            d = (hi - lo) / top
            q = np.clip(np.round((blk - lo) / d) if d else np.zeros(32), 0, top).astype(np.uint8)
            nib = (q[:16] & 15) | ((q[16:] & 15) << 4)
            qh = b"" if t == Q4_1 else struct.pack("<I", sum(int(q[i] >> 4) << i for i in range(32)))
            out += _h(d) + _h(lo) + qh + nib.tobytes()
    return out


def ref_dequantize(raw: bytes, t: int, n: int) -> np.ndarray:
    """Plain-loop dequantization transcribed from ggml's dequantize_row_* (reference for quants.py)."""
    if t in (F32, F16):
        return np.frombuffer(raw, "<f4" if t == F32 else "<f2").astype(np.float64)
    if t == BF16:
        return np.array([struct.unpack("<f", b"\0\0" + raw[i:i + 2])[0] for i in range(0, len(raw), 2)])
    y = []
    size = quants.block_layout(t)[1]
    for b in (raw[i:i + size] for i in range(0, len(raw), size)):
        if t == Q8_0:
            y += [_hf(b[:2]) * v for v in np.frombuffer(b[2:], np.int8)]
        elif t == Q4_0:
            y += [_hf(b[:2]) * ((b[2 + j % 16] >> (4 * (j // 16)) & 15) - 8) for j in range(32)]
        elif t == Q4_1:
            y += [_hf(b[:2]) * (b[4 + j % 16] >> (4 * (j // 16)) & 15) + _hf(b[2:4]) for j in range(32)]
        elif t in (Q5_0, Q5_1):
            off = 2 if t == Q5_0 else 4
            qh = struct.unpack("<I", b[off:off + 4])[0]
            for j in range(32):
                q = (b[off + 4 + j % 16] >> (4 * (j // 16)) & 15) | ((qh >> j) & 1) << 4
                y.append(_hf(b[:2]) * (q - 16) if t == Q5_0 else _hf(b[:2]) * q + _hf(b[2:4]))
        elif t in (Q4_K, Q5_K):
            d, dmin, sc = _hf(b[:2]), _hf(b[2:4]), b[4:16]
            qh, ql = (None, b[16:]) if t == Q4_K else (b[16:48], b[48:])
            for j in range(8):  # ggml get_scale_min_k4
                if j < 4:
                    s, m = sc[j] & 63, sc[j + 4] & 63
                else:
                    s, m = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
                for l in range(32):
                    q = ql[32 * (j // 2) + l] >> (4 * (j % 2)) & 15
                    if qh is not None:
                        q += 16 * ((qh[l] >> j) & 1)
                    y.append(d * s * q - dmin * m)
        elif t == Q6_K:
            ql, qh, sc, d = b[:128], b[128:192], np.frombuffer(b[192:208], np.int8), _hf(b[208:210])
            blk = [0.0] * 256
            for half in range(2):
                for l in range(32):
                    h = qh[32 * half + l]
                    q1 = ((ql[64 * half + l] & 15) | ((h >> 0 & 3) << 4)) - 32
                    q2 = ((ql[64 * half + l + 32] & 15) | ((h >> 2 & 3) << 4)) - 32
                    q3 = ((ql[64 * half + l] >> 4) | ((h >> 4 & 3) << 4)) - 32
                    q4 = ((ql[64 * half + l + 32] >> 4) | ((h >> 6 & 3) << 4)) - 32
                    for k, q in enumerate((q1, q2, q3, q4)):
                        blk[128 * half + 32 * k + l] = d * sc[8 * half + l // 16 + 2 * k] * q
            y += blk
    assert len(y) == n
    return np.array(y)


@pytest.mark.parametrize("t", [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1])
def test_dequantize_matches_reference(t):
    rng = np.random.default_rng(t)
    x = rng.normal(0, 1, (3, 64)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block (d = 0)
    raw = quantize(x, t)
    got = quants.dequantize(np.frombuffer(raw, np.uint8), t, x.shape)
    assert got.dtype == np.float32 and got.shape == (3, 64)
    np.testing.assert_allclose(got.ravel(), ref_dequantize(raw, t, x.size), rtol=1e-6, atol=1e-7)
    err = {F32: 0, F16: 2e-3, BF16: 2e-2, Q8_0: 0.02, Q4_0: 0.4, Q4_1: 0.3, Q5_0: 0.2, Q5_1: 0.15}[t]
    assert np.abs(got - x).max() <= err * max(1, np.abs(x).max())  # and it decodes to roughly x


@pytest.mark.parametrize("t", [Q4_K, Q5_K, Q6_K])
def test_k_quants_match_reference(t):
    rng = np.random.default_rng(t)
    n_blocks, size = 3, quants.block_layout(t)[1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (n_blocks, 2)).astype(np.float16).view(np.uint8)  # sane f16 d, dmin
    if t == Q6_K:
        raw[:, 208:210] = scales[:, :2]
    else:
        raw[:, 0:4] = scales
    got = quants.dequantize(raw.ravel(), t, (n_blocks * 256,))
    np.testing.assert_allclose(got, ref_dequantize(raw.tobytes(), t, n_blocks * 256), rtol=1e-5, atol=1e-6)


def permute_qk(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 64), (2, 8, 5), (9, 64, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).normal(size=(n_head * head_dim, cols)).astype(np.float32)
    p = permute_qk(w, n_head)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)


# ---------------------------------------------------------------- a minimal GGUF writer


def _gstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


_PACK = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gvalue(vtype, v) -> bytes:
    if vtype == 8:
        return _gstr(v)
    if vtype == 9:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(_gvalue(etype, i) for i in items)
    return struct.pack("<" + _PACK[vtype], v)


def _infer(v):
    if isinstance(v, bool):
        return 7, v
    if isinstance(v, int):
        return 4, v
    if isinstance(v, float):
        return 6, v
    if isinstance(v, str):
        return 8, v
    return 9, (_infer(v[0])[0] if v else 8, v)


def write_gguf(path, kv: dict, tensors, version=3, alignment=32, magic=b"GGUF"):
    """kv: key -> value or (gguf value type, value); tensors: [(name, ggml type, numpy shape, raw bytes)]."""
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(kv)))
    for key, v in kv.items():
        vtype, v = v if isinstance(v, tuple) else _infer(v)
        out += _gstr(key) + struct.pack("<I", vtype) + _gvalue(vtype, v)
    data = bytearray()
    for name, t, shape, raw in tensors:
        dims = list(reversed(shape))  # GGUF lists dims fastest-first
        out += _gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t, len(data))
        data += raw + b"\0" * (-len(raw) % alignment)
    out += b"\0" * (-len(out) % alignment) + data
    path.write_bytes(bytes(out))
    return path


def _bytes_to_unicode():
    """GPT-2's byte -> printable unicode char table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + _bytes_to_unicode() + ["Ġt", "he", "Ġthe", "Ġc", "Ġca", "Ġcat"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "Ġc a", "Ġca t"]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TINY = {"hidden": 64, "heads": 4, "kv": 2, "inter": 128, "layers": 2, "vocab": len(TOKENS)}
LAYER_TYPES = [[Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, Q8_0], [F32, F16, Q8_0, Q8_0, Q4_1, Q5_1, F32]]
ORDER = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}


def tiny_metadata(**over):
    md = {"general.architecture": "llama", "general.name": "tiny", "general.alignment": (4, 32),
          "llama.block_count": TINY["layers"], "llama.context_length": 256,
          "llama.embedding_length": TINY["hidden"], "llama.feed_forward_length": TINY["inter"],
          "llama.attention.head_count": TINY["heads"], "llama.attention.head_count_kv": TINY["kv"],
          "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "llama.vocab_size": TINY["vocab"], "llama.rope.dimension_count": TINY["hidden"] // TINY["heads"],
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": TOKENS,
          "tokenizer.ggml.token_type": (9, (5, [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))),
          "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
          "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT}
    md.update(over)
    return {k: v for k, v in md.items() if v is not None}


def tiny_weights(seed=0, tied=False):
    """HF-layout random float32 weights of the tiny model."""
    rng = np.random.default_rng(seed)
    h, f, v, hd = TINY["hidden"], TINY["inter"], TINY["vocab"], TINY["hidden"] // TINY["heads"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.1, (v, h)), "model.norm.weight": 1 + 0.1 * rng.normal(size=h)}
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.1, (v, h))
    kv = TINY["kv"] * hd
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    for i in range(TINY["layers"]):
        w[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        for g in ORDER:
            w[f"model.layers.{i}.{HF[g]}.weight"] = rng.normal(0, 0.1, shapes[g])
    return {k: a.astype(np.float32) for k, a in w.items()}


def tiny_gguf_tensors(w, all_f32=False):
    """[(name, type, shape, raw)] in llama.cpp's layout (Q/K permuted), plus what import should yield."""
    tensors, expected = [], {}

    def add(name, t, hf, permute_heads=None):
        x, t = w[hf], F32 if all_f32 else t
        gx = permute_qk(x, permute_heads) if permute_heads else x
        tensors.append((name, t, x.shape, quantize(gx, t)))
        # quantization blocks lie within rows, so quantize(permute(x)) == permute(quantize(x)):
        expected[hf] = ref_dequantize(quantize(x, t), t, x.size).reshape(x.shape).astype(np.float32)

    add("token_embd.weight", Q8_0, "model.embed_tokens.weight")
    for i in range(TINY["layers"]):
        add(f"blk.{i}.attn_norm.weight", F32, f"model.layers.{i}.input_layernorm.weight")
        for g, t in zip(ORDER, LAYER_TYPES[i]):
            heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv"]}.get(g)
            add(f"blk.{i}.{g}.weight", t, f"model.layers.{i}.{HF[g]}.weight", heads)
        add(f"blk.{i}.ffn_norm.weight", F32, f"model.layers.{i}.post_attention_layernorm.weight")
    add("output_norm.weight", F32, "model.norm.weight")
    if "lm_head.weight" in w:
        add("output.weight", F16, "lm_head.weight")
    return tensors, expected


@pytest.fixture
def tiny_gguf(tmp_path):
    """make(**metadata overrides, tensors=..., tied=...) -> (path, expected HF tensors)."""

    def make(name="tiny.gguf", tensors=None, tied=False, **over):
        ts, expected = tiny_gguf_tensors(tiny_weights(tied=tied))
        return write_gguf(tmp_path / name, tiny_metadata(**over), ts if tensors is None else tensors), expected

    return make


# ---------------------------------------------------------------- synthetic end to end


def test_metadata_value_types_roundtrip(tmp_path):
    kv = {"u8": (0, 200), "i8": (1, -5), "u16": (2, 60000), "i16": (3, -300), "u32": (4, 4_000_000_000),
          "i32": (5, -7), "f32": (6, 0.5), "bool": (7, True), "str": (8, "héllo"), "u64": (10, 2**40),
          "i64": (11, -(2**40)), "f64": (12, 0.1), "arr_str": (9, (8, ["a", "", "ü"])),
          "arr_i32": (9, (5, [1, -2, 3])), "arr_f32": (9, (6, [0.25, 1.5])), "arr_arr": (9, (9, [(4, [1, 2])])),
          "empty": (9, (8, []))}
    for version in (2, 3):
        with GGUFReader(write_gguf(tmp_path / f"v{version}.gguf", kv, [], version=version)) as r:
            assert r.version == version and r.tensors == {}
            assert r.metadata == {k: v[1] if v[0] != 9 else v[1][1] for k, v in kv.items() if k != "arr_arr"} | {
                "arr_arr": [[1, 2]]}


def test_import_tiny_gguf(tiny_gguf, tmp_path):
    path, expected = tiny_gguf()
    out = import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0 and cfg["max_position_embeddings"] == 256
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["vocab_size"] == len(TOKENS) and cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tc["chat_template"] == CHAT and tc["add_bos_token"] is False and tc["model_max_length"] == 256
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    from ftcore.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    assert tok.encode("the cat") == [TOKENS.index("t"), TOKENS.index("he"), TOKENS.index("Ġcat")]
    assert tok.encode(" the cat") == [TOKENS.index("Ġthe"), TOKENS.index("Ġcat")]
    assert tok.encode("<|im_start|>7 12") == [1, TOKENS.index("7"), TOKENS.index("Ġ"), TOKENS.index("1"),
                                              TOKENS.index("2")]  # Digits pre-tokenizer: one digit per token
    assert tok.decode(tok.encode("héllo wörld 😀 the cat")) == "héllo wörld 😀 the cat"


def test_tiny_gguf_runs_in_transformers(tiny_gguf, tmp_path):
    """Import un-permutes Q/K correctly: transformers' logits equal those of the unquantized HF weights."""
    transformers = pytest.importorskip("transformers")
    for tied in (False, True):
        w = tiny_weights(tied=tied)
        ts, _ = tiny_gguf_tensors(w, all_f32=True)  # nothing lost to quantization
        out = import_gguf(write_gguf(tmp_path / f"t{tied}.gguf", tiny_metadata(), ts), tmp_path / f"out{tied}")
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(out)).eval()
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=not tied)
        ids = torch.tensor([[1, 5, 70, 200, 9, 3, 44]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits)
        assert model.config.tie_word_embeddings is tied


def test_llama3_rope_freqs_become_rope_parameters(tiny_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    ts, _ = tiny_gguf_tensors(tiny_weights())
    factors = llama3_rope_factors(500000.0, 16, 8.0, original_max_position_embeddings=32)
    ts.append(("rope_freqs.weight", F32, factors.shape, factors.tobytes()))
    md = tiny_metadata(**{"llama.rope.freq_base": 500000.0, "llama.rope.scaling.original_context_length": 32})
    out = import_gguf(write_gguf(tmp_path / "l3.gguf", md, ts), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), base / torch.from_numpy(factors).double(),
                               rtol=1e-5, atol=0)


# ---------------------------------------------------------------- errors


def _error(path, out):
    with pytest.raises(FtcoreError) as e:
        import_gguf(path, out)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return msg


def test_error_bad_magic(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert "not a GGUF file" in _error(p, tmp_path / "out")
    p.write_bytes(b"")
    assert "not a GGUF file" in _error(p, tmp_path / "out")


def test_error_unsupported_version(tmp_path):
    p = write_gguf(tmp_path / "v1.gguf", {}, [], version=1)
    assert "unsupported GGUF version 1" in _error(p, tmp_path / "out")


def test_error_truncated_header(tiny_gguf, tmp_path):
    p, _ = tiny_gguf()
    p.write_bytes(p.read_bytes()[:300])
    assert "truncated GGUF header" in _error(p, tmp_path / "out")


def test_error_truncated_tensor_data(tiny_gguf, tmp_path):
    p, _ = tiny_gguf()
    p.write_bytes(p.read_bytes()[:-200])  # cuts into the last tensor: output.weight
    msg = _error(p, tmp_path / "out")
    assert "truncated file" in msg and "'output.weight'" in msg


def test_error_unsupported_tensor_type(tiny_gguf, tmp_path):
    ts, _ = tiny_gguf_tensors(tiny_weights())
    name, _, shape, raw = ts[3]
    ts[3] = (name, 10, shape, raw)  # Q2_K
    msg = _error(write_gguf(tmp_path / "q2k.gguf", tiny_metadata(), ts), tmp_path / "out")
    assert f"'{name}'" in msg and "Q2_K" in msg and "supported: F32, F16" in msg and "Q4_1" in msg


def test_error_non_llama_architecture(tiny_gguf, tmp_path):
    p, _ = tiny_gguf(**{"general.architecture": "qwen2"})
    assert "'qwen2'" in _error(p, tmp_path / "out")


def test_error_missing_metadata_key(tiny_gguf, tmp_path):
    p, _ = tiny_gguf(**{"llama.block_count": None})
    assert "missing required metadata key 'llama.block_count'" in _error(p, tmp_path / "out")
    p, _ = tiny_gguf(name="notok.gguf", **{"tokenizer.ggml.merges": None})
    assert "'tokenizer.ggml.merges'" in _error(p, tmp_path / "out2")


def test_error_wrong_shape_and_missing_tensor(tiny_gguf, tmp_path):
    ts, _ = tiny_gguf_tensors(tiny_weights())
    assert "missing tensor 'blk.1.ffn_down.weight'" in _error(
        write_gguf(tmp_path / "a.gguf", tiny_metadata(), [t for t in ts if t[0] != "blk.1.ffn_down.weight"]),
        tmp_path / "out")
    p, _ = tiny_gguf(name="b.gguf", **{"llama.feed_forward_length": 96})
    assert "'blk.0.ffn_gate.weight' has shape (128, 64), expected (96, 64)" in _error(p, tmp_path / "out")


def test_error_nonempty_out_dir(tiny_gguf, tmp_path):
    p, _ = tiny_gguf()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FtcoreError, match="not empty"):
        import_gguf(p, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cached_import_reuses_and_invalidates(tiny_gguf, tmp_path, monkeypatch):
    p, _ = tiny_gguf()
    first = cached_import(p, cache_root=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("tiny-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_import(p, cache_root=tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not re-imported
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    second = cached_import(p, cache_root=tmp_path / "cache")
    assert second != first and (second / "config.json").is_file()
    monkeypatch.setenv("FTCORE_CACHE", str(tmp_path / "env"))
    assert cached_import(p).parent == tmp_path / "env" / "gguf"


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct Q4_1 file


@pytest.fixture(scope="module")
def smol_dir(smollm2_gguf, tmp_path_factory):
    start = time.perf_counter()
    out = import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smol") / "SmolLM2")
    print(f"imported {smollm2_gguf.name} in {time.perf_counter() - start:.1f}s")
    return out


def test_smollm2_config(smol_dir):
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (49152, 100000.0, 1e-5)
    assert cfg["tie_word_embeddings"] is True and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    with open(smol_dir / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    n_params = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    assert n_params == 134_515_008 and "lm_head.weight" not in header
    tc = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tc["chat_template"]


def test_smollm2_answers_in_transformers(smol_dir):
    transformers = pytest.importorskip("transformers")
    from ftcore.formats.tokenizer import Tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(smol_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
    prompt = Tokenizer.from_dir(smol_dir).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    ids = hf_tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
