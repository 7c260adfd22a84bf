"""GGUF-native frozen base (model.quantize=gguf): a GGUF file's blocks kept as they are, dequantized per layer.

    file.gguf ──raw bytes per tensor──> blocks [rows, row_bytes] uint8 (Q/K rows un-permuted, whole blocks)
        decoder linears, lm_head ──> LinearGGUF     forward: x @ dequantize(blocks)^T (QuantLinear, weight.py)
        token_embd               ──> EmbeddingGGUF  forward: dequantize(blocks[ids])  (only the rows asked for)
        norms (F32/F16/BF16)     ──> plain `dtype` tensors

The torch decoders equal ftcore.formats.quants.dequantize bit for bit (the same float32 ops in the same order:
scales read as float16, then float32; Q4_1 is q*d + m, Q4_K (d*sc)*q - dmin*mn, ...), so a GGUF-native model
computes what the dequantize-on-import model computes. A tied lm_head is a LinearGGUF over the embedding's very
`blocks` Parameter. Storage is a Parameter (requires_grad=False) whose dim 0 is the weight's rows, so FSDP2
shards it by rows like any weight.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.formats import quants
from ftcore.formats.gguf import GGUFReader, tensor_plan, unpermute_qk
from ftcore.quant.weight import QuantLinear, QuantStorage

F32, F16, BF16 = 0, 1, 30
FLOATS = (F32, F16, BF16)  # what a norm may be stored as
_CHUNK = 1 << 20  # decode at most this many weights at a time (bounds the temporaries of a big table)
_LOW4, _LOW2, _LOW1 = 0x0F0F0F0F0F0F0F0F, 0x0303030303030303, 0x0101010101010101  # per-byte masks of an int64

# NOTE: the bit unpacking runs on the bytes viewed as int64 (8 at a time, masks per byte, little-endian), which
# is several times faster than uint8 ops on strided slices; the float math is quants.py's, op for op.


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2k] uint8 -> [n, k] float32 read as little-endian float16."""
    return b.contiguous().view(torch.float16).float()


def _packed(b: torch.Tensor) -> torch.Tensor:
    """[n, 8k] uint8 -> [n, k] int64 (a copy when b is a strided slice of the blocks)."""
    return b.contiguous().view(torch.int64)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32] uint8: low nibbles first, then high nibbles."""
    x = _packed(qs)  # [n, 2]
    return torch.cat([x & _LOW4, (x >> 4) & _LOW4], dim=-1).view(torch.uint8)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] uint8 bits; bit i belongs to element i."""
    x = qh.contiguous().view(torch.int32)  # [n, 1]
    return ((x >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1).to(torch.uint8)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    return (_nibbles(b[:, 2:]).float() - 8) * _f16(b[:, :2])


def _q4_1(b):
    dm = _f16(b[:, :4])  # [n, 2]: d, m
    return _nibbles(b[:, 4:]).float() * dm[:, :1] + dm[:, 1:]


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return (q.float() - 16) * _f16(b[:, :2])


def _q5_1(b):
    dm = _f16(b[:, :4])
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return q.float() * dm[:, :1] + dm[:, 1:]


def _k_scales(s: torch.Tensor):
    """[n, 12] packed 6-bit scales/mins of Q4_K/Q5_K -> two [n, 8, 1] float32 (ggml get_scale_min_k4)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc.float()[:, :, None], mn.float()[:, :, None]


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] -> [n, 8, 4] int64 (32 packed bytes per sub-block): 4 chunks of 32 bytes; low nibbles are
    sub-block 2c, high 2c+1."""
    x = _packed(qs).view(-1, 4, 1, 4)
    return torch.cat([x & _LOW4, (x >> 4) & _LOW4], dim=2).view(-1, 8, 4)


def _k_dequant(b, q):
    """(d * sc) * q - dmin * mn for Q4_K/Q5_K, q [n, 8, 4] int64 packed codes."""
    sc, mn = _k_scales(b[:, 4:16])
    dm = _f16(b[:, 0:4])[:, :, None]  # [n, 2, 1]: d, dmin
    y = dm[:, :1] * sc * q.view(torch.uint8).view(-1, 8, 32).float() - dm[:, 1:] * mn
    return y.reshape(-1, 256)


def _q4_k(b):
    return _k_dequant(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b):
    shifts = torch.arange(8, device=b.device)[None, :, None]
    high = (_packed(b[:, 16:48])[:, None, :] >> shifts) & _LOW1  # [n, 8, 4]: bit j of every qh byte -> sub-block j
    return _k_dequant(b, _k_nibbles(b[:, 48:176]) | (high << 4))


def _q6_k(b):
    ql = _packed(b[:, 0:128]).view(-1, 2, 2, 4)  # [n, half, quarter-pair, 32 bytes]
    low = torch.cat([ql & _LOW4, (ql >> 4) & _LOW4], dim=2)  # [n, 2, 4, 4]
    shifts = (2 * torch.arange(4, device=b.device))[None, None, :, None]
    high = (_packed(b[:, 128:192]).view(-1, 2, 1, 4) >> shifts) & _LOW2  # [n, 2, 4, 4]
    q = (low | (high << 4)).view(torch.uint8).view(-1, 2, 4, 32).float() - 32
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 4, 2, 1)  # 16 weights per scale
    y = _f16(b[:, 208:210])[:, :, None, None, None] * sc * q.reshape(-1, 2, 4, 2, 16)
    return y.reshape(-1, 256)


