"""Sharded loading (ftcore/train/sharded_load.py) in one process: a meta-device model with the method attached
(init=False), materialized from the checkpoint and the method's seeded init, equals the whole-model load followed
by peft.apply, tensor for tensor; the FSDP2 runs of test_dist.py check the sharded (2-rank) case."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import tiny_dir  # noqa: F401 - pytest fixture

from ftcore import peft
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_meta, load_pretrained
from ftcore.formats.safetensors import SafetensorsFile
from ftcore.peft.config import PeftConfig
from ftcore.train.sharded_load import materialize, why_not_sharded

METHODS = {
    "lora": dict(method="lora", r=4, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
    "lora_embedding": dict(method="lora", r=4, target_modules=["embed_tokens", "o_proj"]),
    "rslora_gaussian": dict(method="lora", r=4, use_rslora=True, init="gaussian"),
    "ia3": dict(method="ia3"), "vera": dict(method="vera", r=8), "hira": dict(method="hira", r=4),
    "hra": dict(method="hra", r=4), "loha": dict(method="loha", r=4), "lokr": dict(method="lokr", r=2),
    "adalora": dict(method="adalora", init_r=4, target_r=2, total_step=10),
    "oft": dict(method="oft", oft_block_size=16), "boft": dict(method="boft", boft_block_size=8),
    "lily": dict(method="lily", r=4, stride_A=2, num_B=3),
    "prefix": dict(method="prefix", num_virtual_tokens=4, prefix_projection=True, prefix_hidden_size=16),
    "ptuning": dict(method="ptuning", num_virtual_tokens=4, encoder_hidden_size=16),
    "prompt": dict(method="prompt", num_virtual_tokens=4), "full": dict(method="full"),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(METHODS))
def test_materialized_model_equals_the_whole_load(tiny_dir, name, dtype):  # noqa: F811
    cfg = PeftConfig(**METHODS[name], seed=7)
    assert why_not_sharded(cfg, "none") is None
    whole, tokenizer = load_pretrained(tiny_dir, dtype=dtype)
    peft.apply(whole, cfg, tokenizer=tokenizer)
    peft.trainables_to_float32(whole)
    model, tokenizer, model_dir = load_meta(tiny_dir, dtype)
    peft.apply(model, cfg, tokenizer=tokenizer, init=False)
    peft.trainables_to_float32(model)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, model_dir, dtype, torch.device("cpu"), cfg, tokenizer)
    ours, theirs = dict(model.named_parameters()), dict(whole.named_parameters())
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].requires_grad == theirs[k].requires_grad, k
        assert torch.equal(ours[k], theirs[k]), k
    ours, theirs = dict(model.named_buffers()), dict(whole.named_buffers())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(tokens), whole(tokens))


@pytest.mark.parametrize("extra, quantize, reason", [
    (dict(method="dora"), "none", "DoRA's magnitude is the norm of the base weight"),
    (dict(method="lora", init="pissa"), "none", "peft.init=pissa starts from the base weight's singular vectors"),
    (dict(method="prompt", prompt_init="sample_vocab"), "none", "peft.prompt_init=sample_vocab copies embedding rows"),
    (dict(method="ln_tuning"), "none", "LN tuning starts from a copy of the base norms"),
    (dict(method="lora"), "nf4", "model.quantize=nf4: the base is quantized as it is read"),
])  # fmt: skip
def test_methods_whose_init_reads_the_base_load_it_whole(extra, quantize, reason):
    assert why_not_sharded(PeftConfig(**extra), quantize) == reason


def test_read_rows_is_the_slice_of_the_tensor(tiny_dir):  # noqa: F811
    st = SafetensorsFile(tiny_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(st.read_rows(name, 5, 19), st.get(name)[5:19])
    assert st.read_rows(name, 3, 3).shape == (0, st.shape(name)[1])


def meta_lora(model_dir):
    model, tokenizer, model_dir = load_meta(model_dir)
    cfg = PeftConfig(method="lora", r=4)
    peft.apply(model, cfg, init=False)
    return model, cfg, model_dir


def test_a_checkpoint_that_does_not_fit_is_one_error(tiny_dir, tmp_path):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    hf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf, "intermediate_size": 96}))
    model, cfg, model_dir = meta_lora(bad)
    with pytest.raises(FtcoreError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                       r"shape \[128, 64\], expected \[96, 64\]$"):  # fmt: skip
        materialize(model, model_dir, torch.float32, torch.device("cpu"), cfg)
    (bad / "config.json").write_text(json.dumps(hf))
    tensors = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, bad / "model.safetensors")
    model, cfg, model_dir = meta_lora(bad)
    with pytest.raises(FtcoreError, match=r"checkpoint is missing tensor 'model.norm.weight'$"):
        materialize(model, model_dir, torch.float32, torch.device("cpu"), cfg)
    save_file({**tensors, "model.extra": torch.zeros(2)}, bad / "model.safetensors")
    model, cfg, model_dir = meta_lora(bad)
    with pytest.raises(FtcoreError, match=r"model.safetensors: unexpected tensor 'model.extra' \(not a parameter"):
        materialize(model, model_dir, torch.float32, torch.device("cpu"), cfg)
