"""Adapters on disk in HF PEFT's format, both ways: adapter_config.json + adapter_model.safetensors.

Tensor names are PEFT's (adapter name `default` stripped, as PEFT saves them):

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight       [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight       [out, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector   [out]      (DoRA)
    base_model.model.model.layers.0.mlp.down_proj.ia3_l                  [1, in] / [out, 1] (IA3)
    base_model.model.model.layers.0.self_attn.q_proj.hra_u               [in, r] (HRA)
    base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight  [D] (LN tuning: the tuned copy)
    base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a           [out, r] (LoHa: w1_a, w1_b, w2_a, w2_b)
    base_model.model.model.layers.0.self_attn.q_proj.lokr_w1             [a, c] (LoKr: w1 or w1_a/w1_b, w2 or w2_a/w2_b)
    base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight        [n_blocks or 1, b (b - 1) / 2] (OFT)
    base_model.model.model.layers.0.self_attn.q_proj.lily_A.weight       [r, in] (Lily: also lily_B.weight
                                        [num_B * r, out], lily_router.weight [num_B, r]; the shared A and B under
                                        every layer that uses them, as PEFT saves them)
    base_model.model.model.layers.0.self_attn.q_proj.boft_R              [m, D, H, H] (BOFT; and boft_s [out, 1])
    prompt_embeddings                                                    [P, 2*L*n_kv*hd] (prefix) / [P, D] (prompt)
                                        (P-tuning: its encoder's output [P, D], loaded back as fixed soft tokens)
"""

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.formats.safetensors import SafetensorsFile, save_safetensors
from ftcore.peft.attach import adapter_layers, apply, peft_key, unload
from ftcore.peft.config import PISSA_NITER, PeftConfig, is_principal
from ftcore.peft.lora_init import converted_tensors
from ftcore.schema import check_types
from ftcore.textfile import read_json_object

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning",
              "VERA": "vera", "HIRA": "hira", "HRA": "hra", "LOHA": "loha", "LOKR": "lokr", "ADALORA": "adalora",
              "OFT": "oft", "BOFT": "boft", "LILY": "lily", "LN_TUNING": "ln_tuning"}
PROMPT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}
# PEFT features we do not implement: loading them would silently compute something else.
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules", "modules_to_save",
               "fan_in_fan_out", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
               "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "velora_config",
               "monteclora_config", "kasa_config")
