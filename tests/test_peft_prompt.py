"""Prompt and prefix tuning details: PEFT's prompt inits, labels/loss, packed (4-D mask) batches."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft_refs import VOCAB, make_tokenizer, peft_model

from ftcore.formats.hf import load_model
from ftcore.formats.tokenizer import Tokenizer
from ftcore.peft import PeftConfig, apply, load_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("P,text,ids", [(5, "t5 t9 t7", [5, 9, 7, 5, 9]), (2, "t5 t9 t7", [5, 9])])
def test_text_init_equals_peft(hf_checkpoint, tokenizer_dir, P, text, ids):
    path, ref = hf_checkpoint("llama_gqa_llama3")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(tokenizer_dir))
    theirs = peft.get_peft_model(copy.deepcopy(ref), cfg).prompt_encoder["default"].embedding.weight
    model = apply(load_model(path), PeftConfig(method="prompt", num_virtual_tokens=P, prompt_init="text",
                                               init_text=text, tokenizer_path=str(tokenizer_dir)))
    ours = model.prompt_encoder.embedding.weight
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, model.embed_tokens.weight[ids])  # repeated, then cut to P
    # with a tokenizer object (as train.py passes it), its directory is recorded for PEFT
    tok = Tokenizer.from_dir(tokenizer_dir)
    cfg = PeftConfig(method="prompt", num_virtual_tokens=P, prompt_init="text", init_text=text)
    model = apply(load_model(path), cfg, tokenizer=tok)
    assert torch.equal(model.prompt_encoder.embedding.weight, theirs)
    assert model.peft_config.tokenizer_path == str(tokenizer_dir)


def test_sample_vocab_and_random_init(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path), PeftConfig(method="prompt", num_virtual_tokens=6, prompt_init="sample_vocab"))
    rows = model.prompt_encoder.embedding.weight
    table = model.embed_tokens.weight
    assert all((table == row).all(-1).any() for row in rows)  # every soft token starts as a real embedding
    seeded = apply(load_model(path), PeftConfig(method="prompt", num_virtual_tokens=6, prompt_init="sample_vocab"))
    assert torch.equal(seeded.prompt_encoder.embedding.weight, rows)  # cfg.seed decides, not the global RNG
    rand = apply(load_model(path), PeftConfig(method="prompt", num_virtual_tokens=64, seed=3))
    w = rand.prompt_encoder.embedding.weight
    assert abs(w.mean().item()) < 0.05 and abs(w.std().item() - 1) < 0.05  # PEFT's RANDOM: N(0, 1)


def test_prompt_tuning_loss_equals_peft(hf_checkpoint, tmp_path):
    """Logits are [B, T, V] for the real tokens; the loss over them is PEFT's (labels padded with -100)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    pm = peft_model(ref, "prompt_random", seed=1)
    pm.save_pretrained(tmp_path)
    model = load_adapter(load_model(path).eval(), tmp_path)
    tokens = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[:, :4] = -100  # prompt part masked (PEFT would also score token 0 from the last soft token otherwise)
    with torch.no_grad():
        expected = pm(input_ids=tokens, labels=labels).loss
        logits = model(tokens)
    assert logits.shape == (2, 10, VOCAB)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("spec", ["prompt_random", "prefix"])
def test_packed_documents_each_see_the_virtual_tokens(hf_checkpoint, tokenizer_dir, tmp_path, spec):
    """A block-diagonal 4-D mask with per-document positions computes each document as if alone."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    peft_model(ref, spec, seed=1).save_pretrained(tmp_path)
    model = load_adapter(load_model(path).eval(), tmp_path)
    a, b = torch.randint(3, VOCAB, (1, 5)), torch.randint(3, VOCAB, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        got = model(packed, attention_mask=mask[None, None], position_ids=positions)
        alone = torch.cat([model(a), model(b)], dim=1)
    assert (got - alone).abs().max() < 1e-5


def test_ptuning_adapter_loads_as_fixed_soft_tokens(hf_checkpoint, tmp_path):
    """A saved P-tuning adapter is the encoder's output: loaded, it is the fixed embedding [P, D] (the encoder is
    gone, as in PEFT's inference mode); saved again, it is the same file; training it further is prompt tuning."""
    from safetensors.torch import load_file

    from ftcore.peft import PeftConfig, adapter_parameters, apply, count_parameters, save_adapter

    path, _ = hf_checkpoint("llama_gqa_llama3")
    cfg = PeftConfig(method="ptuning", num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                     encoder_hidden_size=8)  # fmt: skip
    trained = apply(load_model(path).eval(), cfg)
    # embedding, 2 bidirectional LSTM layers (4H rows: W_ih, W_hh, 2 biases), MLP 2H -> 2H -> D: PEFT's 7952
    lstm = 2 * (32 * (64 + 8) + 64) + 2 * (32 * (16 + 8) + 64)
    assert count_parameters(trained)[0] == 3 * 64 + lstm + 16 * 16 + 16 + 16 * 64 + 64 == 7952
    save_adapter(trained, tmp_path / "a")
    loaded = load_adapter(load_model(path).eval(), tmp_path / "a")
    enc = loaded.prompt_encoder
    assert enc.fixed and enc.lstm_head is None and enc.mlp_head is None
    assert [p.shape for p in adapter_parameters(loaded)] == [(3, 64)] and count_parameters(loaded)[0] == 3 * 64
    tokens = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    # (torch's CPU LSTM takes another kernel without autograd: the saved output, with it, differs in the last bits)
    assert (enc.output() - trained.prompt_encoder.output()).abs().max() < 1e-6
    with torch.no_grad():
        assert (loaded(tokens) - trained(tokens)).abs().max() < 1e-5
    save_adapter(loaded, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
    assert (tmp_path / "a" / "adapter_config.json").read_text() == (tmp_path / "b" / "adapter_config.json").read_text()


def test_ptuning_saves_the_encoder_output_without_dropout(hf_checkpoint, tmp_path):
    """Saved from a model in train mode, an LSTM encoder with dropout still writes its eval-mode output (no
    dropout draw), and stays in train mode."""
    from safetensors.torch import load_file

    from ftcore.peft import save_adapter

    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path), PeftConfig(method="ptuning", num_virtual_tokens=3, encoder_hidden_size=8,
                                               encoder_reparameterization_type="LSTM", encoder_num_layers=2,
                                               encoder_dropout=0.5)).train()  # fmt: skip
    enc = model.prompt_encoder
    torch.manual_seed(0)
    assert not torch.equal(enc.output(), enc.output())  # dropout is live in train mode
    for name in ("a", "b"):
        save_adapter(model, tmp_path / name)
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors")["prompt_embeddings"] for n in ("a", "b"))
    with torch.no_grad():
        expected = enc.eval().output()
    assert torch.equal(a, b) and (a - expected).abs().max() < 1e-6
    enc.train()
    save_adapter(model, tmp_path / "c")
    assert enc.training and model.training