_DECODERS = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}
_FLOAT_VIEWS = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
KEPT = (*FLOATS, *sorted(_DECODERS))  # the types a weight keeps as it is (every type quants.py decodes)


def dequantize(blocks: torch.Tensor, ggml_type: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [rows, row_bytes] uint8 of one ggml type -> [rows, cols] in `dtype` (via float32, as quants.py)."""
    rows = blocks.shape[0]
    if ggml_type in _FLOAT_VIEWS:
        x = blocks.contiguous().view(_FLOAT_VIEWS[ggml_type])  # [rows, cols]
        return x.to(torch.float32, copy=True).to(dtype)  # a copy, never a view of the storage (F32)
    _, size = quants.block_layout(ggml_type)
    decode, step = _DECODERS[ggml_type], max(1, _CHUNK // cols)
    if rows <= step:
        return decode(blocks.reshape(-1, size)).view(rows, cols).to(dtype)
    out = torch.empty(rows, cols, dtype=dtype, device=blocks.device)
    for i in range(0, rows, step):
        chunk = blocks[i:i + step]
        out[i:i + step] = decode(chunk.reshape(-1, size)).view(chunk.shape[0], cols)
    return out


def row_bytes(ggml_type: int, cols: int) -> int:
    block, size = quants.block_layout(ggml_type)
    return cols // block * size


def _storage(blocks: torch.Tensor) -> nn.Parameter:
    return blocks if isinstance(blocks, nn.Parameter) else nn.Parameter(blocks, requires_grad=False)


class LinearGGUF(QuantLinear):
    """A frozen linear layer over one GGUF tensor's blocks [out, row_bytes] uint8."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, in_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.blocks = _storage(blocks)  # a Parameter passed in (a tied embedding's) is shared, not copied
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, blocks.shape[0]
        self.dtype = dtype  # what dequantized() and an export give by default
        self.bias = None

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the model's)."""
        return dequantize(self.blocks, self.ggml_type, self.in_features, dtype or self.dtype)

    def row_chunks(self, dtype: torch.dtype):
        """(first row, weight rows [n, in] in dtype) for consecutive row blocks of about _CHUNK weights."""
        step = max(1, _CHUNK // self.in_features)
        for i in range(0, self.out_features, step):
            yield i, dequantize(self.blocks[i:i + step], self.ggml_type, self.in_features, dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """As QuantLinear's; a big weight (a vocabulary's lm_head) is never dequantized whole, only by row blocks."""
        if self.out_features * self.in_features <= _CHUNK:
            return super().matmul(x, bias)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _RowChunkedMatmul.apply(x.to(dtype), self, dtype)  # [..., out]
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {quants.type_name(self.ggml_type)}"


class _RowChunkedMatmul(torch.autograd.Function):
    """x @ W^T with W dequantized a row block at a time, in forward and again in backward (as _QuantMatmul,
    weight.py, but with a peak of one block instead of the whole weight: 4 MiB, not 113 MiB for SmolLM2's head)."""

    @staticmethod
    def forward(ctx, x, layer: LinearGGUF, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        y = x.new_empty(*x.shape[:-1], layer.out_features)  # [..., out], filled a row block at a time
        for i, w in layer.row_chunks(dtype):
            y[..., i:i + w.shape[0]] = F.linear(x, w)
        return y

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = None
        for i, w in ctx.layer.row_chunks(ctx.dtype):
            part = grad[..., i:i + w.shape[0]] @ w  # [..., in]
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


class EmbeddingGGUF(QuantStorage):
    """A frozen token embedding over GGUF blocks [num_embeddings, row_bytes]; a lookup dequantizes only its rows.

    `weight` is a QuantizedWeight of shape [num_embeddings, embedding_dim] (out_features x in_features in
    QuantLinear's terms) for code that reads the table (its device, dtype, a few rows)."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.blocks = _storage(blocks)
        self.ggml_type, self.embedding_dim, self.num_embeddings = ggml_type, embedding_dim, blocks.shape[0]
        self.in_features, self.out_features = embedding_dim, self.num_embeddings  # QuantizedWeight's shape
        self.dtype = dtype

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.blocks, self.ggml_type, self.embedding_dim, dtype or self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.blocks[ids.reshape(-1)], self.ggml_type, self.embedding_dim, self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)  # [..., D]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {quants.type_name(self.ggml_type)}"


def not_a_gguf_file(path) -> FtcoreError:
    """The one line for model.quantize=gguf with a model.path that is not a .gguf file."""
    return FtcoreError(f"model.quantize=gguf: model.path {str(path)!r} is not a .gguf file (gguf keeps a GGUF file's "
                       "quantized blocks; for other checkpoints use model.quantize=nf4 or none)")  # fmt: skip


def check_kept_types(r: GGUFReader):
    """One line for the first tensor whose type cannot stay as it is: a norm must be a float, a weight a KEPT type."""
    kept = ", ".join(quants.type_name(t) for t in KEPT)
    for name, info in r.tensors.items():
        is_norm = name.endswith("norm.weight") or name == "rope_freqs.weight"
        if is_norm and info.ggml_type not in FLOATS:
            raise FtcoreError(f"{r.path}: tensor '{name}' has type {quants.type_name(info.ggml_type)}; with "
                              "model.quantize=gguf a norm must be F32, F16 or BF16")  # fmt: skip
        if not is_norm and info.ggml_type not in KEPT:
            raise FtcoreError(f"{r.path}: tensor '{name}' has type {quants.type_name(info.ggml_type)}, which "
                              f"model.quantize=gguf cannot keep quantized (kept types: {kept}); use "
                              "model.quantize=none to import it")  # fmt: skip


def load_gguf_weights(model: nn.Module, r: GGUFReader, hf: dict, dtype=torch.float32, device="cpu") -> nn.Module:
    """Fill a meta-device Transformer from the GGUF: weights as LinearGGUF/EmbeddingGGUF over the file's blocks
    (copied one tensor at a time, its pages released), norms as `dtype` tensors; hf is llama_config(r)."""
    check_kept_types(r)
    heads = {"attn_q": hf["num_attention_heads"], "attn_k": hf["num_key_value_heads"]}
    state, layers = {}, {}
    for hf_name, name, shape in tensor_plan(r, hf):
        ours = hf_name.removeprefix("model.")
        if len(shape) == 1:  # a norm
            state[ours] = torch.from_numpy(r.tensor(name)).to(device=device, dtype=dtype)
            continue
        ggml_type = r.tensors[name].ggml_type
        rows = r.raw(name).reshape(shape[0], row_bytes(ggml_type, shape[1]))  # each row holds whole blocks
        group = name.split(".")[-2]
        if group in heads:
            rows = unpermute_qk(rows, heads[group])  # the same row permutation as the imported weight's
        blocks = torch.from_numpy(np.array(rows)).to(device)  # our own copy, not a view of the file
        r.release(name)
        kind = EmbeddingGGUF if ours == "embed_tokens.weight" else LinearGGUF
        layers[ours.removesuffix(".weight")] = kind(blocks, ggml_type, shape[1], dtype)
    if hf["tie_word_embeddings"]:
        embed = layers["embed_tokens"]
        layers["lm_head"] = LinearGGUF(embed.blocks, embed.ggml_type, embed.embedding_dim, dtype)  # shares blocks
    for module, layer in layers.items():
        parent, _, leaf = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n != "inv_freq"]
    if left:
        raise FtcoreError(f"{r.path}: no tensor for {left[0]!r} of this model")
    model.reset_buffers(torch.device(device))
    return model
