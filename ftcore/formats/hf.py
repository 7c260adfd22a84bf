"""Checkpoints in Hugging Face layout: config.json <-> ModelConfig, safetensors load/save, hub download.

Our parameter names are HF's without the leading `model.` (lm_head stays `lm_head`), so the
name map is one rule: `hf_name(ours)` / `our_name(hf)`.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from ftcore.errors import FtcoreError
from ftcore.formats.safetensors import SafetensorsFile, StreamedSafetensors
from ftcore.model import ModelConfig, Transformer
from ftcore.quant.gguf import not_a_gguf_file
from ftcore.quant.linear import Linear4bit, QuantSpec
from ftcore.schema import check_types
from ftcore.textfile import read_json_object

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Olmo2ForCausalLM": "olmo2", "SmolLM3ForCausalLM": "smollm3",
                 "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
                 "Phi3ForCausalLM": "phi3"}  # fmt: skip
GEMMA = ("gemma2", "gemma3_text")
# transformers' class defaults where they differ from the Llama ones this reader falls back to: a config.json that
# leaves a key out (transformers 4.x writes only the keys that differ from them) means these
FAMILY_DEFAULTS = {
    "qwen2": {"max_window_layers": 28, "sliding_window": 4096},
    "qwen3": {"max_window_layers": 28, "sliding_window": 4096, "head_dim": 128},
    "olmo2": {"rms_norm_eps": 1e-5},
    "smollm3": {"rope_theta": 2e6, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "query_pre_attn_scalar": 256, "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 256, "sliding_window": 4096, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                    "query_pre_attn_scalar": 256, "tie_word_embeddings": True},
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
}  # fmt: skip
DROPOUTS = ("attention_dropout", "resid_pdrop", "embd_pdrop")  # config.json's dropout rates: ftcore's decoder has none
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # config.json's hidden_act -> ModelConfig.mlp_act
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
CONFIG_TYPES = {  # the config.json keys read_config reads, with the JSON types they must have
    **dict.fromkeys(SIZES, int), "num_key_value_heads": int | None, "head_dim": int | None,
    "max_position_embeddings": int, "sliding_window": int | None, "rms_norm_eps": float, "rope_theta": float,
    "rope_parameters": dict | None, "rope_scaling": dict | None, "tie_word_embeddings": bool,
    "attention_bias": bool, "mlp_bias": bool, "use_sliding_window": bool, "architectures": list[str] | None,
    "model_type": str | None, "hidden_act": str, "layer_types": list[str] | None, "max_window_layers": int | None,
    "no_rope_layers": list[int] | None, "no_rope_layer_interval": int, "hidden_activation": str | None,
    "query_pre_attn_scalar": float | None, "final_logit_softcapping": float | None,
    "attn_logit_softcapping": float | None, "rope_local_base_freq": float,
    "use_bidirectional_attention": bool | None, "sliding_window_pattern": int,
    "original_max_position_embeddings": int, "partial_rotary_factor": float, **dict.fromkeys(DROPOUTS, float),
}  # fmt: skip


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    return name.removeprefix("model.")


def read_config(model_dir) -> tuple[ModelConfig, dict]:
    """Parse `config.json` into a ModelConfig; also return the raw dict (kept for saving)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FtcoreError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    hf = read_json_object(path)
    return config_from_hf(hf, path), hf


