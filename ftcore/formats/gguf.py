"""Import a llama-architecture GGUF file (llama.cpp's format) into an HF-layout directory.

    file.gguf ──GGUFReader (mmap)──> metadata + tensor table
       ├─ llama.* keys ─────────────> config.json, generation_config.json
       ├─ tensors ──dequantize──> un-permute Q/K ──> HF names ──> model.safetensors (float32)
       └─ tokenizer.ggml.* ──────────> tokenizer.json (byte-level BPE), tokenizer_config.json

GGUF layout (v2/v3, little-endian): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then the
key/values, then per tensor (name, u32 n_dims, u64 dims fastest-first, u32 ggml type, u64 offset),
then tensor data starting at the next multiple of `general.alignment` (default 32).
Everything is written into a temp dir next to `out_dir` and renamed into place, so a crash never
leaves a half-written model behind. Only numpy/tokenizers are used; no `gguf`/`transformers`.
"""

import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftcore.errors import FtcoreError
from ftcore.formats import quants

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}  # GGUF value type -> numpy dtype (8/9: string/array)
IMPORT_VERSION = 1  # part of cached_import's key: bump when the output of import_gguf changes
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json")
TOKENIZER_OUTPUT = tuple(f for f in OUTPUT_FILES if f != "model.safetensors")  # import_gguf(weights=False)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest-first): GGUF dims reversed
    ggml_type: int
    offset: int  # relative to the start of the data section


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.off = buf, path, 0

    def take(self, n: int):
        if n < 0 or self.off + n > len(self.buf):
            raise FtcoreError(f"{self.path}: truncated GGUF header (needs byte {self.off + n}, "
                              f"file has {len(self.buf)})")
        start, self.off = self.off, self.off + n
        return start

    def scalar(self, dtype: str):
        dt = np.dtype(dtype)
        return np.frombuffer(self.buf, dt, 1, self.take(dt.itemsize))[0].item()

    def string(self) -> str:
        n = self.scalar("<u8")
        start = self.take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise FtcoreError(f"{self.path}: corrupt GGUF header (invalid UTF-8 string at byte {start})")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("<u4"), self.scalar("<u8")
            if etype in _VALUE_DTYPES:  # numeric arrays in one go
                dt = np.dtype(_VALUE_DTYPES[etype])
                return np.frombuffer(self.buf, dt, n, self.take(n * dt.itemsize)).tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype not in _VALUE_DTYPES:
            raise FtcoreError(f"{self.path}: corrupt GGUF header (unknown value type {vtype} at byte {self.off})")
        return self.scalar(_VALUE_DTYPES[vtype])


