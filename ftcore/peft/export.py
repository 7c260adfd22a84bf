"""Merged export: fold the adapter layers (LoRA, DoRA, IA3, VeRA, HiRA, HRA, LoHa, LoKr, AdaLoRA, OFT, BOFT; LN
tuning's norm copies) into the base weights and write a plain HF-layout model. A quantized base (model.quantize)
is dequantized first: the adapter is merged into the weights it was trained over, and every other quantized
layer is written dequantized.

The trained model is not modified: merge_and_unload builds a new plain Transformer (on the meta
device, then assigned) whose unadapted parameters share storage with the trained model's and whose
adapted layers hold freshly merged weights. save_pretrained then writes config.json, safetensors
and (if given) the tokenizer files, loadable by ftcore.load_pretrained and transformers.
"""

import dataclasses

import torch
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.formats.hf import save_pretrained
from ftcore.model import Transformer
from ftcore.peft.attach import HOOKS, VIRTUAL_TOKENS, adapter_layers
from ftcore.quant.weight import QuantStorage


def merged_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameter names -> tensors of the merged base model (tied duplicates included, as state_dict)."""
    method = getattr(getattr(model, "peft_config", None), "method", "none")
    if method in VIRTUAL_TOKENS:
        raise FtcoreError(f"export: {VIRTUAL_TOKENS[method]} adds virtual tokens and cannot be merged into a plain model; "
                          "save it with ftcore.peft.save_adapter")
    layers = adapter_layers(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantStorage)}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            continue  # its packed storage; the dequantized weight is added below
        if module in layers and leaf in ("weight", "bias"):
            t = layers[module].merged_weight() if leaf == "weight" else layers[module].merged_bias()
        elif name.startswith(HOOKS) or any(name.startswith(n + ".") for n in layers):
            continue  # adapter tensors (lora_A.weight, ia3_l, ...)
        out[name] = t.detach()
    for name, base in quantized.items():
        owner = name.removesuffix(".base_layer")
        if owner in layers:  # an adapted layer: the adapter merged into the dequantized base
            out[f"{owner}.weight"], bias = layers[owner].merged_weight(), layers[owner].merged_bias()
        else:
            out[f"{name}.weight"], bias = base.dequantized(), getattr(base, "bias", None)
        if bias is not None:
            out[f"{owner}.bias"] = bias.detach()
    return out


def merge_and_unload(model: Transformer) -> Transformer:
    """A plain Transformer computing what `model` computes with its adapter (the input is left as is)."""
    state = merged_state_dict(model)
    cfg, hf = model.cfg, dict(getattr(model, "hf_config", None) or {})
    if cfg.tie_word_embeddings and {"lm_head", "embed_tokens"} & set(adapter_layers(model)):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)  # an adapter on either tied side unties them
        hf["tie_word_embeddings"] = False
    with torch.device("meta"):
        plain = Transformer(cfg)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.reset_buffers(model.embed_tokens.weight.device)
    for p in plain.parameters():
        p.requires_grad_(False)
    if hf:
        plain.hf_config = hf
    return plain


def export_merged(model: nn.Module, out_dir, tokenizer=None):
    """Write the merged full model in HF layout to out_dir (config.json, safetensors, tokenizer files)."""
    return save_pretrained(merge_and_unload(model), out_dir, tokenizer)
