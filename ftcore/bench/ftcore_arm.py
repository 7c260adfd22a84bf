"""ftcore's arm: the library's one training step (EagerStep, or GraphedStep with --cuda-graph) with the arm's
switches, on the spec's model, LoRA settings, dtype and AdamW, as ftcore/train/loop.py runs it.

Arms: "ftcore" (every switch asked for), "ftcore-nograph" (the same without the CUDA graph), "ftcore-plain"
(no switches: eager LoRA, plain lm_head + cross-entropy, no fused kernels), "ftcore-gguf" (the "ftcore" arm over
a GGUF-native base, model.quantize=gguf: the .gguf file's blocks dequantized per layer; needs --model a .gguf),
"ftcore-nf4" (the "ftcore" arm over an NF4 base with double quantization, model.quantize=nf4: QLoRA).
"""

import torch

from ftcore import peft
from ftcore.config import OptimConfig
from ftcore.data.format import IGNORE
from ftcore.formats.hf import build_model, load_model, read_config
from ftcore.quant.linear import QuantSpec
from ftcore.train.optim import build_optimizer
from ftcore.train.parallel import World
from ftcore.train.step import EagerStep, GraphedStep, set_fast_paths


def random_model(model_dir, dtype: torch.dtype, device: torch.device):
    """The model of model_dir's config.json with random weights (seed 0), built on the device directly."""
    cfg, _ = read_config(model_dir)
    model = build_model(cfg).to_empty(device=device)
    model.tie_weights()
    model.init_weights(generator=torch.Generator(device).manual_seed(0))
    model.to(dtype).reset_buffers(device)  # rotary frequencies stay float32, as after a load
    return model


def ftcore_arm(arm: str, spec: dict, device: torch.device):
    """(step(batch) -> mean loss over target tokens, trainable parameter count)."""
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    if arm == "ftcore-gguf":
        model = load_model(spec["gguf"], dtype=dtype, device=device, quant=QuantSpec("gguf", 64, True))
    elif arm == "ftcore-nf4":
        model = load_model(spec["model_dir"], dtype=dtype, device=device, quant=QuantSpec("nf4", 64, True))
    elif spec["random_weights"]:
        model = random_model(spec["model_dir"], dtype, device)
    else:
        model = load_model(spec["model_dir"], dtype=dtype, device=device)
    lora = spec["lora"]
    torch.manual_seed(0)
    peft.apply(model, peft.PeftConfig(method="lora", r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                      target_modules=lora["targets"]))  # fmt: skip
    peft.trainables_to_float32(model)
    model.train()
    plain = arm == "ftcore-plain"
    set_fast_paths(model, fused_kernels=spec["fused_kernels"] and not plain,
                   loss_chunk_size=0 if plain else spec["loss_chunk_size"], fused_lora=spec["fused_lora"] and not plain)
    optim = OptimConfig(lr=spec["lr"])
    optimizer = build_optimizer(model, optim)
    precision = spec["dtype"] if spec["dtype"] == "bf16" else "fp32"
    train_step = EagerStep(model, optimizer, World(device=device), precision, optim.grad_clip)
    if spec["cuda_graph"] and arm == "ftcore" and device.type == "cuda":
        train_step = GraphedStep(model, optimizer, train_step, precision, optim.grad_clip)

    def step(batch) -> float:
        tokens = int((batch["targets"] != IGNORE).sum())
        loss_sum, _ = train_step([{k: v.to(device) for k, v in batch.items()}], tokens)
        return loss_sum / tokens

    return step, peft.count_parameters(model)[0]
