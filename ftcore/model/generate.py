"""Batched decoding with a KV cache: greedy or sampled (temperature, top-p), left padding, stop tokens.

Position ids come from the padding mask (cumsum - 1), as in HF generate, so a left-padded row
computes exactly what it would alone.

LongRoPE (Phi-3) switches from its short to its long factors once a forward's positions pass the original
context; the keys cached before that were rotated with the short ones, so the step that crosses it re-runs the
whole sequence into a new cache, as HF's Phi3ForCausalLM.prepare_inputs_for_generation does.
"""

import torch

from ftcore.model import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """Next token ids [B] from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens past the nucleus; the top one always stays
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """tokens [B, L] padded on the left, mask [B, L] (1 = real token)."""
    L = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, L - len(p) :] = torch.tensor(p, device=device)
            mask[i, L - len(p) :] = 1
    return tokens, mask


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids=(),
    pad_id: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
    all_done=None,
    pick=None,
    on_step=None,
) -> list[list[int]]:
    """New tokens for each prompt, cut before the first stop token.

    use_cache=False recomputes the whole sequence every step (the reference the cache is tested against).
    all_done: for a model sharded over ranks (FSDP2), which must all run each forward: a collective that is
    true once every rank's rows are finished (World.all); decoding stops together.
    pick: logits [B, V] -> next ids [B], replacing sample_next (the server's per-row sampling settings).
    on_step: called with each step's ids [B] (pad for finished rows) and the finished mask [B] before this
    step's stops; returns a bool list of rows to finish now (their own token limit or stop strings), or None.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    device = model.inv_freq.device  # a buffer: on the compute device also when FSDP2 keeps parameters on the host
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens, mask = left_pad(prompts, pad_id, device)
    B, L = tokens.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    new_cache = lambda: KVCache(model.cfg, B, L + max_new_tokens + model_extra_tokens(model))  # noqa: E731
    cache = new_cache() if use_cache else None
    long_after = model.cfg.long_rope_after  # 0: no LongRoPE
    virtual = model_extra_tokens(model) + getattr(model.prefix_encoder, "num_virtual_tokens", 0)  # shift positions
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    logits = model(tokens, attention_mask=mask, position_ids=positions, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        nxt = pick(logits) if pick is not None else sample_next(logits, temperature, top_p, gen)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        if on_step is not None and (cut := on_step(nxt, finished)) is not None:
            finished |= torch.tensor(cut, dtype=torch.bool, device=device)
        finished |= torch.isin(nxt, stop)
        done = bool(finished.all())
        if (done if all_done is None else all_done(done)) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if use_cache and long_after and tokens.shape[1] - 1 + virtual == long_after:  # the first long position
            cache = new_cache()
            logits = model(tokens, attention_mask=mask, position_ids=positions, kv_cache=cache)[:, -1]
        elif use_cache:
            logits = model(nxt[:, None], attention_mask=mask, position_ids=positions[:, -1:], kv_cache=cache)[:, -1]
        else:
            logits = model(tokens, attention_mask=mask, position_ids=positions)[:, -1]
    new = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    stop_set = set(stop_ids)
    return [row[: next((j for j, t in enumerate(row) if t in stop_set), len(row))] for row in new]


def model_extra_tokens(model: Transformer) -> int:
    """Cache slots used by tokens the model inserts itself (prompt tuning's soft tokens), else 0."""
    return getattr(model, "num_virtual_tokens", 0)
