"""Named model shapes with random weights (no download), written as config-only HF-layout directories."""

import json
from pathlib import Path

# Llama-3.2-1B's shape, for random weights (no download): 1.24B parameters, 16 layers, GQA 32/8.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}  # fmt: skip
# SmolLM2-135M's shape, random weights: a small model for graph-vs-eager where the GGUF is not installed.
SMOLLM2_135M = {
    **LLAMA_1B, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
# TinyLlama-1.1B's body (22 layers, GQA 32/4, intermediate 5632) with untied embeddings, and SmolLM2's
# vocabulary (49152: the bench's tokenizer) for both: 1.17B parameters, lm_head its own tensor.
UNTIED_1B = {
    **LLAMA_1B, "vocab_size": 49152, "intermediate_size": 5632, "num_hidden_layers": 22, "num_key_value_heads": 4,
    "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2,
}  # fmt: skip
RANDOM_SHAPES = {"llama-1b": LLAMA_1B, "llama-1b-untied": UNTIED_1B, "smollm2-135m": SMOLLM2_135M}


def resolve_model(ref: str, tmp: Path) -> Path:
    """A model directory: for a named shape, tmp/<name>/config.json only (each arm draws random weights of
    that shape); otherwise whatever ftcore.formats.hf.resolve makes of ref (dir, .gguf, pkg://, hub id)."""
    if ref in RANDOM_SHAPES:
        d = Path(tmp) / ref
        d.mkdir()
        (d / "config.json").write_text(json.dumps(RANDOM_SHAPES[ref]))
        return d
    from ftcore.formats.hf import resolve

    return resolve(ref)
