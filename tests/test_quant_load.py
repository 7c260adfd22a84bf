"""model.quantize: loading a checkpoint with its decoder linears quantized to 4 bits, against transformers +
bitsandbytes' BitsAndBytesConfig(load_in_4bit=True) on the same checkpoint."""

import copy
import subprocess
import sys

import pytest
import torch
from hf_models import make_hf_checkpoint
from test_train import data_cache, tiny_dir  # noqa: F401  (fixtures)

from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model, save_pretrained
from ftcore.model import ModelConfig, Transformer
from ftcore.quant import Linear4bit
from ftcore.quant.linear import QuantSpec

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "llama"
    return path, make_hf_checkpoint("llama_quant", path)


def hf_4bit(path, quant_type):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu",
                                                             dtype=torch.float32).eval()  # fmt: skip


def bnb_state(layer: Linear4bit):
    """bitsandbytes' QuantState for our layer's tensors (double quantization)."""
    from ftcore.quant.fourbit import NESTED_BLOCK, code4, dynamic_map

    q = layer.quantized()
    nested = bnb.functional.QuantState(absmax=q.nested_absmax, code=dynamic_map().clone(), blocksize=NESTED_BLOCK,
                                       dtype=torch.float32)  # fmt: skip
    return bnb.functional.QuantState(absmax=layer.absmax.view(-1), shape=torch.Size([layer.out_features, layer.in_features]),
                                     code=code4(layer.quant_type).clone(), blocksize=layer.block_size,
                                     quant_type=layer.quant_type, dtype=layer.dtype, offset=q.offset, state2=nested)  # fmt: skip


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantized_base_equals_transformers_bitsandbytes(checkpoint, quant_type):
    path, ref = checkpoint
    hf = hf_4bit(path, quant_type)
    ours = load_model(path, quant=QuantSpec(quant_type, 64, True)).eval()
    dequantized = copy.deepcopy(ref)  # "dequantize, then HF": bitsandbytes' dequantization in a plain fp32 model
    layers = {n: m for n, m in hf.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14
    for name, layer in layers.items():
        mine = ours.get_submodule(name.removeprefix("model."))
        assert isinstance(mine, Linear4bit)
        assert torch.equal(mine.packed.view(-1), layer.weight.data.view(-1)), name  # the same 4-bit codes
        theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        codes_differ = mine.absmax.view(-1) != layer.weight.quant_state.absmax
        # bitsandbytes' CPU search may take a neighbouring 8-bit absmax code (test_quant_fourbit.py): here 3 of
        # the 1,536 codes, at most one per layer
        assert codes_differ.sum() <= 1, name
        if not codes_differ.any():
            assert torch.equal(mine.dequantized(), theirs), name
        weight = bnb.functional.dequantize_4bit(mine.packed.view(-1, 1), bnb_state(mine))  # ours, their dequantizer
        assert torch.equal(weight, mine.dequantized())
        dequantized.get_submodule(name).weight.data.copy_(weight)
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(tokens)
        assert (logits - dequantized(tokens).logits).abs().max() < 1e-4
        # bitsandbytes' own CPU 4-bit matmul runs at lower precision: within 5e-2 of ours (measured ~2e-2)
        assert (logits - hf(tokens).logits).abs().max() < 5e-2
        assert (logits - ref(tokens).logits).abs().max() > 1e-2  # and quantization did change them


def test_only_decoder_linears_are_quantized_and_biases_kept(checkpoint):
    path, _ = checkpoint
    model = load_model(path, dtype=torch.bfloat16, quant=QuantSpec("nf4", 64, False))
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and q.bias.dtype == torch.bfloat16 and not q.bias.requires_grad
    assert q.dequantized().dtype == torch.bfloat16
    assert type(model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(not p.is_meta for p in model.parameters()) and all(not b.is_meta for b in model.buffers())
    for m in (m for m in model.modules() if isinstance(m, Linear4bit)):  # half a byte per weight, one absmax per 64
        assert m.packed.numel() == m.in_features * m.out_features // 2 and m.absmax.numel() * 64 == 2 * m.packed.numel()


def test_bad_quantization_settings_fail_with_one_line(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(FtcoreError, match=r"model.safetensors: model.layers.0.mlp.gate_proj.weight: "
                                          r"model.quant_block_size=128 does not divide the row length 64"):  # fmt: skip
        load_model(path, quant=QuantSpec("nf4", 128, True))
    with pytest.raises(FtcoreError, match=r"^model.quantize='int3': expected one of none, nf4, fp4, gguf$"):
        run_config({"model": {"quantize": "int3"}})
    with pytest.raises(FtcoreError, match=r"^model.quant_block_size=48: expected one of 32, 64, 128"):
        run_config({"model": {"quantize": "nf4", "quant_block_size": 48}})
    with pytest.raises(FtcoreError, match=r"^model.quantize=nf4: full fine-tuning trains the base weights"):
        run_config({"model": {"quantize": "nf4"}, "peft": {"method": "full"}})


@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_training_over_a_quantized_base(tiny_dir, data_cache, tmp_path, method):  # noqa: F811
    """train() with model.quantize=nf4 loads the base 4-bit; prompt tuning and QLoRA train over it (the loss falls;
    LoRA's layers hold the Linear4bit as base_layer); the final adapter is written."""
    from test_train import losses, tiny_run

    from ftcore.train import train

    options = dict(peft__method="prompt", peft__num_virtual_tokens=4, optim__lr=3e-2) if method == "prompt" else {}
    cfg = tiny_run(tiny_dir, data_cache, tmp_path / method, model__quantize="nf4", train__max_steps=12,
                   eval__baseline=False, **options)  # fmt: skip
    train(run_config(cfg))
    curve = losses(tmp_path / method)
    assert len(curve) == 12 and sum(curve[-3:]) < sum(curve[:3])
    adapter = tmp_path / method / "final" / "adapter_model.safetensors"
    assert adapter.is_file()


def test_a_4bit_base_counts_its_weights(checkpoint):
    """PEFT's parameter count: a 4-bit weight counts in x out, not its packed bytes and scales."""
    from ftcore.peft import PeftConfig, apply, count_parameters

    path, _ = checkpoint
    for cfg in (PeftConfig(method="ln_tuning"), PeftConfig(method="lora", r=4, target_modules=["q_proj", "lm_head"])):
        plain = count_parameters(apply(load_model(path), cfg))
        assert count_parameters(apply(load_model(path, quant=QuantSpec("nf4", 64, True)), cfg)) == plain
    assert plain[0] == 2 * 4 * (64 + 64) + 4 * (64 + 97)
    with pytest.raises(FtcoreError, match=r"^train.cuda_graph: model.quantize=nf4: capturing 4-bit layers"):
        run_config({"model": {"quantize": "nf4"}, "peft": {"method": "prompt"}, "train": {"cuda_graph": True},
                    "data": {"static_shape": True}})  # fmt: skip


QUANT_PEAK = """
import sys, torch
from ftcore.formats.hf import build_model, load_model
from ftcore.model import ModelConfig
from ftcore.quant.fourbit import quantize_4bit
from ftcore.quant.linear import QuantSpec
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
# Page in the code first (torch, the model classes, the quantization kernels), independent of the checkpoint.
torch.ones(1024).sum()
build_model(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1))
quantize_4bit(torch.randn(64, 256), "nf4", 64, True)
before = rss()
model = load_model(sys.argv[1], dtype=torch.bfloat16, quant=QuantSpec("nf4", 64, True))
total = sum(t.sum().item() for t in model.state_dict().values())  # touch every page, no full-size temporaries
peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(before, peak, rss())
"""


@pytest.mark.slow
def test_quantized_loading_peak_memory_below_045x_bf16(tmp_path):
    """Load a 325 MB bf16 checkpoint with model.quantize=nf4 in a fresh process: the peak RSS growth stays under
    0.45x its bf16 bytes (the 4-bit linears, the bf16 embeddings and one tensor's temporaries at a time)."""
    cfg = ModelConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
                      num_kv_heads=16)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model.to(torch.bfloat16), tmp_path / "big")
    nbytes = sum(p.numel() * 2 for p in model.parameters())
    del model
    assert nbytes >= 300e6
    cmd = [sys.executable, "-c", QUANT_PEAK, str(tmp_path / "big")]
    before, peak, _ = map(int, subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split())
    ratio = (peak - before) / nbytes
    print(f"nf4: checkpoint {nbytes / 2**20:.0f} MiB bf16, peak RSS growth {(peak - before) / 2**20:.0f} MiB = {ratio:.2f}x")
    assert ratio <= 0.45
