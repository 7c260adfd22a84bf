"""ggml tensor types and vectorized numpy dequantization to float32.

Each quantized type stores a row as consecutive fixed-size blocks; a block holds `block_size`
elements in `type_size` bytes (layouts from ggml-common.h). Every decoder below takes the raw
bytes viewed as `(n_blocks, type_size)` uint8 and returns `(n_blocks, block_size)` float32.

    Q8_0  34 B / 32:  f16 d, int8 q[32]                       x = q*d
    Q4_0  18 B / 32:  f16 d, u8 qs[16] (lo nibbles = 0..15,    x = (q-8)*d
                      hi nibbles = 16..31)
    Q4_1  20 B / 32:  f16 d, f16 m, u8 qs[16]                  x = q*d + m
    Q5_0  22 B / 32:  f16 d, u32 qh (5th bits), u8 qs[16]      x = (q-16)*d
    Q5_1  24 B / 32:  f16 d, f16 m, u32 qh, u8 qs[16]          x = q*d + m
    Q4_K 144 B / 256: f16 d, f16 dmin, 12 B packed 6-bit scales/mins, u8 qs[128]
    Q5_K 176 B / 256: as Q4_K plus u8 qh[32] (5th bits) before qs
    Q6_K 210 B / 256: u8 ql[128], u8 qh[64], int8 scales[16], f16 d
"""

import numpy as np

# ggml_type id -> name, for every type a GGUF may contain (so errors can name it).
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"unknown type id {ggml_type}")


def _f16(b: np.ndarray) -> np.ndarray:
    """(nb, 2) uint8 -> (nb, 1) float32 read as little-endian float16."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 16) packed bytes -> (nb, 32) values: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """(nb, 4) bytes of a little-endian u32 -> (nb, 32) bits; bit i belongs to element i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _q4_0(b):
    return (_nibbles(b[:, 2:]).astype(np.float32) - 8) * _f16(b[:, :2])


def _q4_1(b):
    return _nibbles(b[:, 4:]).astype(np.float32) * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return (q.astype(np.float32) - 16) * _f16(b[:, :2])


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return q.astype(np.float32) * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _k_scales(s: np.ndarray):
    """(nb, 12) packed 6-bit scales/mins of Q4_K/Q5_K -> two (nb, 8) arrays (ggml get_scale_min_k4)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 128) -> (nb, 8, 32): 4 chunks of 32 bytes; low nibbles are sub-block 2c, high 2c+1."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    q = _k_nibbles(b[:, 16:144]).astype(np.float32)                         # (nb, 8, 32)
    y = _f16(b[:, 0:2])[:, :, None] * sc[:, :, None] * q - _f16(b[:, 2:4])[:, :, None] * mn[:, :, None]
    return y.reshape(-1, 256)


def _q5_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (nb, 8, 32)
    q = (_k_nibbles(b[:, 48:176]) + (high << 4)).astype(np.float32)
    y = _f16(b[:, 0:2])[:, :, None] * sc[:, :, None] * q - _f16(b[:, 2:4])[:, :, None] * mn[:, :, None]
    return y.reshape(-1, 256)


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)                                  # (nb, half, quarter-pair, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)                      # (nb, 2, 4, 32)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3              # (nb, 2, 4, 32)
    q = (low | (high << 4)).astype(np.float32) - 32
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2, 1)  # 16 elems per scale
    y = _f16(b[:, 208:210])[:, :, None, None, None] * sc * q.reshape(-1, 2, 4, 2, 16)
    return y.reshape(-1, 256)


# ggml type id -> (elements per block, bytes per block, decoder)
_QUANTS = {
    2: (32, 18, _q4_0), 3: (32, 20, _q4_1), 6: (32, 22, _q5_0), 7: (32, 24, _q5_1),
    8: (32, 34, _q8_0), 12: (256, 144, _q4_k), 13: (256, 176, _q5_k), 14: (256, 210, _q6_k),
}
_FLOATS = {0: 4, 1: 2, 30: 2}  # F32, F16, BF16: one element per "block"
SUPPORTED = sorted(list(_FLOATS) + list(_QUANTS))
_CHUNK_BLOCKS = 1 << 16  # bound the temporaries: decode at most this many blocks at a time


def block_layout(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a supported type."""
    if ggml_type in _FLOATS:
        return 1, _FLOATS[ggml_type]
    block, size, _ = _QUANTS[ggml_type]
    return block, size


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the raw uint8 bytes of one tensor into a new float32 array of `shape` (numpy order)."""
    n = int(np.prod(shape, dtype=np.int64))
    if ggml_type == 0:
        return raw.view("<f4").astype(np.float32).reshape(shape)           # copy, detached from the mmap
    if ggml_type == 1:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if ggml_type == 30:  # bf16 is the top half of an f32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, size, decode = _QUANTS[ggml_type]
    blocks = raw.reshape(n // block, size)
    out = np.empty((n // block, block), dtype=np.float32)
    for i in range(0, len(blocks), _CHUNK_BLOCKS):
        out[i:i + _CHUNK_BLOCKS] = decode(blocks[i:i + _CHUNK_BLOCKS])
    return out.reshape(shape)