def config_from_hf(hf: dict, path) -> ModelConfig:
    """A ModelConfig from config.json's contents (path: where they come from, for the error messages)."""
    check_types(hf, CONFIG_TYPES, path)
    for key in SIZES:
        if key not in hf:
            raise FtcoreError(f"{path}: missing key {key!r}")
        if hf[key] <= 0:
            raise FtcoreError(f"{path}: {key}={hf[key]}: expected a positive integer")
    by_type = {v: k for k, v in ARCHITECTURES.items()}
    archs = hf.get("architectures") or [by_type.get(hf.get("model_type"), str(hf.get("model_type")))]
    if archs[0] not in ARCHITECTURES:
        raise FtcoreError(
            f"{path}: unsupported architecture {archs[0]!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    model_type = ARCHITECTURES[archs[0]]
    hf = {**FAMILY_DEFAULTS.get(model_type, {}), **hf}
    if hf.get("use_bidirectional_attention"):
        raise FtcoreError(f"{path}: use_bidirectional_attention=true (an encoder) unsupported; "
                          "expected a causal decoder")  # fmt: skip
    for key in DROPOUTS:
        if hf.get(key, 0.0) != 0.0:
            raise FtcoreError(f"{path}: {key}={hf[key]} unsupported (ftcore's decoder has no dropout layers); "
                              "expected 0.0")  # fmt: skip
    act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"  # Gemma's, or everyone's
    act = hf.get(act_key, "silu")
    if act not in ACTIVATIONS:
        raise FtcoreError(f"{path}: {act_key} {act!r} unsupported; supported: {', '.join(ACTIVATIONS)}")
    # transformers >= 5 writes rope_parameters; older checkpoints write rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    local_theta = hf["rope_local_base_freq"] if model_type == "gemma3_text" else 0.0
    if "full_attention" in rope:  # Gemma 3 (transformers >= 5): RoPE per layer type; the sliding layers' unscaled
        local = dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise FtcoreError(f"{path}: rope_parameters.sliding_attention.rope_type {local['rope_type']!r} "
                              "unsupported; supported: default")  # fmt: skip
        local_theta = local.get("rope_theta", 10000.0)
        rope = dict(rope["full_attention"])
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rotary = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))  # only Phi-3's code reads it
    check_types({"rope_parameters.rope_theta": theta, "rope_parameters.partial_rotary_factor": rotary},
                {"rope_parameters.rope_theta": float, "rope_parameters.partial_rotary_factor": float}, path)
    if model_type == "phi3" and rope.get("rope_type") in ("su", "yarn"):  # Phi-3's old names for LongRoPE
        rope["rope_type"] = "longrope"
    if rope.get("rope_type") in ("llama3", "longrope"):  # the pretraining context (Phi-3's top-level key wins)
        if model_type == "phi3":
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    attention_bias = hf.get("attention_bias", False)
    nope = []
    if model_type == "smollm3":  # no_rope_layers[i] = 1: layer i uses RoPE (default: every 4th one does not)
        n, every = hf["num_hidden_layers"], hf.get("no_rope_layer_interval", 4)
        uses = hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]
        if len(uses) != n:
            raise FtcoreError(f"{path}: no_rope_layers has {len(uses)} entries for num_hidden_layers={n}")
        nope = [i for i, use in enumerate(uses) if not use]
    sliding, layer_types = windows(hf, model_type, nope)
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else {},
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", model_type in GEMMA),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=sliding,
            layer_types=layer_types,
            qk_norm={"qwen3": "head", "olmo2": "proj", "gemma3_text": "head"}.get(model_type, ""),
            block_norms="post" if model_type == "olmo2" else "sandwich" if model_type in GEMMA else "pre",
            nope_layers=nope,
            mlp_act=ACTIVATIONS[act],
            norm_style="float32_scale" if model_type == "olmo2" else "unit_offset" if model_type in GEMMA else "llama",
            rope_local_theta=local_theta,
            fused_projections=model_type == "phi3",
            partial_rotary_factor=rotary if model_type == "phi3" else 1.0,
            **(gemma(hf) if model_type in GEMMA else {}),
        )
    except FtcoreError as e:  # a value ModelConfig refuses (heads not a multiple of the kv heads, a rope type)
        raise FtcoreError(f"{path}: {e}") from None
    return cfg


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not weight_map:
            raise FtcoreError(f"{index}: no 'weight_map'")
        check_types({"weight_map": weight_map}, {"weight_map": dict[str, str]}, index)
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = [model_dir / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FtcoreError(f"{model_dir}: missing weights file {f.name}")
    return files


def load_weights(model: Transformer, model_dir, dtype=torch.float32, device="cpu", quant: QuantSpec | None = None):
    """Assign the checkpoint's tensors to a (meta-device) model with strict name and shape checks.

    Tensors already in `dtype` on CPU stay zero-copy mmap views; otherwise each is converted and
    its mmap pages released at once, so the peak stays near one copy of the weights.
    quant: the decoder's linear weights become Linear4bit layers, each quantized as it is read (then its
    pages are released), so the peak is the quantized model plus about one full-precision tensor.
    """
    quantized = set() if quant is None else {hf_name(f"{n}.weight") for n in decoder_linears(model)}
    state, four_bit = {}, {}
    for name, (st, stored) in checkpoint_tensors(model_dir, model).items():
        t = st.get(stored)
        if stored in quantized:
            four_bit[name] = Linear4bit.from_weight(t.to(device), None, quant, f"{st.path}: {stored}", dtype)
            st.release(stored)
            continue
        if t.dtype != dtype or torch.device(device).type != "cpu":
            t = t.to(device=device, dtype=dtype, copy=True)
            st.release(stored)
        state[name] = t
    for weight_name, layer in four_bit.items():  # swap each nn.Linear for its 4-bit layer, with its bias
        module = weight_name.removesuffix(".weight")
        bias = state.pop(f"{module}.bias", None)
        layer.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        parent, _, leaf = module.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_buffers(torch.device(device))
    return model


def decoder_linears(model: Transformer) -> list[str]:
    """The decoder blocks' nn.Linear layers (what model.quantize stores 4-bit; embeddings and lm_head stay)."""
    return [n for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, torch.nn.Linear)]


