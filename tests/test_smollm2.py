"""The real demo model: SmolLM2-135M-Instruct imported from its GGUF, run by our model."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ftcore
from ftcore.model.generate import generate

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tok = ftcore.load_pretrained(smollm2_dir)
    return model.eval(), tok


def test_config_and_size(smollm2):
    model, _ = smollm2
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6


@pytest.mark.slow
def test_logits_match_transformers(smollm2, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model, tok = smollm2
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}])
    tokens = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        expected, got = ref(tokens).logits, model(tokens)
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_chat_answer_is_coherent(smollm2):
    model, tok = smollm2
    questions = ["What is the capital of France?", "What is the capital of Japan?"]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    out = generate(model, prompts, 16, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    answers = [tok.decode(o) for o in out]
    assert "Paris" in answers[0] and "Tokyo" in answers[1], answers


def test_generate_cli_user_error_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, SCRIPTS / "generate.py", "hi", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'missing'}: model directory not found"
