"""The training prompts' drift reference, saved with every run (drift_reference.json; drift.py scores against it).

Lengths and token counts come from every training prompt (as the model sees it: system prompt and template
applied, the answer left out); the embedding summary from the base model's final hidden state (after the last
norm), averaged over each prompt's tokens, for the first eval.drift_prompts prompts in a seeded order.
"""

import random

import numpy as np
import torch

from ftcore.data.format import encode_prompt, split_prompt
from ftcore.model.generate import left_pad
from ftcore.monitor.drift import DriftReference


def prompt_ids(examples: list[dict], template: str, tokenizer) -> list[list[int]]:
    return [encode_prompt(split_prompt(ex["messages"])[0], template, tokenizer) for ex in examples]


@torch.no_grad()
def prompt_embeddings(model, prompts: list[list[int]], pad_id: int, device, batch_size: int = 16) -> np.ndarray:
    """[n, D]: the final norm's output, mean over each prompt's tokens (left-padded batches)."""
    captured = {}
    hook = model.norm.register_forward_hook(lambda module, inputs, output: captured.update(h=output))
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            tokens, mask = left_pad(prompts[start : start + batch_size], pad_id, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(tokens, attention_mask=mask, position_ids=positions)
            h = captured["h"].float()  # [B, T, D]
            m = mask[..., None].to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
    finally:
        hook.remove()
        model.train(was_training)
    return np.concatenate(out)


def build_reference(model, examples: list[dict], data_cfg, tokenizer, pad_id: int, device, prompts: int,
                    seed: int = 0) -> DriftReference:  # fmt: skip
    ids = prompt_ids(examples, data_cfg.template, tokenizer)
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    picked = [ids[i] for i in order[:prompts]]
    embeddings = prompt_embeddings(model, picked, pad_id, device) if picked else None
    return DriftReference.build(ids, embeddings)
