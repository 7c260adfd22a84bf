"""Loading and saving checkpoints: round trips, sharding, dtypes, and one-line errors for bad input."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model, resolve, save_pretrained
from ftcore.formats.safetensors import save_safetensors
from ftcore.model import ModelConfig, Transformer


def tiny_model(**kw):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, **kw)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("shard_bytes", [4 << 30, 40_000])
def test_save_load_round_trip(tmp_path, shard_bytes):
    model = tiny_model(tie_word_embeddings=True)
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=shard_bytes)
    sharded = (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert sharded == (shard_bytes < 1e6)
    loaded = load_model(tmp_path / "ckpt")
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    tokens = torch.randint(0, 97, (1, 9))
    assert torch.equal(model(tokens), loaded(tokens))


def test_load_in_bf16_casts_every_parameter(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"


def test_transformers_loads_our_save(tmp_path, hf_checkpoint):
    transformers = pytest.importorskip("transformers")
    path, ref = hf_checkpoint("qwen2")
    save_pretrained(load_model(path), tmp_path / "resaved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, ref(tokens).logits)


@pytest.fixture()
def ckpt(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite_tensors(ckpt, edit):
    from safetensors.torch import load_file

    sd = load_file(ckpt / "model.safetensors")
    edit(sd)
    save_safetensors(sd, ckpt / "model.safetensors")


def test_error_missing_directory(tmp_path):
    with pytest.raises(FtcoreError, match="model directory not found"):
        resolve(tmp_path / "nope")


def test_error_no_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FtcoreError, match=r"no config\.json"):
        load_model(ckpt)


def test_error_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FtcoreError, match="unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"):
        load_model(ckpt)


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "unsupported rope_scaling type 'yarn'; supported: default, linear, llama3, longrope"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3,
      "long_factor": [2.0] * 8}}, "rope_scaling.short_factor: expected a list of 8 positive numbers (rotary dims / 2)"),
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.1},
     "partial_rotary_factor=0.1: expected (0, 1] giving an even number of the 16 head dims"),
    ({"resid_pdrop": 0.1}, "resid_pdrop=0.1 unsupported (ftcore's decoder has no dropout layers); expected 0.0"),
    ({"architectures": ["SmolLM3ForCausalLM"], "no_rope_layers": [1]},
     "no_rope_layers has 1 entries for num_hidden_layers=2"),
    ({"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True, "sliding_window": 4,
      "layer_types": ["full_attention"]}, "layer_types has 1 entries for 2 layers"),
    ({"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True, "sliding_window": 4,
      "layer_types": ["full_attention", "chunked_attention"]},
     "unsupported layer type 'chunked_attention'; supported: full_attention, sliding_attention"),
    ({"architectures": ["Gemma3ForCausalLM"], "rope_parameters": {"full_attention": {"rope_theta": 1e6},
      "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters.sliding_attention.rope_type 'linear' unsupported; supported: default"),
    ({"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True},
     "use_bidirectional_attention=true (an encoder) unsupported"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' unsupported; supported: silu, gelu_pytorch_tanh"),
])  # fmt: skip
def test_error_family_config_values(ckpt, change, message):
    """A value of a family's config that the decoder cannot honour: one line naming it (and the file)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(FtcoreError, match="config.json: " + re.escape(message)) as e:
        load_model(ckpt)
    assert "\n" not in str(e.value)


