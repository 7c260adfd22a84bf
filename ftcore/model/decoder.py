"""One Llama-family decoder: Llama 2/3/3.1/3.2, Mistral, Qwen2/3, OLMo 2, SmolLM2/3, Gemma 2/3, Phi-3/4 differ only by
ModelConfig (per-layer windows and RoPE bases, q/k norms, post- and sandwich norms, NoPE layers, GeGLU, soft-caps,
fused projections, LongRoPE, partial rotary dims).

Module and parameter names follow the Hugging Face layout minus its leading `model.`
(`layers.3.self_attn.q_proj.weight`), so checkpoints map by one rule (weights.py) and PEFT
target-module names (`q_proj`, `down_proj`, ...) mean the same thing here as in HF PEFT.

    tokens ─> embed_tokens ─┐ (or input_embeds)
                            v   [soft prompt; x]   prompt_encoder: the prompt-tuning hook
      ┌── Block x N ─────────────────────────────────────────────────────┐
      │ x + o_proj(SDPA(rope(q), [prefix_k; cache_k; rope(k)], [...v]))  │  prefix_kv: the prefix-tuning hook
      │   (q, k normed first with qk_norm; no rope on nope_layers;       │
      │    Phi-3: q, k, v from one qkv_proj, rope on rotary_dim dims)    │
      │ x + down_proj(silu(gate_proj(x)) * up_proj(x))                   │
      │   (Phi-3: gate, up = gate_up_proj(x).chunk(2))                   │
      └──────────────────────────────────────────────────────────────────┘
                            v
                   norm ─> lm_head ─> logits [B, T, vocab]   (real tokens only)
                         └─ with targets: (summed next-token loss, target count)   loss.py: no full logits

The loss is computed here, inside forward, so that DDP and FSDP2 wrap the whole computation
(FSDP2 keeps lm_head's weight gathered exactly as long as the chunked loss needs it).

Virtual tokens (a prefix_kv prefix or prompt_encoder's soft prompt, P of them) take positions 0..P-1
and shift the real tokens' positions by P, as HF PEFT does; callers' position_ids and attention_mask
always describe the real tokens only.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.model import ops
from ftcore.model.loss import softcap, token_loss_sum

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
QK_NORMS = ("", "head", "proj")
BLOCK_NORMS = ("pre", "post", "sandwich")
NORM_STYLES = ("llama", "float32_scale", "unit_offset")
MLP_ACTS = ("silu", "gelu_tanh")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets qkv_bias and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int = 0  # Mistral; 0 = full attention
    # per layer "full_attention" | "sliding_attention" (Qwen2/3, SmolLM3); empty: every layer slides when
    # sliding_window > 0 (Mistral)
    layer_types: list = field(default_factory=list)
    qk_norm: str = ""  # RMSNorm on q and k before RoPE: "head" over each head (Qwen3), "proj" over all (OLMo 2)
    block_norms: str = "pre"  # "pre": x + f(norm(x)) (Llama); "post": x + norm(f(x)) (OLMo 2); "sandwich": both
    nope_layers: list = field(default_factory=list)  # layers that skip RoPE (SmolLM3's NoPE layers)
    # RMSNorm's scale: "llama" casts back, then * w; "float32_scale": * w in float32, then cast (OLMo 2);
    # "unit_offset": * (1 + w) in float32 (Gemma: w starts at 0)
    norm_style: str = "llama"
    mlp_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    embed_scale: float = 1.0  # token embeddings * this (Gemma: sqrt(hidden_size), in the embeddings' dtype)
    attn_scale: float = 0.0  # q.k scale; 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # attention scores -> cap * tanh(scores / cap) before the mask (Gemma 2); 0: off
    logit_softcap: float = 0.0  # final logits -> cap * tanh(logits / cap) (Gemma 2); 0: off
    rope_local_theta: float = 0.0  # the sliding layers' RoPE base, unscaled (Gemma 3); 0: theirs is everyone's
    # Phi-3: one qkv_proj [(H + 2 Hkv) hd, D] and one gate_up_proj [2 I, D], as the checkpoint stores them
    fused_projections: bool = False
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim * this) dims of each head (Phi-4-mini: 0.75)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise FtcoreError(
                f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise FtcoreError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise FtcoreError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise FtcoreError(f"unsupported layer type {sorted(unknown)[0]!r}; supported: {', '.join(LAYER_TYPES)}")
        for key, allowed in (("qk_norm", QK_NORMS), ("block_norms", BLOCK_NORMS), ("norm_style", NORM_STYLES),
                             ("mlp_act", MLP_ACTS)):  # fmt: skip
            value = getattr(self, key)
            if value not in allowed:
                raise FtcoreError(f"{key}={value!r}; supported: {', '.join(map(repr, allowed))}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise FtcoreError(f"partial_rotary_factor={self.partial_rotary_factor}: expected (0, 1] giving an even "
                              f"number of the {self.head_dim} head dims")  # fmt: skip
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                f = self.rope_scaling.get(key)
                ok = isinstance(f, list) and all(isinstance(v, (int, float)) and v > 0 for v in f)
                if not ok or len(f) != self.rotary_dim // 2:
                    raise FtcoreError(f"rope_scaling.{key}: expected a list of {self.rotary_dim // 2} positive "
                                      f"numbers (rotary dims / 2), got {f!r}")  # fmt: skip
            if not isinstance(self.rope_scaling.get("original_max_position_embeddings"), int):
                raise FtcoreError("rope_scaling.original_max_position_embeddings: expected an integer (longrope)")

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def long_rope_after(self) -> int:
        """LongRoPE: its long factors apply once a forward's positions reach past this many tokens; 0: no LongRoPE."""
        s = self.rope_scaling
        return s["original_max_position_embeddings"] if s.get("rope_type") == "longrope" else 0

    def local_rope(self, layer: int) -> bool:
        """Layer `layer` takes the sliding layers' own RoPE (rope_local_theta)."""
        return bool(self.rope_local_theta and self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window (0: all earlier tokens)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return 0
        return self.sliding_window


def rope_inv_freq(cfg: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] in float32, with linear, llama3 or LongRoPE scaling applied; local: the
    sliding layers' (rope_local_theta, unscaled); long: LongRoPE's long factors (else its short ones)."""
    dim = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    s = {} if local else cfg.rope_scaling
    rope_type = s.get("rope_type", "default")
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope_type == "longrope":  # Phi-3: each frequency divided by its own factor
        factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta**exponent)
    inv_freq = 1.0 / (theta**exponent)
    if rope_type == "linear":
        inv_freq = inv_freq / s["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by: LongRoPE's attention factor (HF's default from the context extension
    max_position_embeddings / original_max_position_embeddings), 1 for every other RoPE."""
    s = cfg.rope_scaling
    if s.get("rope_type") != "longrope":
        return 1.0
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / orig
    return math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos, sin [B, 1, T, rotary_dim] for integer positions [B, T] (computed in float32, times `scale`)."""
    freqs = position_ids[:, :, None].float() * inv_freq.float()[None, None, :]  # [B, T, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, rd]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, style: str = "llama"):
        super().__init__()
        self.eps, self.style = eps, style
        self.weight = nn.Parameter(torch.zeros(dim) if style == "unit_offset" else torch.ones(dim))
        self.fused_kernels = False  # kernels/ on CUDA tensors (Transformer.set_fast_paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_with(x, self.weight)

    def norm_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This norm with `weight` as its scale (LN tuning's trained copy)."""
        if self.style == "llama":  # normalize in float32, cast back before the scale (HF Llama); ops.rms_norm_eager
            return ops.rms_norm(x, weight, self.eps, self.fused_kernels)
        return ops.rms_norm_float32_scale(x, weight, self.eps, 1.0 if self.style == "unit_offset" else 0.0)


class KVCache:
    """Preallocated keys/values for every layer: k, v [B, n_kv, max_len, hd]; `length` tokens are filled.

    Prefix-tuning prefixes are not stored here: they are passed to every forward as `prefix_kv`.
    Prompt tuning's soft tokens are (the first model.num_virtual_tokens slots, filled on prefill).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        """Each layer's cache is made at its first keys, on their device, in `dtype` or else theirs (bf16 under
        FSDP2's mixed precision)."""
        self.shape, self.dtype = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim), dtype
        self.k, self.v = [None] * cfg.num_layers, [None] * cfg.num_layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, n_kv, T, hd] at the current length; return all filled keys and values."""
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape, dtype=self.dtype or k.dtype)
            self.v[layer] = v.new_zeros(self.shape, dtype=self.dtype or v.dtype)
        start, end = self.length, self.length + k.shape[2]
        if end > self.shape[2]:
            raise FtcoreError(f"KV cache overflow: {end} tokens > max_len {self.shape[2]}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.fused = cfg.fused_projections
        if self.fused:  # Phi-3: rows [q; k; v]
            self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3: over each head's hd; OLMo 2: over the whole projection
            self.q_norm = RMSNorm(self.hd if cfg.qk_norm == "head" else self.n_heads * self.hd, cfg.rms_norm_eps,
                                  cfg.norm_style)  # fmt: skip
            self.k_norm = RMSNorm(self.hd if cfg.qk_norm == "head" else self.n_kv * self.hd, cfg.rms_norm_eps,
                                  cfg.norm_style)  # fmt: skip
        self.use_rope = layer_idx not in cfg.nope_layers
        self.rotary_dim = cfg.rotary_dim
        self.scale = cfg.attn_scale or None  # None: SDPA's head_dim ** -0.5
        self.softcap = cfg.attn_softcap
        self.fused_kernels = False  # RoPE through kernels/ on CUDA tensors

    def forward(self, x, cos, sin, mask, kv_cache=None, prefix_kv=None, alive=None):
        """x [B, T, D]; mask: bool [B, 1, T, S] (True = attend) or None for plain causal; alive: bool [B, 1, T, 1]
        or None, the rows whose output is kept (the others', padding tokens that see no real key, is zero).

        prefix_kv: (k, v) each [B, n_kv, P, hd], prepended to the keys/values without RoPE
        (the prefix-tuning hook); `mask` must then cover the P prefix columns first.
        """
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H * hd], [B, T, Hkv * hd] x 2
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, self.n_heads, self.hd), k.view(B, T, self.n_kv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.use_rope:  # (SmolLM3's NoPE layers: none)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, S_cache, hd]
        if prefix_kv is not None:
            pk, pv = prefix_kv
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        gqa = self.n_heads != self.n_kv
        if self.softcap:
            y = softcapped_attention(q, k, v, mask, self.scale or self.hd**-0.5, self.softcap)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale)
        if alive is not None:
            y = y * alive  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (rotate halves) on x [B, H, T, hd]'s first rotary_dim dims, the rest as they are (Phi-4-mini)."""
        if self.rotary_dim == self.hd:
            return ops.rope(x, cos, sin, self.fused_kernels)
        rd = self.rotary_dim
        return torch.cat([ops.rope(x[..., :rd], cos, sin, self.fused_kernels), x[..., rd:]], dim=-1)


def softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap), masked) v, softmax in float32 (Gemma 2; SDPA has no soft-cap).

    q [B, H, T, hd], k/v [B, Hkv, S, hd], mask bool [B|1, 1, T, S] (True = attend) or None (causal, S = T).
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, hd]
    scores = torch.tanh(q @ k.transpose(-1, -2) * (scale / cap)) * cap  # [B, H, T, S]
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_projections
        if self.fused:  # Phi-3: rows [gate; up]
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = cfg.mlp_act
        self.fused_kernels = False  # SwiGLU through kernels/ on CUDA tensors

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        if self.act == "gelu_tanh":  # GeGLU
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        return self.down_proj(ops.swiglu(gate, up, self.fused_kernels))  # silu(gate) * up


