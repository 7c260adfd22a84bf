"""The model: one Llama-family decoder with its training loss, batched generation and fused-op entry points.

decoder.py (ModelConfig, Transformer, KVCache), loss.py (chunked lm_head + cross-entropy), generate.py
(KV-cache decoding), ops.py (fused kernels and the LoRA node, each with its eager reference; the CUDA
sources are in the top-level kernels/).
"""

from ftcore.model.decoder import KVCache, ModelConfig, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