def resolve(path_or_repo_id) -> Path:
    """Turn a model reference into a local HF-layout directory.

    Accepts a local directory, a `.gguf` file (imported once into the cache), `pkg://package/file`
    (a file inside an installed Python package, located without importing it), or a hub repo id.
    """
    ref = _local_ref(path_or_repo_id)
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise FtcoreError(f"{path}: GGUF file not found")
        from ftcore.formats.gguf import cached_import

        return cached_import(path)
    if path.is_dir():
        return path
    looks_local = path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") != 1 or path.exists()
    if looks_local:
        raise FtcoreError(f"{ref}: model directory not found")
    return download(ref)


def _local_ref(path_or_repo_id) -> str:
    """`pkg://package/file` -> the file's path inside the installed package (located without importing it)."""
    ref = str(path_or_repo_id)
    if ref.startswith("pkg://"):
        pkg, _, rel = ref[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FtcoreError(f"{ref}: Python package {pkg!r} is not installed")
        ref = str(Path(list(spec.submodule_search_locations)[0]) / rel)
    return ref


def gguf_file(path_or_repo_id) -> Path:
    """The .gguf file model.quantize=gguf reads (a path or pkg://...); anything else fails in one line."""
    ref = _local_ref(path_or_repo_id)
    if not ref.endswith(".gguf"):
        raise not_a_gguf_file(path_or_repo_id)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FtcoreError(f"{path}: GGUF file not found")
    return path


def load_gguf(path_or_repo_id, dtype=torch.float32, device="cpu") -> Transformer:
    """model.quantize=gguf: the model straight from a GGUF file, its weights kept in the file's blocks
    (ftcore/quant/gguf.py); never a full-precision copy of a quantized weight."""
    from ftcore.formats.gguf import GGUFReader, llama_config
    from ftcore.quant.gguf import load_gguf_weights

    path = gguf_file(path_or_repo_id)
    with GGUFReader(path) as r:
        hf = llama_config(r)
        model = load_gguf_weights(build_model(config_from_hf(hf, path)), r, hf, dtype, device)
    model.hf_config = hf
    return model


def download(repo_id: str) -> Path:
    """Fetch config, tokenizer and safetensors of a hub repo (honours HF_HUB_OFFLINE and the HF cache)."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline-and-not-cached: all user-facing
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtcoreError(f"{repo_id}: not a local directory and could not be fetched from the hub ({msg})") from None


def build_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def load_model(path_or_repo_id, dtype=torch.float32, device="cpu", quant: QuantSpec | None = None) -> Transformer:
    if quant is not None and quant.quant_type == "gguf":
        return load_gguf(path_or_repo_id, dtype, device)
    model_dir = resolve(path_or_repo_id)
    cfg, hf = read_config(model_dir)
    model = load_weights(build_model(cfg), model_dir, dtype, device, quant)
    model.hf_config = hf  # kept so a save writes back the same config.json
    return model


def load_meta(path_or_repo_id, dtype=torch.float32):
    """(model on the meta device, tokenizer, model dir): the architecture, its parameters in `dtype`, without
    their values, which a sharded load reads later (ftcore/train/sharded_load.py), each rank its own shards only."""
    from ftcore.formats.tokenizer import Tokenizer

    model_dir = resolve(path_or_repo_id)
    cfg, hf = read_config(model_dir)
    model = build_model(cfg)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.tie_weights()
    model.hf_config = hf
    return model, Tokenizer.from_dir(model_dir), model_dir


def checkpoint_tensors(model_dir, model: Transformer) -> dict[str, tuple[SafetensorsFile, str]]:
    """The checkpoint's tensors by our parameter name -> (the open safetensors file, the name there), checked
    against the model's parameters (a meta-device model will do): none unexpected, none missing, the same whole
    shapes. A stored lm_head of tied embeddings is skipped, as HF skips it."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied lm_head appears once
    tensors = {}
    for st in map(SafetensorsFile, _shard_files(Path(model_dir))):
        for stored in st.names():
            if model.cfg.tie_word_embeddings and stored == "lm_head.weight":
                continue
            name = our_name(stored)
            if name not in expected:
                raise FtcoreError(f"{st.path}: unexpected tensor {stored!r} (not a parameter of this model)")
            if st.shape(stored) != expected[name]:
                raise FtcoreError(f"{st.path}: tensor {stored!r} has shape {list(st.shape(stored))}, expected "
                                  f"{list(expected[name])}")  # fmt: skip
            tensors[name] = (st, stored)
    missing = sorted(hf_name(n) for n in set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FtcoreError(f"{model_dir}: checkpoint is missing tensor {missing[0]!r}{more}")
    return tensors


def load_pretrained(path_or_repo_id, dtype=torch.float32, device="cpu", quant: QuantSpec | None = None):
    """Load (model, tokenizer) from a local directory, a .gguf file, `pkg://...` or a hub repo id."""
    from ftcore.formats.tokenizer import Tokenizer

    if quant is not None and quant.quant_type == "gguf":  # the tokenizer files imported once, no fp32 weights
        from ftcore.formats.gguf import cached_import

        model = load_gguf(path_or_repo_id, dtype, device)
        return model, Tokenizer.from_dir(cached_import(gguf_file(path_or_repo_id), weights=False))
    model_dir = resolve(path_or_repo_id)
    return load_model(model_dir, dtype, device, quant), Tokenizer.from_dir(model_dir)


def save_pretrained(model: Transformer, out_dir, tokenizer=None, max_shard_bytes: int = 4 << 30,
                    whole=None, writer: bool = True):  # fmt: skip
    """Write config.json and (sharded) model.safetensors in HF layout, atomically as a directory.

    Tensors are written one at a time. A sharded model: every rank calls this together with `whole` (a
    parameter -> its whole tensor, a collective, e.g. parallel.whole_tensor) and `writer` true on one rank
    only, which then holds one whole tensor at a time, never the model.
    """
    out_dir = Path(out_dir)
    params = {hf_name(n): p for n, p in model.named_parameters(remove_duplicate=True)}
    shards, cur, size = [], {}, 0
    for name, p in params.items():
        nbytes = p.numel() * p.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = p
        size += nbytes
    shards.append(cur)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]  # fmt: skip
    tmp = None
    if writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        hf = dict(getattr(model, "hf_config", None) or config_to_hf(model.cfg))
        hf["torch_dtype"] = hf["dtype"] = str(next(iter(params.values())).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    try:
        for fname, shard in zip(names, shards):
            specs = {k: (tuple(p.shape), p.dtype) for k, p in shard.items()}  # a DTensor's shape is the whole one's
            with StreamedSafetensors(tmp / fname, specs) if writer else nullcontext() as out:
                for name, p in shard.items():
                    t = p.detach() if whole is None else whole(p)
                    if out is not None:
                        out.write(name, t)
                    del t
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not writer:
        return out_dir
    if len(shards) > 1:
        total = sum(p.numel() * p.element_size() for p in params.values())
        weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def gemma(hf: dict) -> dict:
    """Gemma 2/3's ModelConfig fields beyond the shared ones."""
    scalar = hf.get("query_pre_attn_scalar") or 256
    return dict(embed_scale=hf["hidden_size"] ** 0.5,
                attn_scale=scalar**-0.5, attn_softcap=hf.get("attn_logit_softcapping") or 0.0,
                logit_softcap=hf.get("final_logit_softcapping") or 0.0)  # fmt: skip


def windows(hf: dict, model_type: str, nope: list[int]) -> tuple[int, list[str]]:
    """(sliding_window, layer_types) as transformers reads them: Mistral slides on every layer; Gemma on its
    pattern's layers; Qwen2/3 and SmolLM3 only with use_sliding_window, on the layers layer_types names (by
    default Qwen's from max_window_layers on, SmolLM3's NoPE layers). Llama and OLMo 2 never slide. Phi-3 as
    Mistral."""
    if model_type in ("mistral", "phi3"):
        return hf.get("sliding_window") or 0, []
    if model_type in GEMMA:  # default: Gemma 2 every other layer from the first, Gemma 3 five of every six
        n = hf["num_hidden_layers"]
        every = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention"
                                          for i in range(n)]  # fmt: skip
        return hf.get("sliding_window") or 0, list(types)
    if model_type not in ("qwen2", "qwen3", "smollm3") or not hf.get("use_sliding_window"):
        return 0, []
    window, n = hf.get("sliding_window") or 0, hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None and model_type == "smollm3":
        types = ["sliding_attention" if i in nope else "full_attention" for i in range(n)]
    if types is None:
        first = hf.get("max_window_layers") or 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return window, list(types)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json for a model that was not loaded from one (e.g. built in a test)."""
    if cfg.fused_projections:
        arch = "Phi3ForCausalLM"
    elif cfg.qk_norm or cfg.nope_layers or cfg.layer_types:
        arch = {"head": "Qwen3ForCausalLM", "proj": "Olmo2ForCausalLM"}.get(cfg.qk_norm, "SmolLM3ForCausalLM")
    else:
        arch = "Qwen2ForCausalLM" if cfg.qkv_bias and not cfg.o_bias else "LlamaForCausalLM"
    hf = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **cfg.rope_scaling},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "Phi3ForCausalLM":
        hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        hf.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # not Phi-3's tokenizer's (32000: > vocab)
        hf.update(sliding_window=cfg.sliding_window or None, partial_rotary_factor=cfg.partial_rotary_factor,
                  original_max_position_embeddings=cfg.rope_scaling.get("original_max_position_embeddings",
                                                                        cfg.max_position_embeddings))  # fmt: skip
    elif arch != "Qwen2ForCausalLM":
        hf.update(attention_bias=cfg.o_bias)
    if cfg.layer_types:
        hf.update(use_sliding_window=True, sliding_window=cfg.sliding_window, layer_types=cfg.layer_types)
    if arch == "SmolLM3ForCausalLM":
        hf["no_rope_layers"] = [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)]
    if config_from_hf(hf, "config.json") != cfg:  # e.g. Gemma's switches set by hand: no family has them all
        raise FtcoreError("save_pretrained: this ModelConfig has no config.json that ftcore writes (it reads "
                          "back otherwise); save a model loaded from a Hugging Face directory, which keeps its own")
    return hf
