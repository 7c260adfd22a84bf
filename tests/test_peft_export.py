"""Merged export: ftcore.load_pretrained and transformers load it and compute the adapted model's logits."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_refs import ALL_LINEAR, make_tokenizer, randomize_, use_fbd_standin

import ftcore
from ftcore.formats.hf import load_model, save_pretrained
from ftcore.formats.tokenizer import Tokenizer
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, apply, export_merged, load_with_adapter, save_adapter

ROOT = Path(__file__).resolve().parents[1]

transformers = pytest.importorskip("transformers")

CASES = [
    ("lora", "llama_untied_bias", dict(method="lora", r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR + ["lm_head"])),
    ("dora", "llama_untied_bias", dict(method="dora", r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR)),
    ("ia3", "qwen2", dict(method="ia3", ia3_target_modules=["k_proj", "v_proj", "down_proj"])),
    ("lora_tied_head", "llama_tied", dict(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])),
    ("hra", "llama_untied_bias", dict(method="hra", r=4, target_modules=ALL_LINEAR + ["lm_head"])),
    ("hra_gs", "qwen2", dict(method="hra", r=3, apply_GS=True, target_modules=ALL_LINEAR)),
    ("ln_tuning", "llama_untied_bias", dict(method="ln_tuning")),
    ("ln_tuning_list", "qwen2", dict(method="ln_tuning",
                                     ln_tuning_target_modules=["post_attention_layernorm", "norm"])),
    ("loha", "qwen2", dict(method="loha", r=4, alpha=64, target_modules=ALL_LINEAR + ["lm_head"])),
    ("lokr", "llama_untied_bias", dict(method="lokr", r=2, alpha=16, decompose_both=True, decompose_factor=8,
                                       target_modules=ALL_LINEAR)),
    ("oft", "qwen2", dict(method="oft", oft_block_size=16, target_modules=ALL_LINEAR + ["lm_head"])),
    ("coft", "llama_untied_bias", dict(method="oft", r=2, oft_block_size=0, coft=True, eps=0.5, block_share=True,
                                       use_cayley_neumann=False, target_modules=ALL_LINEAR)),
    ("boft", "qwen2", dict(method="boft", boft_block_size=4, boft_n_butterfly_factor=2, target_modules=ALL_LINEAR)),
]


@pytest.mark.parametrize("name,variant,kwargs", CASES, ids=[c[0] for c in CASES])
def test_merged_export_loads_everywhere(hf_checkpoint, tmp_path, name, variant, kwargs):
    path, ref = hf_checkpoint(variant)
    tok = Tokenizer.from_dir(make_tokenizer(tmp_path))
    model = apply(load_model(path).eval(), PeftConfig(**kwargs))
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=7, std=0.1)
    tokens = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(tokens)
        base = ref(tokens).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_merged(model, tmp_path / "merged", tok)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the export changes nothing
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ours, _ = ftcore.load_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got_ours, got_hf = ours(tokens), hf(tokens).logits
    assert (expected - base).abs().max() > 1e-2
    assert (got_ours - expected).abs().max() < 1e-5
    assert (got_hf - expected).abs().max() < 1e-5
    assert set(ours.state_dict()) == set(load_model(path).state_dict())  # a plain model, no adapter keys
    if name == "lora_tied_head":  # LoRA on a tied lm_head unties it in the export
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
        assert ours.lm_head.weight is not ours.embed_tokens.weight
    # PEFT's own merge of the same adapter gives the same model
    peft = pytest.importorskip("peft")
    use_fbd_standin()  # BOFT's butterfly factors > 1 in PEFT on the CPU
    save_adapter(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "adapter").eval()
    if name != "lora_tied_head":  # NOTE: PEFT's merge into a tied lm_head also alters the embeddings (peft#2777)
        pm = pm.merge_and_unload()
    with torch.no_grad():
        assert (pm(input_ids=tokens).logits - got_hf).abs().max() < 1e-5
    # the trained model itself is untouched by the export (COFT's forward projects its vectors again, in place
    # as PEFT: a second forward rounds differently)
    with torch.no_grad():
        again = model(tokens)
        assert (again - expected).abs().max() < 1e-6 if name == "coft" else torch.equal(again, expected)


def test_full_fine_tuning_exports_as_is(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2")
    model = apply(load_model(path), PeftConfig(method="full", freeze=["embed_tokens.*"]))
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.mul_(1.5)
    out = export_merged(model, tmp_path / "full")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() < 1e-5


def test_export_script_uses_the_recorded_base(tmp_path):
    """scripts/export.py: adapter dir -> merged model with the adapted logits; load_with_adapter finds the base."""
    tok = Tokenizer.from_dir(make_tokenizer(tmp_path))
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    base = Transformer(cfg)
    base.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    save_pretrained(base, tmp_path / "base", tok)
    model = apply(load_model(tmp_path / "base").eval(),
                  PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                             base_model_name_or_path=str(tmp_path / "base")))  # fmt: skip
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=7, std=0.1)
    save_adapter(model, tmp_path / "adapter")
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(tokens)
    again, _ = load_with_adapter(tmp_path / "adapter")  # base from adapter_config.json
    with torch.no_grad():
        assert (again.eval()(tokens) - expected).abs().max() < 1e-6
    export = run_script("export.py", tmp_path / "adapter", tmp_path / "merged")
    assert export.returncode == 0, export.stderr
    merged, _ = ftcore.load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged(tokens) - expected).abs().max() < 1e-5
    again = run_script("export.py", tmp_path / "adapter", tmp_path / "merged")  # never over an earlier export
    assert again.returncode == 2 and again.stderr.strip().endswith("exists and is not empty; name a new directory")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    bare = run_script("export.py", tmp_path / "bare", tmp_path / "m2")
    assert bare.returncode == 2 and "records no base_model_name_or_path" in bare.stderr
    whole = run_script("export.py", tmp_path / "base", tmp_path / "m3")
    assert whole.returncode == 2 and "a whole model, not an adapter" in whole.stderr
    assert "Traceback" not in again.stderr + bare.stderr + whole.stderr


def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True, check=False,
                          text=True, timeout=120)  # fmt: skip
