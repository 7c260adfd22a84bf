"""apply(model, cfg): freeze the base and attach one method; target matching, merge, parameter counts.

Adapted layers are swapped in place (`setattr(parent, name, LoraLinear(old))`) and keep the base
Parameters under their names, so `layers.0.self_attn.q_proj.weight` is still a key of the model (a quantized
base layer is kept whole, as `...q_proj.base_layer`: base_layer.py).
Adapter layers share one small protocol: adapter_tensors() (PEFT's names), merge(), unmerge(),
merged_weight(), merged_bias(). Prefix and prompt tuning (and P-tuning, on the prompt hook) attach root modules
at the model's hooks, as do VeRA and Lily for the tensors their layers share (`vera_projections`,
`lily_projectors`).

Target matching is PEFT's, on PEFT's module keys (`model.layers.0.self_attn.q_proj`, `lm_head`):
a list entry matches a key equal to it or ending in `.entry`; a string is a regex that must match
the whole key; "all-linear" is every linear layer but lm_head (PEFT's shorthand; the saved config lists them).
Stricter than PEFT: every list entry must match some linear layer (LoRA: or the token embedding, `embed_tokens`;
LN tuning: some RMSNorm layer, and nothing but norms).
"""

import dataclasses
import re
import warnings

import torch
from torch import nn

from ftcore.errors import FtcoreError
from ftcore.model.decoder import RMSNorm
from ftcore.peft.adalora import AdaLoraLinear, RankAllocator
from ftcore.peft.boft import BoftLinear
from ftcore.peft.config import PeftConfig, is_principal
from ftcore.peft.full import apply_full
from ftcore.peft.hira import HiraLinear
from ftcore.peft.hra import HraLinear
from ftcore.peft.ia3 import IA3Linear
from ftcore.peft.lily import LilyLinear, LilyProjectors, lily_groups
from ftcore.peft.ln_tuning import LnTuningNorm
from ftcore.peft.loha import LohaLinear
from ftcore.peft.lokr import LokrLinear
from ftcore.peft.lora import LoraLinear
from ftcore.peft.lora_embedding import LoraEmbedding
from ftcore.peft.oft import OftLinear
from ftcore.peft.prefix import PrefixEncoder
from ftcore.peft.prompt import PromptEncoder, encode_init_text
from ftcore.peft.ptuning import PTuningEncoder
from ftcore.peft.vera import VeraLinear, VeraProjections
from ftcore.quant.gguf import EmbeddingGGUF
from ftcore.quant.weight import QuantLinear, QuantStorage
from ftcore.schema import build

ADAPTER_LAYERS = (LoraLinear, LoraEmbedding, IA3Linear, VeraLinear, HiraLinear, HraLinear, LohaLinear, LokrLinear,
                  AdaLoraLinear, LnTuningNorm, OftLinear, BoftLinear, LilyLinear)  # fmt: skip
VIRTUAL_TOKENS = {"prefix": "prefix tuning", "prompt": "prompt tuning", "ptuning": "p-tuning"}  # not mergeable
ALL_LINEAR_SHORTHAND = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND
HOOKS = ("prefix_encoder", "prompt_encoder", "vera_projections", "lily_projectors")  # root modules a method attaches


def peft_key(name: str) -> str:
    """Our module name -> PEFT's module key under the causal-LM wrapper (`model.` prefix but lm_head)."""
    return name if name == "lm_head" or name.startswith("lm_head.") else "model." + name


def linear_modules(model: nn.Module, embeddings: bool = False) -> dict[str, nn.Module]:
    """The base model's linear layers (nn.Linear or quantized) and its nn.Embedding layers if `embeddings`, by name."""
    kinds = (nn.Linear, QuantLinear, nn.Embedding, EmbeddingGGUF) if embeddings else (nn.Linear, QuantLinear)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not n.startswith(HOOKS)}


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The base model's RMSNorm layers (input_layernorm, post_attention_layernorm, norm), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RMSNorm) and not n.startswith(HOOKS)
            and not n.endswith(".ln_tuning_layers")}  # fmt: skip