class GGUFReader:
    """A memory-mapped GGUF file: `metadata` (key -> python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FtcoreError(f"{self.path}: GGUF file not found")
        with open(self.path, "rb") as f:
            if f.read(4) != _MAGIC:
                raise FtcoreError(f"{self.path}: not a GGUF file (expected magic bytes b'GGUF')")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._mm)
        cur = _Cursor(self._mm, self.path)
        cur.take(4)
        self.version = cur.scalar("<u4")
        if self.version not in (2, 3):
            raise FtcoreError(f"{self.path}: unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors, n_kv = cur.scalar("<u8"), cur.scalar("<u8")
        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<u4"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<u8") for _ in range(cur.scalar("<u4"))]
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), cur.scalar("<u4"), cur.scalar("<u8"))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise FtcoreError(f"{self.path}: general.alignment must be a positive integer, got {align!r}")
        self.data_start = -(-cur.off // align) * align

    def require(self, key: str):
        if key not in self.metadata:
            raise FtcoreError(f"{self.path}: missing required metadata key '{key}'")
        return self.metadata[key]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view of the file; checks the type and that the data is in bounds."""
        info = self.tensors[name]
        if info.ggml_type not in quants.SUPPORTED:
            supported = ", ".join(quants.type_name(t) for t in quants.SUPPORTED)
            raise FtcoreError(f"{self.path}: tensor '{name}' has type {quants.type_name(info.ggml_type)}, "
                              f"which ftcore cannot dequantize (supported: {supported})")
        block, size = quants.block_layout(info.ggml_type)
        row = info.shape[-1] if info.shape else 1
        if row % block:
            raise FtcoreError(f"{self.path}: tensor '{name}' has rows of {row} elements, "
                              f"not a multiple of the {quants.type_name(info.ggml_type)} block size {block}")
        nbytes = math.prod(info.shape) // block * size
        start = self.data_start + info.offset
        if start + nbytes > self.size:
            raise FtcoreError(f"{self.path}: truncated file: data of tensor '{name}' ends at byte "
                              f"{start + nbytes}, but the file has {self.size} bytes")
        return np.frombuffer(self._mm, np.uint8, nbytes, start)

    def release(self, name: str):
        """Drop the pages of one tensor from memory after it was copied elsewhere (keeps the loading peak ~1x)."""
        info = self.tensors[name]
        block, size = quants.block_layout(info.ggml_type)
        begin = self.data_start + info.offset
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE  # a read-only map: a page dropped early is just read again
        stop = begin + math.prod(info.shape) // block * size
        if stop > start and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 copy of a tensor, in numpy shape order."""
        info = self.tensors[name]
        return quants.dequantize(self.raw(name), info.ggml_type, info.shape)

    def close(self):
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the map goes away with it
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's Q/K row permutation (interleaved RoPE pairs -> HF's rotate-half halves).

    llama.cpp: w.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2); here the inverse, (n_head, hd // 2, 2, *rest).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(x: float) -> float:
    """Shortest decimal of a float32 metadata value (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama3_rope_factors(theta, head_dim, factor, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192) -> np.ndarray:
    """Per-frequency wavelength multipliers that convert_hf_to_gguf.py stores as `rope_freqs.weight`."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim/2,)
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1 / ((1 - smooth) / factor + smooth)
    high_wl = original_max_position_embeddings / high_freq_factor
    low_wl = original_max_position_embeddings / low_freq_factor
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, mid)).astype(np.float32)


def _rope_parameters(r: GGUFReader, theta: float, head_dim: int) -> dict:
    """HF `rope_parameters` from rope.scaling.* keys or a llama3-style `rope_freqs.weight` tensor."""
    scaling = r.metadata.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in r.tensors:
        got = r.tensor("rope_freqs.weight").reshape(-1)
        orig = r.metadata.get("llama.rope.scaling.original_context_length", 8192)
        params = {"factor": float(got.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": orig}
        if got.shape != (head_dim // 2,) or not np.allclose(got, llama3_rope_factors(theta, head_dim, **params),
                                                            rtol=1e-4):
            raise FtcoreError(f"{r.path}: tensor 'rope_freqs.weight' does not match llama3 rope scaling "
                              f"(low/high freq factor 1/4, original context {orig}); cannot express it in config.json")
        return {"rope_type": "llama3", "rope_theta": theta, **params}
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": _f32(r.require("llama.rope.scaling.factor"))}
    raise FtcoreError(f"{r.path}: llama.rope.scaling.type '{scaling}' is not supported (supported: none, linear)")


def llama_config(r: GGUFReader) -> dict:
    """config.json contents (HF LlamaForCausalLM) from the GGUF's llama.* metadata."""
    arch = r.require("general.architecture")
    if arch != "llama":
        raise FtcoreError(f"{r.path}: general.architecture is '{arch}'; ftcore imports only 'llama' GGUF files")
    hidden, n_heads = r.require("llama.embedding_length"), r.require("llama.attention.head_count")
    head_dim = r.metadata.get("llama.attention.key_length", hidden // n_heads)
    if r.metadata.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise FtcoreError(f"{r.path}: llama.rope.dimension_count must equal the head dim {head_dim} (partial RoPE)")
    theta = _f32(r.metadata.get("llama.rope.freq_base", 10000.0))
    md = r.metadata
    ids = {k: md.get(f"tokenizer.ggml.{g}_token_id") for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": r.require("llama.feed_forward_length"),
        "num_hidden_layers": r.require("llama.block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": md.get("llama.attention.head_count_kv", n_heads), "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": _f32(r.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta, "rope_parameters": _rope_parameters(r, theta, head_dim),
        "max_position_embeddings": r.require("llama.context_length"),
        "vocab_size": md.get("llama.vocab_size") or len(r.require("tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in r.tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
        "torch_dtype": "float32", "dtype": "float32",
    }


_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def tensor_plan(r: GGUFReader, cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(hf_name, gguf_name, shape)] for every weight, after checking names, shapes, types and bounds."""
    h, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h),
              "attn_output": (h, q), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    want = {"token_embd.weight": ("model.embed_tokens.weight", (v, h)),
            "output_norm.weight": ("model.norm.weight", (h,))}
    if not cfg["tie_word_embeddings"]:
        want["output.weight"] = ("lm_head.weight", (v, h))
    for i in range(cfg["num_hidden_layers"]):
        for g, hf in _LAYER_NAMES.items():
            want[f"blk.{i}.{g}.weight"] = (f"model.layers.{i}.{hf}.weight", shapes[g])
    for name in r.tensors:
        if name not in want and name != "rope_freqs.weight":
            raise FtcoreError(f"{r.path}: unexpected tensor '{name}' in a llama GGUF")
    plan = []
    for name, (hf, shape) in want.items():
        if name not in r.tensors:
            raise FtcoreError(f"{r.path}: missing tensor '{name}'")
        if r.tensors[name].shape != shape:
            raise FtcoreError(f"{r.path}: tensor '{name}' has shape {r.tensors[name].shape}, expected {shape}")
        r.raw(name)  # fail before writing anything on unsupported types or truncated data
        plan.append((hf, name, shape))
    return sorted(plan)


def _load_hf_tensor(r: GGUFReader, cfg: dict, name: str) -> np.ndarray:
    w = r.tensor(name)
    if name.endswith("attn_q.weight"):
        return unpermute_qk(w, cfg["num_attention_heads"])
    if name.endswith("attn_k.weight"):
        return unpermute_qk(w, cfg["num_key_value_heads"])
    return w


def _write_safetensors(path: Path, r: GGUFReader, cfg: dict, plan) -> None:
    """Stream float32 tensors into a safetensors file, one tensor in memory at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for hf, _, shape in plan:
        n = math.prod(shape) * 4
        header[hf] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for _, name, _ in plan:
            fh.write(np.ascontiguousarray(_load_hf_tensor(r, cfg, name), dtype="<f4").data)


# tokenizer.ggml.pre -> HF pre-tokenizers applied before byte-level encoding (llama.cpp llama-vocab.cpp).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": [_BYTE_LEVEL], "gpt-2": [_BYTE_LEVEL], "gpt2": [_BYTE_LEVEL],
    **{k: [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]
       for k in ("smollm", "starcoder", "refact", "codeshell")},
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                  {**_BYTE_LEVEL, "use_regex": False}],
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added tokens


def build_tokenizer_json(r: GGUFReader, add_bos: bool) -> str:
    """A `tokenizers` byte-level BPE tokenizer (JSON) rebuilt from tokenizer.ggml.tokens/merges/token_type."""
    import tokenizers

    model = r.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise FtcoreError(f"{r.path}: tokenizer.ggml.model '{model}' is not supported (only byte-level BPE 'gpt2')")
    pre = r.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise FtcoreError(f"{r.path}: tokenizer.ggml.pre '{pre}' is not supported "
                          f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens, merges = r.require("tokenizer.ggml.tokens"), r.require("tokenizer.ggml.merges")
    types = r.metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": t != _CONTROL, "special": t == _CONTROL}
             for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    post = {**_BYTE_LEVEL, "trim_offsets": False}
    if add_bos:
        bos_id = r.require("tokenizer.ggml.bos_token_id")
        bos = tokens[bos_id]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": _PRE_TOKENIZERS[pre]},
        "post_processor": post, "decoder": _BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe", "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(doc)).to_str()
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise FtcoreError(f"{r.path}: could not build a tokenizer from tokenizer.ggml.*: {e}") from None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def import_gguf(gguf_path, out_dir, weights: bool = True) -> Path:
    """Convert a llama GGUF into an HF-layout directory (float32 safetensors + tokenizer files).

    `out_dir` must not exist or be empty; it appears complete or not at all. weights=False: all but
    model.safetensors (model.quantize=gguf reads the weights from the GGUF itself).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FtcoreError(f"{out_dir}: output directory exists and is not empty; remove it or pick another")
    with GGUFReader(gguf_path) as r:
        cfg = llama_config(r)
        plan = tensor_plan(r, cfg)
        md, tokens = r.metadata, r.require("tokenizer.ggml.tokens")
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
        tok_json = build_tokenizer_json(r, add_bos)
        name = lambda key: tokens[md[key]] if key in md else None
        eos_ids = sorted({md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                          "tokenizer.ggml.eom_token_id") if k in md})
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model dir
        try:
            if weights:
                _write_safetensors(tmp / "model.safetensors", r, cfg, plan)
            _write_json(tmp / "config.json", cfg)
            _write_json(tmp / "generation_config.json", {
                "bos_token_id": cfg["bos_token_id"], "pad_token_id": cfg["pad_token_id"],
                "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None})
            (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
            _write_json(tmp / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
                "pad_token": name("tokenizer.ggml.padding_token_id"),
                "unk_token": name("tokenizer.ggml.unknown_token_id"),
                "add_bos_token": add_bos, "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
                "clean_up_tokenization_spaces": False, "model_max_length": cfg["max_position_embeddings"],
                "chat_template": md.get("tokenizer.chat_template")})
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above); rename() cannot replace it portably
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def cached_import(gguf_path, cache_root=None, weights: bool = True) -> Path:
    """Import `gguf_path` once into `<cache_root>/<stem>-<hash of size, mtime, path, IMPORT_VERSION>`; reuse it.

    `cache_root` defaults to `$FTCORE_CACHE/gguf` or `~/.cache/ftcore/gguf`. weights=False: the tokenizer
    and config files only, in `<...>-tokenizer` (or the full import when there is one).
    """
    path = Path(gguf_path).resolve()
    if not path.is_file():
        raise FtcoreError(f"{path}: GGUF file not found")
    if cache_root is None:
        cache_root = Path(os.environ.get("FTCORE_CACHE") or "~/.cache/ftcore").expanduser() / "gguf"
    st = path.stat()
    key = hashlib.sha256(f"{IMPORT_VERSION}:{st.st_size}:{st.st_mtime_ns}:{path}".encode()).hexdigest()[:12]
    out, files = Path(cache_root) / f"{path.stem}-{key}", OUTPUT_FILES
    if all((out / f).is_file() for f in files):
        return out
    if not weights:
        out, files = out.with_name(f"{out.name}-tokenizer"), TOKENIZER_OUTPUT
        if all((out / f).is_file() for f in files):
            return out
    if out.exists():  # left by something other than import_gguf (which renames complete dirs only)
        shutil.rmtree(out)
    try:
        return import_gguf(path, out, weights)
    except (FtcoreError, OSError):
        if all((out / f).is_file() for f in files):  # another process won the race
            return out
        raise
