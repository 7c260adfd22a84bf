"""PEFT methods in plain PyTorch, interchangeable with HF PEFT adapters on disk.

    cfg = PeftConfig(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    apply(model, cfg)                  # freeze the base, swap in LoRA layers (base names kept)
    print(summary(model))              # trainable vs total parameters
    save_adapter(model, "out/")        # adapter_config.json + adapter_model.safetensors (PEFT format)
    load_adapter(fresh_model, "out/")  # also reads adapters written by HF PEFT
    model, tok = load_with_adapter("out/")  # the base it records (or base=...), then the adapter
    export_merged(model, "merged/")    # an adapter-layer method folded into a plain HF-layout model

One file per method: lora.py (LoRA, rsLoRA, DoRA; lora_init.py: PiSSA and OLoRA inits), vera.py, hira.py,
hra.py, loha.py, lokr.py, adalora.py (with its rank allocator), oft.py, boft.py, lily.py (shared projectors; not
mergeable), ia3.py, ln_tuning.py, prefix.py, prompt.py, ptuning.py (P-tuning's encoder, on the prompt hook), full.py;
attach.py (apply, targets, merge), io.py (PEFT format), export.py (merged model). LoRA+ is a choice of optimizer groups
(train/optim.py).
"""

from ftcore.peft.attach import (
    adapter_layers,
    adapter_parameters,
    apply,
    count_parameters,
    find_targets,
    init_reads_base,
    linear_modules,
    merge,
    summary,
    trainables_to_float32,
    unload,
    unmerge,
)
from ftcore.peft.config import METHODS, PeftConfig
from ftcore.peft.export import export_merged, merge_and_unload, merged_state_dict
from ftcore.peft.io import adapter_state, load_adapter, load_with_adapter, save_adapter

__all__ = [
    "METHODS",
    "PeftConfig",
    "adapter_layers",
    "adapter_parameters",
    "adapter_state",
    "apply",
    "count_parameters",
    "export_merged",
    "find_targets",
    "init_reads_base",
    "linear_modules",
    "load_adapter",
    "load_with_adapter",
    "merge",
    "merge_and_unload",
    "merged_state_dict",
    "save_adapter",
    "summary",
    "trainables_to_float32",
    "unload",
    "unmerge",
]
