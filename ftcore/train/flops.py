"""FLOP accounting for training throughput and MFU (model FLOPs utilization).

Per trained token, with N = parameters in matmuls (embedding lookups excluded, lm_head included):
  forward 2N; backward 2N for activation gradients, plus 2N for weight gradients only when the
  weights train. So 6N for full fine-tuning, 4N for a frozen base with small adapters.
Attention adds 2 * 2 * L * T * d_attn per token forward (QK^T and AV over T keys; causal halves it),
scaled by 3 (full) or 2 (frozen) for the backward, like the matmuls.
"""

import torch

from ftcore.model import ModelConfig

# Dense bf16 peak FLOP/s (no sparsity) by device-name substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def matmul_params(cfg: ModelConfig) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)  # q, o, k, v
    mlp = 3 * d * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size  # + lm_head


def train_flops_per_token(cfg: ModelConfig, seq_len: int, full_finetune: bool) -> float:
    """Model FLOPs per token of one training step (forward + backward)."""
    factor = 6 if full_finetune else 4
    attn = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim / 2  # causal: half the keys
    return factor * matmul_params(cfg) + factor / 2 * attn


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, if we know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