def _matches(targets, key: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def all_linear(model: nn.Module) -> list[str]:
    """PEFT's target_modules="all-linear": every linear layer but the output head, as PEFT keys (what PEFT writes to
    adapter_config.json in its place)."""
    return [peft_key(n) for n in linear_modules(model) if n != "lm_head"]


def is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR_SHORTHAND


def find_targets(model: nn.Module, targets, field: str = "target_modules", embeddings: bool = False,
                 norms: bool = False) -> list[str]:  # fmt: skip
    """Names of the linear layers (and embeddings if `embeddings`; the RMSNorm layers instead if `norms`) matched by
    `targets` (names, one regex, or "all-linear")."""
    if is_all_linear(targets) and not norms:
        targets = all_linear(model)
    candidates = norm_modules(model) if norms else linear_modules(model, embeddings)
    short = list(dict.fromkeys(n.split(".")[-1] for n in candidates))
    kind = "norm module" if norms else "linear or embedding module" if embeddings else "linear module"
    known = f"{kind}s: {', '.join(short)}" + ("" if norms else '; or "all-linear" (every linear layer but lm_head)')
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise FtcoreError(f"peft.{field}: invalid regex {targets!r} ({e})") from None
    else:
        for t in targets:
            if not any(_matches([t], peft_key(n)) for n in candidates):
                raise FtcoreError(f"peft.{field}: {t!r} matches no {kind} of this model; {known}")
    found = [n for n in candidates if _matches(targets, peft_key(n))]
    if not found:
        raise FtcoreError(f"peft.{field}: {targets!r} matches no {kind} of this model; {known}")
    if norms:  # PEFT would wrap (and train a copy of) any module the targets match: refuse what is not a norm
        other = [n for n in dict(model.named_modules()) if n and n not in candidates and not n.startswith(HOOKS)
                 and _matches(targets, peft_key(n))]  # fmt: skip
        if other:
            raise FtcoreError(f"peft.{field}: {targets!r} also matches {peft_key(other[0])}, which is not a norm "
                              f"(LN tuning tunes norm layers only); {known}")  # fmt: skip
    return found


def _swap(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}


def apply(model: nn.Module, cfg: PeftConfig, tokenizer=None, init: bool = True) -> nn.Module:
    """Freeze the base model and attach `cfg.method` in place; returns the model.

    Call it after the base weights are loaded when the init reads them (init_reads_base); sharded loading
    attaches the layers on the meta device with init=False and takes the init from a stand-in (sharded_load.py).
    tokenizer: only for prompt_init="text" (an ftcore Tokenizer; else loaded from cfg.tokenizer_path).
    init=False skips the adapter init (load_adapter overwrites the values anyway).
    """
    if not isinstance(cfg, PeftConfig):
        cfg = build(PeftConfig, cfg, "peft.")
    if getattr(model, "peft_config", None) is not None and model.peft_config.method != "none":
        raise FtcoreError(f"peft: the model already has a {model.peft_config.method!r} adapter attached")
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    if quantized and cfg.method == "full":
        raise FtcoreError("peft.method=full: the base is quantized (model.quantize) and stays frozen; use a PEFT method")
    if quantized and cfg.method in ("lora", "dora") and is_principal(cfg.init):
        raise FtcoreError(f"peft.init={cfg.init}: PiSSA/OLoRA replace the base weights by a residual, which a quantized "
                          "base (model.quantize) keeps frozen; use peft.init=kaiming-uniform or gaussian")  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    if is_all_linear(cfg.target_modules):  # resolved now, so the saved config lists the layers (as PEFT's does)
        cfg = dataclasses.replace(cfg, target_modules=all_linear(model))
    if cfg.method == "full":
        apply_full(model, cfg.freeze)
        model.peft_config = cfg
        return model
    if cfg.method in ("lora", "dora"):
        principal = is_principal(cfg.init)
        for name in find_targets(model, cfg.target_modules, embeddings=True):
            base = model.get_submodule(name)
            if isinstance(base, EmbeddingGGUF):
                raise FtcoreError(f"peft.target_modules: {name} keeps its GGUF blocks (model.quantize=gguf), and LoRA "
                                  "on an embedding needs a float table; leave it out or use model.quantize=none")  # fmt: skip
            if isinstance(base, nn.Embedding):
                if cfg.method == "dora" or principal:
                    what = "peft.method=dora" if cfg.method == "dora" else f"peft.init={cfg.init!r}"
                    raise FtcoreError(f"{what}: {name} is an embedding; it applies to linear layers only "
                                      "(leave it out of peft.target_modules or use plain LoRA)")  # fmt: skip
                layer = LoraEmbedding(base, cfg.r, cfg.alpha, cfg.use_rslora)
                if init:
                    layer.reset_parameters(gen)
                _swap(model, name, layer)
                continue
            if principal and name == "lm_head" and model.cfg.tie_word_embeddings:
                raise FtcoreError(f"peft.init={cfg.init!r}: lm_head shares its weight with embed_tokens "
                                  "(tie_word_embeddings), so the residual would change the embeddings too; "
                                  "leave lm_head out of peft.target_modules")  # fmt: skip
            layer = LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, dora=cfg.method == "dora")
            if init:
                layer.reset_parameters(cfg.init, gen)
            _swap(model, name, layer)
    elif cfg.method == "vera":
        names = find_targets(model, cfg.target_modules)
        linears = [model.get_submodule(n) for n in names]
        shared = VeraProjections(cfg.r, max(m.in_features for m in linears), max(m.out_features for m in linears),
                                 linears[0].weight.device)  # fmt: skip
        shared.reset_parameters(cfg.projection_prng_key)  # also when loading: regenerated unless saved
        model.vera_projections = shared
        for name, base in zip(names, linears):
            layer = VeraLinear(base, shared, cfg.dropout)
            if init:
                layer.reset_parameters(cfg.d_initial)
            _swap(model, name, layer)
    elif cfg.method == "lily":
        names = find_targets(model, cfg.target_modules)
        linears = [model.get_submodule(n) for n in names]
        shared = LilyProjectors()
        for g, idx in enumerate(lily_groups(names, linears, cfg.target_modules, [peft_key(n) for n in names]).values()):
            first, device = linears[idx[0]], linears[idx[0]].weight.device
            b = shared.add(f"B_{g}", (cfg.num_B * cfg.r, first.out_features), device)
            for j, i in enumerate(idx):  # blocks of stride_A consecutive layers of the group share one A
                if j % cfg.stride_A == 0:
                    a = shared.add(f"A_{g}_{j // cfg.stride_A}", (cfg.r, first.in_features), device)
                layer = LilyLinear(linears[i], shared, a, b, cfg.r, cfg.num_B, cfg.scaling)
                if init:
                    layer.reset_parameters(gen, init_a=j % cfg.stride_A == 0, init_b=j == 0,
                                           init_weights=cfg.init_weights)  # fmt: skip
                _swap(model, names[i], layer)
        model.lily_projectors = shared
    elif cfg.method == "hira":
        for name in find_targets(model, cfg.target_modules):
            layer = HiraLinear(model.get_submodule(name), cfg.r, cfg.dropout)
            if init:
                layer.reset_parameters(cfg.init, gen)
            _swap(model, name, layer)
    elif cfg.method == "hra":
        for name in find_targets(model, cfg.target_modules):
            layer = HraLinear(model.get_submodule(name), cfg.r, cfg.apply_GS)
            if init:
                layer.reset_parameters(cfg.init, gen)
            _swap(model, name, layer)
    elif cfg.method == "adalora":
        layers = {}
        for name in find_targets(model, cfg.target_modules):
            layers[name] = AdaLoraLinear(model.get_submodule(name), cfg.init_r, cfg.alpha, cfg.dropout)
            if init:
                layers[name].reset_parameters(gen)
            _swap(model, name, layers[name])
        # the rank allocation the training step runs (a plain attribute: its state goes into checkpoints)
        model.adalora = RankAllocator(layers, cfg.init_r, cfg.target_r, cfg.tinit, cfg.tfinal, cfg.deltaT, cfg.beta1,
                                      cfg.beta2, cfg.total_step)  # fmt: skip
    elif cfg.method in ("loha", "lokr"):
        for name in find_targets(model, cfg.target_modules):
            base = model.get_submodule(name)
            if cfg.method == "loha":
                layer = LohaLinear(base, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout)
            else:
                layer = LokrLinear(base, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout, cfg.decompose_both,
                                   cfg.decompose_factor, cfg.rank_dropout_scale)  # fmt: skip
            if init:
                layer.reset_parameters(cfg.init, gen)
            _swap(model, name, layer)
    elif cfg.method == "ln_tuning":
        for name in find_targets(model, cfg.ln_tuning_target_modules, "ln_tuning_target_modules", norms=True):
            _swap(model, name, LnTuningNorm(model.get_submodule(name)))  # the copy starts at the base weight
    elif cfg.method == "oft":
        if cfg.module_dropout:
            warnings.warn(f"peft.module_dropout={cfg.module_dropout}: recorded, but HF PEFT 0.21.2's OFT Linear layers "
                          "never apply it, so neither does ftcore", stacklevel=2)  # fmt: skip
        for name in find_targets(model, cfg.target_modules):
            layer = OftLinear(model.get_submodule(name), cfg.r, cfg.oft_block_size, cfg.coft, cfg.eps, cfg.block_share,
                              cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms, cfg.module_dropout)  # fmt: skip
            if init:
                layer.reset_parameters(gen)
            _swap(model, name, layer)
    elif cfg.method == "boft":
        for name in find_targets(model, cfg.target_modules):
            layer = BoftLinear(model.get_submodule(name), cfg.boft_block_size, cfg.boft_block_num,
                               cfg.boft_n_butterfly_factor, cfg.boft_dropout, name)  # fmt: skip
            if init:
                layer.reset_parameters()
            _swap(model, name, layer)
    elif cfg.method == "ia3":
        for name in find_targets(model, cfg.ia3_target_modules, "ia3_target_modules"):
            _swap(model, name, IA3Linear(model.get_submodule(name), is_feedforward(cfg.feedforward_modules, name)))
    elif cfg.method == "prefix":
        device = model.embed_tokens.weight.device
        enc = PrefixEncoder(model.cfg, cfg.num_virtual_tokens, cfg.prefix_projection, cfg.prefix_hidden_size, device)
        if init:
            enc.reset_parameters(gen)
        model.prefix_encoder = enc
    elif cfg.method == "ptuning":
        enc = PTuningEncoder(cfg.num_virtual_tokens, model.cfg.hidden_size, cfg.encoder_reparameterization_type,
                             cfg.encoder_hidden_size, cfg.encoder_num_layers, cfg.encoder_dropout,
                             model.embed_tokens.weight.device)  # fmt: skip
        if init:
            enc.reset_parameters(gen)
        model.prompt_encoder = enc
    elif cfg.method == "prompt":
        embed = model.embed_tokens
        enc = PromptEncoder(cfg.num_virtual_tokens, model.cfg.hidden_size, embed.weight.device)
        if init and cfg.prompt_init == "random":
            enc.init_random(gen)
        elif init and cfg.prompt_init == "sample_vocab":
            enc.init_sample_vocab(embed, gen)
        elif init:
            # PEFT records the tokenizer a text init used (tokenizer_name_or_path); so do we
            cfg.tokenizer_path = cfg.tokenizer_path or str(getattr(tokenizer, "path", None) or "")
            if not cfg.tokenizer_path:
                raise FtcoreError("peft.tokenizer_path: required for prompt_init='text' (the tokenizer's directory)")
            enc.init_from_tokens(embed, encode_init_text(cfg.init_text, tokenizer, cfg.tokenizer_path))
        model.prompt_encoder = enc
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model):
        p.requires_grad_(True)
    model.train(model.training)  # the new layers take the model's mode (an eval model's dropout stays off)
    model.peft_config = cfg
    return model