class Block(nn.Module):
    """block_norms="pre" (Llama): input_layernorm before attention, post_attention_layernorm before the MLP;
    "post" (OLMo 2): post_attention_layernorm on attention's output, post_feedforward_layernorm on the MLP's,
    inside the residual; "sandwich" (Gemma 2/3): input_layernorm and pre_feedforward_layernorm before,
    post_attention_layernorm and post_feedforward_layernorm after (HF's names in each)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norms = cfg.block_norms
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style)  # noqa: E731
        if self.norms != "post":
            self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = norm()
        if self.norms == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.norms != "pre":
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, prefix_kv=None, alive=None):
        if self.norms == "pre":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, prefix_kv, alive)
            return x + self.mlp(self.post_attention_layernorm(x))
        h = self.input_layernorm(x) if self.norms == "sandwich" else x
        x = x + self.post_attention_layernorm(self.self_attn(h, cos, sin, mask, kv_cache, prefix_kv, alive))
        h = self.pre_feedforward_layernorm(x) if self.norms == "sandwich" else x
        return x + self.post_feedforward_layernorm(self.mlp(h))


def prepend_soft_prompt_mask(attention_mask, soft: int, prefill: bool):
    """Give a real-token mask (None, [B, S] padding or bool [B, 1, T, S]) `soft` leading visible columns.

    On the prefill call the soft tokens are also queries: their rows [soft, soft + S] are causal among
    themselves and see no real token.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return torch.cat([attention_mask.new_ones(attention_mask.shape[0], soft), attention_mask], dim=1)
    m = attention_mask.bool()
    B, _, T, S = m.shape
    m = torch.cat([m.new_ones(B, 1, T, soft), m], dim=-1)  # [B, 1, T, soft + S]
    if prefill:
        top = torch.ones(soft, soft, dtype=torch.bool, device=m.device).tril()
        top = torch.cat([top, top.new_zeros(soft, S)], dim=-1).expand(B, 1, soft, soft + S)
        m = torch.cat([top, m], dim=2)  # [B, 1, soft + T, soft + S]
    return m


