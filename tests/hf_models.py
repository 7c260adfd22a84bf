"""Tiny random-weight checkpoints written by transformers' save_pretrained (test-only reference)."""

import torch

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)  # fmt: skip

VARIANTS = {
    "llama_gqa_llama3": ("LlamaConfig", dict(
        num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0)),
    "llama_tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_untied_bias": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    # rows of whole 64-blocks everywhere (model.quantize's default block), biases included
    "llama_quant": ("LlamaConfig", dict(num_key_value_heads=2, intermediate_size=128, attention_bias=True)),
    # per-head q/k norms, biases, layer 1 sliding (a window shorter than the tests' sequences)
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, attention_bias=True, use_sliding_window=True,
                                  sliding_window=8, max_window_layers=1)),
    "qwen3_tied": ("Qwen3Config", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # q/k norms over the whole projections, norms on the sublayers' outputs
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2, attention_bias=True)),
    # layer 1 without RoPE (NoPE), and that layer sliding
    "smollm3": ("SmolLM3Config", dict(num_key_value_heads=2, num_hidden_layers=3, no_rope_layers=[1, 0, 1],
                                      use_sliding_window=True, sliding_window=8, attention_bias=True, pad_token_id=0)),
    # every Gemma 2 switch: sandwich norms (1 + w), GeGLU, embeddings * sqrt(hidden), query_pre_attn_scalar,
    # attention and final-logit soft-capping (small caps, so that they bind), layer 0 sliding over 8 tokens
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=8,
                                    pad_token_id=0)),
    # Gemma 3's text model: q/k norms (1 + w), linear-scaled global RoPE and its own base on the sliding layers
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                                        num_hidden_layers=3, sliding_window=8, rope_local_base_freq=500.0,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_scaling={"rope_type": "linear", "factor": 8.0}, pad_token_id=0)),
    # Phi-3: fused qkv_proj / gate_up_proj, LongRoPE (sequences past 16 tokens take the long factors; attention
    # factor sqrt(1 + ln 16 / ln 16)), a sliding window on every layer
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=12, original_max_position_embeddings=16,
                                pad_token_id=0, rope_scaling={
                                    "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                    "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0]})),
    # Phi-4-mini: RoPE on 3/4 of each head's dims (LongRoPE factors for those 12), tied embeddings, one kv head
    "phi4_mini": ("Phi3Config", dict(num_key_value_heads=1, partial_rotary_factor=0.75, tie_word_embeddings=True,
                                     original_max_position_embeddings=16, pad_token_id=0,
                                     rope_scaling={"rope_type": "longrope",
                                                   "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                                   "long_factor": [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]})),
}  # fmt: skip
LONG_ROPE = ("phi3", "phi4_mini")  # LongRoPE picks its factors per batch: a padded row may switch at another step


def make_hf_checkpoint(variant: str, out_dir, seed: int = 0):
    """Save a random model of `variant` to out_dir; return the transformers model (fp32, eval)."""
    import transformers

    cls_name, extra = VARIANTS[variant]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than HF's init so that differences show up in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(out_dir)
    return model.eval()