def init_reads_base(cfg: PeftConfig) -> str | None:
    """What of the base weights the method's init reads (so it needs them loaded first), or None."""
    if cfg.method == "dora":
        return "DoRA's magnitude is the norm of the base weight"
    if cfg.method in ("lora", "dora") and is_principal(cfg.init):
        return f"peft.init={cfg.init} starts from the base weight's singular vectors"
    if cfg.method == "prompt" and cfg.prompt_init != "random":
        return f"peft.prompt_init={cfg.prompt_init} copies embedding rows"
    if cfg.method == "ln_tuning":
        return "LN tuning starts from a copy of the base norms"
    return None


def is_feedforward(feedforward_modules, name: str) -> bool:
    """PEFT's rule: a regex must match the whole key; a list entry matches a key *ending* in it (no dot)."""
    key = peft_key(name)
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, key) is not None
    return any(key.endswith(t) for t in feedforward_modules)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters, each once: adapter-layer tensors plus the root hooks' (prefix/prompt encoders,
    Lily's shared projectors; VeRA's shared matrices are frozen buffers)."""
    params = [p for m in adapter_layers(model).values() for p in m.adapter_tensors().values()]
    for hook in HOOKS:
        if getattr(model, hook, None) is not None:
            params += list(getattr(model, hook).parameters())
    return list({id(p): p for p in params}.values())


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter layers (LoRA, DoRA, IA3, VeRA, HiRA, HRA, LoHa, LoKr, AdaLoRA, OFT, BOFT; LN tuning's copies)
    into the base weights in place (forward then uses the base path only)."""
    _check_mergeable(model)
    for m in adapter_layers(model).values():
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge(): restore the base weights (up to float rounding)."""
    _check_mergeable(model)
    for m in adapter_layers(model).values():
        m.unmerge()
    return model


def _check_mergeable(model):
    method = getattr(getattr(model, "peft_config", None), "method", None)
    if method in VIRTUAL_TOKENS:
        raise FtcoreError(f"peft: {VIRTUAL_TOKENS[method]} adds virtual tokens and cannot be merged into the base weights")
    if method == "lily":
        next(iter(adapter_layers(model).values())).merge()  # its one-line refusal
    if any(getattr(m, "quantized_base", False) for m in adapter_layers(model).values()):
        raise FtcoreError("peft.merge: the base is quantized (model.quantize); merging in place would have to "
                          "re-quantize it; export dequantizes and merges (scripts/export.py, ftcore.peft.export_merged)")
    tied = {"embed_tokens": "lm_head", "lm_head": "embed_tokens"} if model.cfg.tie_word_embeddings else {}
    for name in adapter_layers(model):
        if name in tied:
            raise FtcoreError(f"peft.merge: {name} shares its weight with {tied[name]} (tie_word_embeddings), so "
                              "merging in place would change both; merge_and_unload (export) unties them")


def trainables_to_float32(model: nn.Module) -> nn.Module:
    """Trainable parameters (and so their gradients and optimizer state) in float32 over any base dtype."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once, as in PEFT. A quantized layer counts
    its weight's in x out (not its packed bytes and scales), as PEFT counts bitsandbytes' Params4bit; a GGUF
    embedding and the lm_head tied to it (one `blocks` Parameter) count once."""
    quantized = [m for m in model.modules() if isinstance(m, QuantStorage)]
    weights = {tuple(id(p) for n, p in m.named_parameters() if n != "bias"): m.in_features * m.out_features
               for m in quantized}  # keyed by storage: a module reached twice, or two over one storage, once
    storage = {i for key in weights for i in key}
    params = [p for p in model.parameters() if id(p) not in storage]  # deduplicated by nn.Module
    total = sum(p.numel() for p in params) + sum(weights.values())
    return sum(p.numel() for p in params if p.requires_grad), total


def summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    method = getattr(getattr(model, "peft_config", None), "method", "none")
    return (
        f"peft {method}: trainable params: {trainable:,} || all params: {total:,} "
        f"|| trainable%: {100 * trainable / max(total, 1):.4f}"
    )


def unload(model: nn.Module) -> nn.Module:
    """Remove the attached method without merging: plain nn.Linear (nn.Embedding, RMSNorm) layers with the current
    base weights."""
    for name, layer in adapter_layers(model).items():
        layer.unmerge()
        if hasattr(layer, "restore_base"):
            layer.restore_base()
        if isinstance(layer, LnTuningNorm):
            plain = RMSNorm(layer.dim, layer.eps)
            plain.weight, plain.fused_kernels = layer.weight, layer.fused_kernels
        elif getattr(layer, "quantized_base", False):
            plain = layer.base_layer
        elif isinstance(layer, LoraEmbedding):
            plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, device="meta")
            plain.weight = layer.weight
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
        _swap(model, name, plain)
    for hook in HOOKS:
        setattr(model, hook, None)
    model.adalora = None
    model.peft_config = None
    return model
