"""scripts/bench.py's reference arm: transformers' LlamaForCausalLM (SDPA) + PEFT LoRA, a plain PyTorch loop.

Imported by a bench worker only when the "hf" arm runs (ftcore/ never imports transformers or peft).
"""

import peft
import torch
import transformers

from ftcore.data.format import IGNORE


def hf_arm(spec: dict, device: torch.device):
    """(step(batch) -> HF's mean loss, trainable parameter count) on the spec's model, LoRA, dtype and lr."""
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    if spec["random_weights"]:
        config = transformers.AutoConfig.from_pretrained(spec["model_dir"])
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                                  attn_implementation="sdpa").to(device)  # fmt: skip
    lora = spec["lora"]
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                lora_dropout=lora["dropout"], target_modules=lora["targets"]))  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], **kind)
    bf16 = spec["dtype"] == "bf16"

    def step(batch) -> float:
        B = batch["input_ids"].shape[0]
        # HF shifts labels inside the loss: labels[t + 1] is what position t predicts, i.e. our targets[t]
        labels = torch.cat([torch.full((B, 1), IGNORE), batch["targets"][:, :-1]], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device), labels=labels.to(device))  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return step, sum(p.numel() for p in params)