NO_VALUES = (None, False, {}, [], "none", "")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (live Parameters, not copies)."""
    method = _method(model)
    if method == "prefix":
        return {"prompt_embeddings": model.prefix_encoder.flat()}
    if method == "prompt":
        return {"prompt_embeddings": model.prompt_encoder.embedding.weight}
    if method == "ptuning":  # the encoder's output, as PEFT saves it (get_prompt_embedding_to_save)
        return {"prompt_embeddings": model.prompt_encoder.saved_output()}
    state = {f"base_model.model.{peft_key(name)}.{suffix}": t
             for name, layer in adapter_layers(model).items() for suffix, t in layer.adapter_tensors().items()}
    if method == "vera" and model.peft_config.save_projection:  # the shared matrices, once
        state.update({"base_model.vera_A": model.vera_projections.vera_A,
                      "base_model.vera_B": model.vera_projections.vera_B})  # fmt: skip
    return state


def _method(model) -> str:
    cfg = getattr(model, "peft_config", None)
    if cfg is None or cfg.method in ("none", "full"):
        what = "no adapter" if cfg is None or cfg.method == "none" else "full fine-tuning (no adapter)"
        raise FtcoreError(f"save_adapter: the model has {what}; use ftcore.save_pretrained for a full model")
    return cfg.method


def peft_config_dict(model: nn.Module) -> dict:
    """adapter_config.json for the attached method, with PEFT's field names and values."""
    cfg, mcfg = model.peft_config, model.cfg
    common = {"base_model_name_or_path": cfg.base_model_name_or_path or None, "revision": None,
              "task_type": "CAUSAL_LM", "inference_mode": True, "modules_to_save": None, "auto_mapping": None}
    if cfg.method in ("lora", "dora"):
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        return {**common, "peft_type": "LORA", "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
                "target_modules": cfg.target_modules, "use_rslora": cfg.use_rslora,
                "use_dora": cfg.method == "dora",
                "init_lora_weights": {"kaiming-uniform": True}.get(cfg.init, cfg.init),
                "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "exclude_modules": None,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    if cfg.method == "vera":
        return {**common, "peft_type": "VERA", "r": cfg.r, "target_modules": cfg.target_modules,
                "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
                "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "fan_in_fan_out": False, "bias": "none",
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
    if cfg.method == "lily":
        return {**common, "peft_type": "LILY", "r": cfg.r, "stride_A": cfg.stride_A, "num_B": cfg.num_B,
                "scaling": cfg.scaling, "target_modules": cfg.target_modules, "init_weights": cfg.init_weights,
                "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
    if cfg.method == "adalora":
        pattern = getattr(getattr(model, "adalora", None), "rank_pattern", None)
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        return {**common, "peft_type": "ADALORA", "r": 8, "init_r": cfg.init_r, "target_r": cfg.target_r,
                "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2,
                "orth_reg_weight": cfg.orth_reg_weight, "total_step": cfg.total_step or None, "lora_alpha": alpha,
                "lora_dropout": cfg.dropout, "target_modules": cfg.target_modules, "init_lora_weights": True,
                "use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
                "rank_pattern": {f"{peft_key(n)}.lora_E": kept for n, kept in pattern.items()} if pattern else None,
                "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}  # fmt: skip
    if cfg.method == "hira":
        return {**common, "peft_type": "HIRA", "r": cfg.r, "target_modules": cfg.target_modules,
                "hira_dropout": cfg.dropout, "init_weights": True if cfg.init == "kaiming-uniform" else "gaussian",
                "fan_in_fan_out": False, "exclude_modules": None, "layers_to_transform": None,
                "layers_pattern": None, "rank_pattern": {}}
    if cfg.method == "hra":
        return {**common, "peft_type": "HRA", "r": cfg.r, "apply_GS": cfg.apply_GS,
                "target_modules": cfg.target_modules, "init_weights": cfg.init == "kaiming-uniform", "bias": "none",
                "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}  # fmt: skip
    if cfg.method in ("loha", "lokr"):
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        lycoris = {**common, "peft_type": cfg.method.upper(), "r": cfg.r, "alpha": alpha,
                   "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
                   "target_modules": cfg.target_modules, "use_effective_conv2d": False, "exclude_modules": None,
                   "init_weights": True if cfg.init == "kaiming-uniform" else cfg.init, "layers_to_transform": None,
                   "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
        if cfg.method == "lokr":
            lycoris.update(decompose_both=cfg.decompose_both, decompose_factor=cfg.decompose_factor,
                           rank_dropout_scale=cfg.rank_dropout_scale)  # fmt: skip
        return lycoris
    if cfg.method == "ln_tuning":
        return {**common, "peft_type": "LN_TUNING", "target_modules": cfg.ln_tuning_target_modules,
                "exclude_modules": None}
    if cfg.method == "oft":
        # peft_version: PEFT warns on a Cayley-Neumann adapter that records none (from before PEFT 0.18's change)
        return {**common, "peft_type": "OFT", "peft_version": "0.21.2", "r": cfg.r,
                "oft_block_size": cfg.oft_block_size, "module_dropout": cfg.module_dropout,
                "target_modules": cfg.target_modules, "fan_in_fan_out": False, "bias": "none", "exclude_modules": None,
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "coft": cfg.coft,
                "eps": cfg.eps, "block_share": cfg.block_share, "use_cayley_neumann": cfg.use_cayley_neumann,
                "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms}  # fmt: skip
    if cfg.method == "boft":
        return {**common, "peft_type": "BOFT", "boft_block_size": cfg.boft_block_size,
                "boft_block_num": cfg.boft_block_num, "boft_n_butterfly_factor": cfg.boft_n_butterfly_factor,
                "boft_dropout": cfg.boft_dropout, "target_modules": cfg.target_modules, "init_weights": True,
                "fan_in_fan_out": False, "bias": "none", "exclude_modules": None, "layers_to_transform": None,
                "layers_pattern": None}  # fmt: skip
    if cfg.method == "ia3":
        return {**common, "peft_type": "IA3", "target_modules": cfg.ia3_target_modules,
                "feedforward_modules": cfg.feedforward_modules, "init_ia3_weights": True, "fan_in_fan_out": False,
                "exclude_modules": None}
    prompt_learning = {**common, "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
                       "num_layers": mcfg.num_layers}
    if cfg.method == "prefix":
        token_dim = mcfg.num_kv_heads * mcfg.head_dim  # PEFT's GQA convention
        return {**prompt_learning, "peft_type": "PREFIX_TUNING", "token_dim": token_dim,
                "num_attention_heads": mcfg.num_kv_heads, "prefix_projection": cfg.prefix_projection,
                "encoder_hidden_size": cfg.prefix_hidden_size or token_dim, "init_weights": None}
    if cfg.method == "ptuning":
        return {**prompt_learning, "peft_type": "P_TUNING", "token_dim": mcfg.hidden_size,
                "num_attention_heads": mcfg.num_heads,
                "encoder_reparameterization_type": cfg.encoder_reparameterization_type,
                "encoder_hidden_size": cfg.encoder_hidden_size or mcfg.hidden_size,
                "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout}
    return {**prompt_learning, "peft_type": "PROMPT_TUNING", "token_dim": mcfg.hidden_size,
            "num_attention_heads": mcfg.num_heads, "prompt_tuning_init": PROMPT_INITS[cfg.prompt_init],
            "prompt_tuning_init_text": cfg.init_text or None,
            "tokenizer_name_or_path": cfg.tokenizer_path or None, "tokenizer_kwargs": None}


def save_adapter(model: nn.Module, out_dir) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (fp32) that HF PEFT loads as-is.

    A PiSSA/OLoRA adapter is saved converted to a plain LoRA of rank 2r on the original base weights
    (PEFT's path_initial_model_for_weight_conversion; lora_init.py), so it applies to the unmodified base.
    Unlike PEFT, a DoRA magnitude is kept: W + s B'A' equals the trained W_res + s BA, so its norm is the same.
    """
    out_dir = Path(out_dir)
    state, seen = {}, set()
    for k, v in adapter_state(model).items():  # a tensor shared by layers (Lily) is written under each, as PEFT
        state[k] = v.detach().float().clone() if id(v) in seen else v.detach().float()
        seen.add(id(v))
    config = peft_config_dict(model)
    principal = {n: layer for n, layer in adapter_layers(model).items() if getattr(layer, "principal", False)}
    pattern = getattr(getattr(model, "adalora", None), "rank_pattern", None)
    for name, kept in (pattern or {}).items():  # AdaLoRA: only the kept triplets, as PEFT saves them
        key, idx = f"base_model.model.{peft_key(name)}", torch.tensor(kept, dtype=torch.bool)
        if state[f"{key}.lora_A"].shape[0] != len(kept):
            continue  # loaded pruned already
        state[f"{key}.lora_A"], state[f"{key}.lora_E"] = state[f"{key}.lora_A"][idx], state[f"{key}.lora_E"][idx]
        state[f"{key}.lora_B"] = state[f"{key}.lora_B"][:, idx]
    if principal:
        for name, layer in principal.items():
            a, b = converted_tensors(layer)
            key = f"base_model.model.{peft_key(name)}"
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a.float(), b.float()
        cfg = model.peft_config
        alpha = cfg.alpha * (2**0.5 if cfg.use_rslora else 2)  # the scaling stays alpha/r (or alpha/sqrt(r))
        config.update(r=2 * cfg.r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                      init_lora_weights=True)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out_dir / WEIGHTS)
    tmp = out_dir / f".{CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / CONFIG)
    return out_dir


def load_with_adapter(adapter_dir, base: str = "", dtype=torch.float32, device="cpu",
                      quant=None) -> tuple[nn.Module, object]:  # fmt: skip
    """(base model with the adapter attached, tokenizer). `base` defaults to the model the adapter
    records (adapter_config.json's base_model_name_or_path; ftcore's runs record model.path).
    quant: a QuantSpec to load the base 4-bit (model.quantize), as the adapter was trained."""
    cfg_path = Path(adapter_dir) / CONFIG
    if not cfg_path.is_file() and (Path(adapter_dir) / "config.json").is_file():
        raise FtcoreError(f"{adapter_dir}: a whole model, not an adapter (full fine-tuning saves one): load it as the model")
    if not cfg_path.is_file():
        raise FtcoreError(f"{adapter_dir}: no {CONFIG} (expected a PEFT adapter directory, e.g. <run>/final)")
    if not base:
        base = read_json_object(cfg_path).get("base_model_name_or_path") or ""
        if not base:
            raise FtcoreError(f"{cfg_path}: records no base_model_name_or_path; give the base model (--model)")
    from ftcore.formats.hf import load_pretrained

    model, tokenizer = load_pretrained(base, dtype=dtype, device=device, quant=quant)
    return load_adapter(model, adapter_dir), tokenizer


ADAPTER_CONFIG_TYPES = {  # the adapter_config.json keys config_from_peft reads, with their JSON types
    "peft_type": str, "r": int, "lora_alpha": float, "lora_dropout": float | None, "use_rslora": bool | None,
    "use_dora": bool | None, "init_lora_weights": bool | str, "target_modules": list[str] | str,
    "feedforward_modules": list[str] | str | None, "num_virtual_tokens": int, "num_transformer_submodules": int | None,
    "prompt_tuning_init": str | None, "prompt_tuning_init_text": str | None, "tokenizer_name_or_path": str | None,
    "base_model_name_or_path": str | None, "bias": str | None, "num_layers": int | None, "token_dim": int | None,
    "num_attention_heads": int | None, "projection_prng_key": int, "save_projection": bool,
    "vera_dropout": float | None, "d_initial": float, "hira_dropout": float | None, "init_weights": bool | str | None,
    "init_r": int, "target_r": int, "tinit": int, "tfinal": int, "deltaT": int, "beta1": float, "beta2": float,
    "orth_reg_weight": float, "total_step": int | None, "alpha": float, "rank_dropout": float | None,
    "module_dropout": float | None, "decompose_both": bool | None, "decompose_factor": int | None,
    "rank_dropout_scale": bool | None, "use_effective_conv2d": bool | None, "apply_GS": bool | None,
    "oft_block_size": int, "coft": bool | None, "eps": float | None, "block_share": bool | None,
    "use_cayley_neumann": bool | None, "num_cayley_neumann_terms": int | None, "stride_A": int, "num_B": int,
    "scaling": float, "encoder_reparameterization_type": str, "encoder_hidden_size": int | None,
    "encoder_num_layers": int | None, "encoder_dropout": float | None,
    "boft_block_size": int, "boft_block_num": int, "boft_n_butterfly_factor": int, "boft_dropout": float | None,
}  # fmt: skip


def config_from_peft(d: dict, where) -> PeftConfig:
    """Translate a PEFT adapter_config dict into our PeftConfig (unsupported features are errors, naming `where`)."""
    try:
        return _config_from_peft(d, where)
    except FtcoreError as e:
        if str(where) in str(e):
            raise
        raise FtcoreError(f"{where}: {e}") from None  # a value PeftConfig refuses (peft.r=0: expected ...)


def _config_from_peft(d: dict, where) -> PeftConfig:
    check_types(d, ADAPTER_CONFIG_TYPES, where)
    peft_type = d.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise FtcoreError(f"{where}: peft_type {peft_type!r} is not supported; supported: {', '.join(PEFT_TYPES)}")
    for key in UNSUPPORTED:
        if d.get(key) not in NO_VALUES and not (key == "rank_pattern" and peft_type == "ADALORA"):
            raise FtcoreError(f"{where}: {key}={d[key]!r} is not supported by ftcore (expected it unset)")
    if d.get("bias", "none") != "none":
        raise FtcoreError(f"{where}: bias={d['bias']!r} is not supported by ftcore (expected 'none')")
    base = d.get("base_model_name_or_path") or ""
    method = PEFT_TYPES[peft_type]
    if method == "lora":
        init = d.get("init_lora_weights", True)
        if init is True or init == "gaussian" or (isinstance(init, str) and is_principal(init)):
            init = "kaiming-uniform" if init is True else init
        else:
            raise FtcoreError(f"{where}: init_lora_weights={init!r} is not supported by ftcore "
                              "(expected true, 'gaussian', 'pissa', 'pissa_niter_<N>' or 'olora')")  # fmt: skip
        return PeftConfig(method="dora" if d.get("use_dora") else "lora", r=d["r"], alpha=d["lora_alpha"],
                          dropout=d.get("lora_dropout") or 0.0, target_modules=_targets(d["target_modules"]),
                          use_rslora=bool(d.get("use_rslora")), init=init, base_model_name_or_path=base)
    if method == "vera":
        if d.get("init_weights", True) is not True:
            raise FtcoreError(f"{where}: init_weights={d['init_weights']!r} is not supported by ftcore (expected true)")
        return PeftConfig(method="vera", r=d["r"], target_modules=_targets(d["target_modules"]),
                          projection_prng_key=d.get("projection_prng_key", 0),
                          save_projection=d.get("save_projection", True), dropout=d.get("vera_dropout") or 0.0,
                          d_initial=d.get("d_initial", 0.1), base_model_name_or_path=base)  # fmt: skip
    if method == "lily":
        init = d.get("init_weights", True)
        if not isinstance(init, bool):
            raise FtcoreError(f"{where}: init_weights={init!r} is not supported for Lily (expected true or false)")
        return PeftConfig(method="lily", r=d.get("r", 32), stride_A=d.get("stride_A", 1), num_B=d.get("num_B", 2),
                          scaling=d.get("scaling", 1.0), init_weights=init, target_modules=_targets(d["target_modules"]),
                          base_model_name_or_path=base)  # fmt: skip
    if method == "adalora":
        if d.get("init_lora_weights", True) is not True or d.get("use_dora") or d.get("use_rslora"):
            raise FtcoreError(f"{where}: init_lora_weights, use_dora and use_rslora must be unset for AdaLoRA "
                              "in ftcore")  # fmt: skip
        return PeftConfig(method="adalora", init_r=d.get("init_r", 12), target_r=d.get("target_r", 8),
                          tinit=d.get("tinit", 0), tfinal=d.get("tfinal", 0), deltaT=d.get("deltaT", 1),
                          beta1=d.get("beta1", 0.85), beta2=d.get("beta2", 0.85),
                          orth_reg_weight=d.get("orth_reg_weight", 0.5), total_step=d.get("total_step") or 0,
                          alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout") or 0.0,
                          target_modules=_targets(d["target_modules"]), base_model_name_or_path=base)  # fmt: skip
    if method == "hira":
        init = d.get("init_weights", True)
        if init is not True and init != "gaussian":
            raise FtcoreError(f"{where}: init_weights={init!r} is not supported by ftcore "
                              "(expected true or 'gaussian')")  # fmt: skip
        return PeftConfig(method="hira", r=d["r"], target_modules=_targets(d["target_modules"]),
                          dropout=d.get("hira_dropout") or 0.0, init="gaussian" if init == "gaussian" else
                          "kaiming-uniform", base_model_name_or_path=base)  # fmt: skip
    if method == "hra":
        init = d.get("init_weights", True)
        if not isinstance(init, bool):
            raise FtcoreError(f"{where}: init_weights={init!r} is not supported by ftcore for HRA "
                              "(expected true or false)")  # fmt: skip
        return PeftConfig(method="hra", r=d.get("r", 8), apply_GS=bool(d.get("apply_GS")),
                          target_modules=_targets(d["target_modules"]), init="kaiming-uniform" if init else "random",
                          base_model_name_or_path=base)  # fmt: skip
    if method in ("loha", "lokr"):
        init = d.get("init_weights", True)
        if init is not True and not (method == "lokr" and init == "lycoris"):
            expected = "true or 'lycoris'" if method == "lokr" else "true"
            raise FtcoreError(f"{where}: init_weights={init!r} is not supported by ftcore (expected {expected})")
        lycoris = dict(method=method, r=d["r"], alpha=d.get("alpha", 8), target_modules=_targets(d["target_modules"]),
                       rank_dropout=d.get("rank_dropout") or 0.0, module_dropout=d.get("module_dropout") or 0.0,
                       init="lycoris" if init == "lycoris" else "kaiming-uniform", base_model_name_or_path=base)
        if method == "lokr":  # (use_effective_conv2d is about Conv2d layers only: PEFT ignores it on Linear)
            factor = -1 if d.get("decompose_factor") is None else d["decompose_factor"]
            if factor != -1 and factor < 1:  # PEFT splits every dimension as 1 x dim then; ftcore refuses the value
                raise FtcoreError(f"{where}: decompose_factor={factor!r} is not supported by ftcore "
                                  "(expected -1 or a positive integer)")  # fmt: skip
            lycoris.update(decompose_both=bool(d.get("decompose_both")), decompose_factor=factor,
                           rank_dropout_scale=bool(d.get("rank_dropout_scale")))  # fmt: skip
        return PeftConfig(**lycoris)
    if method == "ln_tuning":
        return PeftConfig(method="ln_tuning", ln_tuning_target_modules=_targets(d["target_modules"]),
                          base_model_name_or_path=base)
    if method == "oft":
        if d.get("init_weights", True) is not True:
            raise FtcoreError(f"{where}: init_weights={d['init_weights']!r} is not supported by ftcore (expected true)")
        if "oft_block_size" not in d:  # PEFT's own check: the format before PEFT 0.14 (no longer loadable there)
            raise FtcoreError(f"{where}: no oft_block_size: an OFT adapter from before PEFT 0.14, in a format PEFT "
                              "0.21 no longer loads either (retrain it)")  # fmt: skip
        return PeftConfig(method="oft", r=d.get("r", 0), oft_block_size=d["oft_block_size"],
                          module_dropout=d.get("module_dropout") or 0.0, target_modules=_targets(d["target_modules"]),
                          coft=bool(d.get("coft")), eps=_or(d.get("eps"), 6e-5), block_share=bool(d.get("block_share")),
                          use_cayley_neumann=_or(d.get("use_cayley_neumann"), True),
                          num_cayley_neumann_terms=_or(d.get("num_cayley_neumann_terms"), 5),
                          base_model_name_or_path=base)  # fmt: skip
    if method == "boft":  # (init_weights only sets the initial values, which the file's tensors replace)
        return PeftConfig(method="boft", boft_block_size=d.get("boft_block_size", 4),
                          boft_block_num=d.get("boft_block_num", 0),
                          boft_n_butterfly_factor=d.get("boft_n_butterfly_factor", 1),
                          boft_dropout=d.get("boft_dropout") or 0.0, target_modules=_targets(d["target_modules"]),
                          base_model_name_or_path=base)  # fmt: skip
    if method == "ia3":
        targets = _targets(d["target_modules"])
        return PeftConfig(method="ia3", ia3_target_modules=targets,
                          feedforward_modules=_targets(d.get("feedforward_modules") or []), base_model_name_or_path=base)
    if (d.get("num_transformer_submodules") or 1) != 1:
        raise FtcoreError(f"{where}: num_transformer_submodules={d['num_transformer_submodules']} (expected 1)")
    if method == "prefix":
        # The saved prefix is already projected (PEFT folds the MLP when saving), so load it unprojected.
        return PeftConfig(method="prefix", num_virtual_tokens=d["num_virtual_tokens"], base_model_name_or_path=base)
    if method == "ptuning":
        # The saved soft tokens are the encoder's output: they load as fixed embeddings (load_fixed), whatever the
        # encoder was; its settings are kept for the record (PEFT ignores the MLP's layers and dropout: so do we).
        kind = str(d.get("encoder_reparameterization_type") or "MLP").upper()
        if kind not in ("MLP", "LSTM"):
            raise FtcoreError(f"{where}: encoder_reparameterization_type={kind!r} is not supported (expected MLP or LSTM)")
        lstm = kind == "LSTM"
        return PeftConfig(method="ptuning", num_virtual_tokens=d["num_virtual_tokens"],
                          encoder_reparameterization_type=kind, encoder_hidden_size=d.get("encoder_hidden_size") or 0,
                          encoder_num_layers=(d.get("encoder_num_layers") or 2) if lstm else 2,
                          encoder_dropout=(d.get("encoder_dropout") or 0.0) if lstm else 0.0,
                          base_model_name_or_path=base)  # fmt: skip
    init = {v: k for k, v in PROMPT_INITS.items()}.get(str(d.get("prompt_tuning_init", "RANDOM")).upper(), "random")
    return PeftConfig(method="prompt", num_virtual_tokens=d["num_virtual_tokens"], prompt_init=init,
                      init_text=d.get("prompt_tuning_init_text") or "",
                      tokenizer_path=d.get("tokenizer_name_or_path") or "", base_model_name_or_path=base)


def _or(value, default):
    """PEFT's default for a key that is absent or null."""
    return default if value is None else value


def _targets(t):
    return sorted(t) if isinstance(t, (list, tuple, set)) else t


def _check_shape_fields(d: dict, model, where):
    """Prompt-learning configs record the base model's sizes: check them against this model."""
    c = model.cfg
    expected = {"num_layers": c.num_layers}
    if d["peft_type"] == "PREFIX_TUNING":
        expected.update(token_dim=c.num_kv_heads * c.head_dim, num_attention_heads=c.num_kv_heads)
    elif d["peft_type"] in ("PROMPT_TUNING", "P_TUNING"):
        expected.update(token_dim=c.hidden_size)
    for key, want in expected.items():
        if d.get(key) is not None and d[key] != want:
            raise FtcoreError(f"{where}: {key}={d[key]} but this model has {want} (adapter for another base model?)")


def _boft_factors_saved(cfg: PeftConfig, st: SafetensorsFile, where) -> PeftConfig:
    """BOFT: the butterfly factors the saved boft_R [m, D, H, H] hold. HF PEFT without its CUDA extension (fbd_cuda)
    trains with m = 1 whatever its boft_n_butterfly_factor says; its tensors say what it computed."""
    saved = {st.shape(k)[0] for k in st.names() if k.endswith(".boft_R") and len(st.shape(k)) == 4}
    if len(saved) != 1 or (m := saved.pop()) == cfg.boft_n_butterfly_factor:
        return cfg  # (none, or differing ones: the shape checks name the tensor)
    warnings.warn(f"{where}: boft_n_butterfly_factor={cfg.boft_n_butterfly_factor} but the saved boft_R tensors "
                  f"hold {m} factor(s) (HF PEFT without its fbd_cuda extension trains with 1): loaded with {m}, "
                  "as they were trained", stacklevel=3)  # fmt: skip
    return dataclasses.replace(cfg, boft_n_butterfly_factor=m)


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Read a PEFT adapter directory, attach its method to `model` and load its tensors; returns the model."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / CONFIG, adapter_dir / WEIGHTS
    if not cfg_path.is_file():
        raise FtcoreError(f"{adapter_dir}: no {CONFIG} (expected a PEFT adapter directory)")
    if not weights_path.is_file():
        raise FtcoreError(f"{adapter_dir}: no {WEIGHTS} (only safetensors adapters are supported)")
    d = read_json_object(cfg_path)
    try:
        cfg = config_from_peft(d, cfg_path)
    except KeyError as e:
        raise FtcoreError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    _check_shape_fields(d, model, cfg_path)
    st = SafetensorsFile(weights_path)
    # an unconverted PiSSA/OLoRA adapter was trained on the residual: make it again from this base (as PEFT)
    principal = is_principal(cfg.init)
    if PISSA_NITER.fullmatch(cfg.init):
        warnings.warn(f"{cfg_path}: init_lora_weights={cfg.init!r} was saved unconverted; its randomized SVD is "
                      "redone here, so the residual base differs a little from the one it was trained on "
                      "(save PiSSA adapters converted to plain LoRA, as ftcore does)", stacklevel=2)  # fmt: skip
    if cfg.method == "boft":
        cfg = _boft_factors_saved(cfg, st, cfg_path)
    apply(model, cfg, init=principal)
    if cfg.method == "adalora" and d.get("rank_pattern"):  # a pruned adapter: shrink each layer to its kept ranks
        names = {f"{peft_key(n)}.lora_E": n for n in adapter_layers(model)}
        pattern = {}
        for key, kept in d["rank_pattern"].items():
            name = names.get(key.removesuffix(".default"))
            if name is None or not isinstance(kept, list) or len(kept) != cfg.init_r:
                raise FtcoreError(f"{cfg_path}: rank_pattern[{key!r}]: expected a list of init_r={cfg.init_r} "
                                  "booleans for a target of this model")  # fmt: skip
            model.get_submodule(name).keep(kept)
            pattern[name] = kept
        model.adalora.rank_pattern = pattern
    try:
        expected = adapter_state(model)
        # PEFT also saves the base weight of a targeted lm_head/embed_tokens and loads it back: so do we.
        optional = {f"base_model.model.{peft_key(n)}.base_layer.weight": layer.weight
                    for n, layer in adapter_layers(model).items()}
        names = {n.removesuffix(".weight") if n.endswith("lora_magnitude_vector.weight") else n: n
                 for n in st.names()}  # PEFT < 0.12 saved DoRA's magnitude with a `.weight` suffix
        for key, file_key in names.items():
            target = expected.get(key, optional.get(key))
            if target is None:
                raise FtcoreError(f"{weights_path}: unexpected tensor {file_key!r} (no such adapter tensor in this model)")
            if st.shape(file_key) != tuple(target.shape):
                raise FtcoreError(f"{weights_path}: tensor {file_key!r} has shape {list(st.shape(file_key))}, but this "
                                  f"model expects {list(target.shape)} (an adapter for another base model?)")
        missing = sorted(set(expected) - set(names))
        if missing:
            raise FtcoreError(f"{weights_path}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        shared = {}  # a tensor several keys load into (Lily's shared A and B): every copy must agree
        for key, file_key in names.items():
            target = expected.get(key, optional.get(key))
            if id(target) in shared and not torch.equal(st.get(file_key), st.get(shared[id(target)])):
                raise FtcoreError(f"{weights_path}: {file_key!r} differs from {shared[id(target)]!r}, but both are "
                                  "one shared tensor of this adapter")  # fmt: skip
            shared.setdefault(id(target), file_key)
        with torch.no_grad():
            for key, file_key in names.items():
                if key == "prompt_embeddings" and cfg.method == "prefix":
                    model.prefix_encoder.load_flat(st.get(file_key))
                elif key == "prompt_embeddings" and cfg.method == "ptuning":
                    model.prompt_encoder.load_fixed(st.get(file_key))
                else:
                    expected.get(key, optional.get(key)).copy_(st.get(file_key))
    except FtcoreError:
        unload(model)
        raise
    return model