def build_mask(
    T: int, past: int, prefix: int, attention_mask, sliding_window: int, device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, alive): boolean attention mask [B|1, 1, T, prefix + past + T] (True = attend), or None for plain causal.

    attention_mask: None, a key padding mask [B, past + T] (1 = real token), or a ready bool mask
    [B, 1, T, past + T] (e.g. block-diagonal for packed documents). Prefix columns are always visible.
    Every query may attend to its own key, so rows of padding tokens never go all-masked (NaN); `alive`
    [B, 1, T, 1] (None: all) marks the rows that see a key besides that: attention zeroes the others' output, as
    torch's SDPA does for an all-masked row in transformers (Lily's router averages over padding tokens too).
    """
    S = past + T
    alive = None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.bool()
    else:
        if attention_mask is None and prefix == 0 and past == 0 and not sliding_window:
            return None, None
        q_pos = torch.arange(past, S, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(S, device=device)[None, :]  # [1, S]
        mask = k_pos <= q_pos
        if sliding_window:
            mask = mask & (k_pos > q_pos - sliding_window)
        mask = mask[None, None]  # [1, 1, T, S]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        alive = None if attention_mask is None or prefix else mask.any(-1, keepdim=True)  # [B, 1, T, 1]
        mask = mask | (k_pos == q_pos)[None, None]
    if prefix:  # (prefix columns are always visible: every row is alive)
        mask = torch.cat([mask.new_ones(*mask.shape[:3], prefix), mask], dim=-1)
    return mask, alive


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True) if cfg.rope_local_theta else None,
                             persistent=False)  # fmt: skip
        self.register_buffer("inv_freq_long", rope_inv_freq(cfg, long=True) if cfg.long_rope_after else None,
                             persistent=False)  # fmt: skip
        self.rope_scale = rope_attention_factor(cfg)
        # PEFT hook points (None = unused), root modules so that FSDP shards them with the root:
        # prefix_encoder(batch_size) -> per layer (k, v) [B, n_kv, P, hd], used when forward gets no prefix_kv;
        # prompt_encoder(batch_size) -> soft tokens [B, P, D] (with .num_virtual_tokens = P), prepended on the
        # prefill call (empty or no KV cache) and kept in the cache.
        self.register_module("prefix_encoder", None)
        self.register_module("prompt_encoder", None)
        self.loss_chunk_size = 0  # lm_head + cross-entropy in chunks of N target tokens; 0 = plain (set_fast_paths)
        self.vocab_stream = None  # VocabStream: frozen tables used from their FSDP2 shards (set by parallelize)

    def set_fast_paths(self, fused_kernels: bool, loss_chunk_size: int):
        """The speed switches (same values up to rounding; a new model runs the eager references)."""
        self.loss_chunk_size = loss_chunk_size
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.fused_kernels = fused_kernels

    @property
    def num_virtual_tokens(self) -> int:
        """KV-cache slots the model fills itself: prompt tuning's soft tokens (0 otherwise)."""
        return self.prompt_encoder.num_virtual_tokens if self.prompt_encoder is not None else 0

    def reset_buffers(self, device=None):
        """Recompute non-persistent buffers (needed after building on the meta device)."""
        device = device or self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.cfg).to(device)
        if self.cfg.rope_local_theta:
            self.inv_freq_local = rope_inv_freq(self.cfg, local=True).to(device)
        if self.cfg.long_rope_after:
            self.inv_freq_long = rope_inv_freq(self.cfg, long=True).to(device)

    def tie_weights(self):
        """lm_head computes with the embedding's weight; a quantized embedding's head (a GGUF base) shares its
        storage tensors instead (the head itself, or the quantized base_layer of an adapter over it)."""
        if not self.cfg.tie_word_embeddings:
            return
        if "weight" in self.embed_tokens._parameters:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            getattr(self.lm_head, "base_layer", self.lm_head)._parameters.update(self.embed_tokens._parameters)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random init for from-scratch tests (HF's initializer_range convention)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p) if self.cfg.norm_style == "unit_offset" else nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std, generator=generator)
        self.reset_buffers()

    def forward(
        self,
        tokens: torch.Tensor | None = None,  # [B, T] int64
        *,
        input_embeds: torch.Tensor | None = None,  # [B, T, D]: used in place of tokens
        position_ids: torch.Tensor | None = None,  # [B, T] real-token positions; default past .. past + T - 1
        attention_mask: torch.Tensor | None = None,  # [B, past + T] padding or bool [B, 1, T, past + T] (real tokens)
        kv_cache: KVCache | None = None,
        prefix_kv: list | None = None,  # per layer (k, v) [B, n_kv, P, hd]; default prefix_encoder's
        targets: torch.Tensor | None = None,  # [B, T] next-token ids, IGNORE (-100) = no loss
        select_targets: bool = True,  # lm_head on target positions only (a host sync); False: all, masked
    ):
        """logits [B, T, vocab]; with targets, (summed token loss, target count) as 0-d tensors instead.

        select_targets=False keeps every shape fixed and the device free of host syncs (CUDA graphs).
        """
        stream = self.vocab_stream
        if input_embeds is not None:
            x = input_embeds
        elif stream is not None and stream.embed:
            x = stream.embedding(self.embed_tokens.weight, tokens)
        else:
            x = self.embed_tokens(tokens)
        if input_embeds is None and self.cfg.embed_scale != 1.0:  # Gemma: the scale rounded to the table's dtype
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        B, T, _ = x.shape
        if prefix_kv is None and self.prefix_encoder is not None:
            prefix_kv = self.prefix_encoder(B)
        prefix = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
        soft = self.num_virtual_tokens
        past = kv_cache.length if kv_cache is not None else 0  # includes the soft prompt after prefill
        past_real = max(past - soft, 0)
        if position_ids is None:
            position_ids = torch.arange(past_real, past_real + T, device=x.device)[None].expand(B, T)
        if prefix + soft:
            position_ids = position_ids + (prefix + soft)  # virtual tokens hold positions 0..P-1
        if soft:
            attention_mask = prepend_soft_prompt_mask(attention_mask, soft, prefill=past == 0)
            if past == 0:
                x = torch.cat([self.prompt_encoder(B).to(x.dtype), x], dim=1)  # [B, soft + T, D]
                soft_pos = torch.arange(soft, device=x.device)[None].expand(B, soft)
                position_ids = torch.cat([soft_pos, position_ids], dim=1)
        inv_freq = self.inv_freq
        if self.inv_freq_long is not None:  # LongRoPE: the long factors once the batch reaches past the original
            # context (HF's choice, made per forward; generate re-prefills when a decode step crosses it)
            inv_freq = torch.where(position_ids.max() >= self.cfg.long_rope_after, self.inv_freq_long, inv_freq)
        rope = {False: rope_cos_sin(inv_freq, position_ids, x.dtype, self.rope_scale)}  # True: the local layers'
        if self.inv_freq_local is not None:
            rope[True] = rope_cos_sin(self.inv_freq_local, position_ids, x.dtype)
        keys = past + x.shape[1]  # a window at least this long cannot bind: no mask for it (Phi-3.5's 262,144)
        windows = [w if w < keys else 0 for w in map(self.cfg.window, range(len(self.layers)))]
        masks = {w: build_mask(x.shape[1], past, prefix, attention_mask, w, x.device) for w in set(windows)}
        for i, layer in enumerate(self.layers):
            mask, alive = masks[windows[i]]  # (mask, alive) of the layer's window
            cos, sin = rope[self.cfg.local_rope(i)]
            x = layer(x, cos, sin, mask, kv_cache, None if prefix_kv is None else prefix_kv[i], alive)
        if kv_cache is not None:
            kv_cache.length += x.shape[1]
        x = self.norm(x[:, -T:])  # the real tokens
        if targets is not None:
            return token_loss_sum(self.lm_head, x, targets, self.loss_chunk_size, select_targets, stream,
                                  self.cfg.logit_softcap)  # fmt: skip
        if stream is not None and stream.head:
            logits = stream.logits(self.lm_head.weight, x)
        else:
            logits = self.lm_head(x)
        return softcap(logits, self.cfg.logit_softcap)