def test_error_missing_tensor(ckpt):
    rewrite_tensors(ckpt, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(FtcoreError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(ckpt)


def test_error_extra_tensor(ckpt):
    rewrite_tensors(ckpt, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(FtcoreError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(ckpt)


def test_error_shape_mismatch(ckpt):
    rewrite_tensors(ckpt, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(FtcoreError, match=r"'model\.norm\.weight' has shape \[65\], expected \[64\]"):
        load_model(ckpt)


def test_error_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(FtcoreError, match=r"model\.safetensors: truncated: tensor '.+' needs bytes up to"):
        load_model(ckpt)
    os.truncate(f, 5)
    with pytest.raises(FtcoreError, match="truncated safetensors file"):
        load_model(ckpt)


def test_error_header_offsets_disagree_with_shape(ckpt):
    """A header whose data_offsets do not span shape x dtype bytes: named, not a reshape traceback."""
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [32]  # 64 float32 values stored, 32 claimed
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the offsets stay valid
    assert len(text) == n
    f.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(FtcoreError, match=r"tensor 'model\.norm\.weight': data_offsets \[\d+, \d+\] hold 256 bytes, "
                                          r"its shape \[32\] and dtype F32 need 128"):  # fmt: skip
        load_model(ckpt)


def test_error_missing_shard(ckpt, tmp_path):
    save_pretrained(tiny_model(), tmp_path / "sharded", max_shard_bytes=40_000)
    next((tmp_path / "sharded").glob("model-00002-*")).unlink()
    with pytest.raises(FtcoreError, match=r"missing weights file model-00002-of-"):
        load_model(tmp_path / "sharded")


def test_error_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(FtcoreError, match="could not be fetched from the hub"):
        resolve("someone/not-a-cached-model")


def test_pkg_reference_errors():
    with pytest.raises(FtcoreError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve("pkg://no_such_pkg_xyz/model.gguf")


PEAK_SCRIPT = """
import sys, torch
from ftcore.model import ModelConfig
from ftcore.formats.hf import build_model, load_model
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
# Page in the code first (a fixed ~70 MB of torch, independent of the checkpoint's size).
torch.ones(1024).sum()
build_model(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1))
before = rss()
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
total = sum(p.detach().sum().item() for p in model.parameters())  # touch every page, no temporaries
# VmHWM, not ru_maxrss: on Linux ru_maxrss carries over the parent's peak across fork and exec.
peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(before, peak, rss())
"""


@pytest.mark.slow
def test_loading_peak_memory_below_1_3x(tmp_path):
    """Load a ~200 MB checkpoint in a fresh process: peak RSS growth < 1.3x the tensor bytes."""
    cfg = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=6, num_heads=12, num_kv_heads=4)
    model = Transformer(cfg)
    model.init_weights()
    save_pretrained(model, tmp_path / "big")
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    for dtype in ("float32", "bfloat16"):  # as stored (zero-copy), and cast tensor by tensor
        cmd = [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big"), dtype]
        before, peak, _ = map(int, subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split())
        ratio = (peak - before) / nbytes
        print(f"{dtype}: checkpoint {nbytes / 2**20:.0f} MiB, peak RSS growth {(peak - before) / 2**20:.0f} MiB = {ratio:.2f}x")
        assert ratio < 1.3
    shutil.rmtree(tmp_path / "big")


def test_built_family_configs_save_as_their_family_or_refuse(tmp_path):
    """A model built from a ModelConfig (no config.json of its own) saves as the family that reads back the same
    config (Qwen3's q/k norms, SmolLM3's NoPE layers), and refuses a combination no family has."""
    for kw, arch in ((dict(qk_norm="head"), "Qwen3ForCausalLM"), (dict(nope_layers=[1]), "SmolLM3ForCausalLM")):
        model = tiny_model(**kw)
        save_pretrained(model, tmp_path / arch)
        assert json.loads((tmp_path / arch / "config.json").read_text())["architectures"] == [arch]
        assert load_model(tmp_path / arch).cfg == model.cfg
    with pytest.raises(FtcoreError, match="save_pretrained: this ModelConfig has no config.json that ftcore writes"):
        save_pretrained(tiny_model(norm_style="unit_offset"), tmp_path / "gemma_like")


def test_built_phi3_config_saves_as_phi3_with_equal_logits(tmp_path):
    """Fused projections, partial rotary dims, LongRoPE and a window, built here: transformers reads the saved
    config.json as the same model (sequences past the original 8 tokens, so the long factors and the window act)."""
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
            "original_max_position_embeddings": 8}  # fmt: skip
    model = tiny_model(fused_projections=True, partial_rotary_factor=0.5, rope_scaling=rope, sliding_window=6,
                       max_position_embeddings=64).eval()  # fmt: skip
    save_pretrained(model, tmp_path / "phi")
    assert json.loads((tmp_path / "phi" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    assert load_model(tmp_path / "phi").cfg == model.cfg
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phi").eval()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert (model(tokens) - theirs(tokens).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("family,keys", [
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, num_hidden_layers=30)),
    ("SmolLM3ForCausalLM", dict(use_sliding_window=True, sliding_window=16, num_hidden_layers=8)),
    ("Gemma2ForCausalLM", dict(num_hidden_layers=3)),
    ("Gemma3ForCausalLM", dict(num_hidden_layers=6, sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                               rope_scaling={"rope_type": "linear", "factor": 8.0})),
    ("Olmo2ForCausalLM", dict()),
    ("Phi3ForCausalLM", dict(sliding_window=8, original_max_position_embeddings=16, max_position_embeddings=64,
                             rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})),
])  # fmt: skip
def test_sparse_configs_read_as_transformers_reads_them(tmp_path, family, keys):
    """A config.json with only the keys that differ from the class defaults (transformers 4.x writes no others, and
    the 4.x Gemma 3 layout): the ModelConfig transformers 5 would build from the same file."""
    transformers = pytest.importorskip("transformers")
    from ftcore.formats.hf import ARCHITECTURES, read_config

    sparse = {"architectures": [family], "model_type": ARCHITECTURES[family], "vocab_size": 97, "hidden_size": 64,
              "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              **keys}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(sparse))
    ours, _ = read_config(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    want = {"head_dim": head_dim, "rms_norm_eps": theirs.rms_norm_eps,
            "tie_word_embeddings": theirs.tie_word_embeddings}  # fmt: skip
    assert {k: getattr(ours, k) for k in want} == want
    rope = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
    assert ours.rope_theta == rope["rope_theta"]
    sliding = getattr(theirs, "sliding_window", None) or 0
    types = getattr(theirs, "layer_types", None) or []
    assert [ours.window(i) for i in range(ours.num_layers)] == [
        sliding if (not types or t == "sliding_attention") and (sliding and getattr(theirs, "use_sliding_window", True))
        else 0 for t in (types or ["x"] * ours.num_layers)]  # fmt: skip
    if family.startswith("Gemma2"):
        assert (ours.attn_softcap, ours.logit_softcap) == (50.0, 30.0)
    if family.startswith("Phi3"):  # 4.x's "type", LongRoPE over the top-level original context
        assert ours.rope_scaling["rope_type"] == rope["rope_type"] == "longrope"
        assert ours.long_rope_after == rope["original_max_position_embeddings"] == 16
