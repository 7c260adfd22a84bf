"""Matched budgets: solve each method's size knob for a trainable-parameter budget.

Counts are exact: the method is applied to the model built on the meta device (no weights, no
memory) and its trainable parameters are counted with ftcore.peft.count_parameters, the same
count the training run reports. Each count is affine in the knob: two counts predict the largest
size whose count does not exceed the budget, two more confirm it (a binary search is the fallback).

    knob                 methods        notes
    r                    lora, dora     DoRA adds a fixed magnitude vector per adapted layer
    r                    vera           sum over layers of out + r (the shared random matrices are frozen)
    r                    hira           r * (in + out) per layer, like LoRA
    r                    hra            r * in per layer (hra_u [in, r])
    init_r               adalora        init_r * (in + out + 1) per layer (the ranks reallocated are within it)
    r                    loha           2 r * (in + out) per layer
    r                    lokr           not affine: each Kronecker factor is r (rows + cols) while low-rank, then
                                        fixed once r >= max(rows, cols) / 2 (the count can even drop there); the
                                        binary search then finds an r within the budget, not always the largest.
                                        Capped where every factor is full (a larger r only lowers alpha / r)
    oft_block_size       oft            per layer n_blocks * b (b - 1) / 2 = in (b - 1) / 2 (block_share: b (b - 1) / 2),
                                        rising with b; b moves to the nearest divisor of each layer's in (PEFT's
                                        rule), so the count is a non-decreasing step function of the knob (binary
                                        search) and stops growing at b = the largest in. r (the number of blocks)
                                        would make it fall instead, so it is not the knob; r is kept at 0
    r                    lily           r * (sum over target entries of ceil(layers / stride_A) in + num_B out
                                        + layers * num_B): the shared A's and B's once, a router per layer
    boft_block_size      boft           m * in * H + out per layer (m butterfly factors of in / H blocks H x H,
                                        each stored whole as PEFT does, plus the scale s): affine in H, but only
                                        the H that divide every adapted layer's in_features (and suit m) are
                                        valid, so the solver counts each of those up to compare.max_r; the
                                        settings' boft_block_num is set to 0 (PEFT takes one or the other)
    num_virtual_tokens   prefix, prompt
    encoder_hidden_size  ptuning        the encoder's H, which holds most of its count (MLP: P D + H^2 + 2 H D + 2 H
                                        + D; quadratic, so the binary search finds it); P stays as configured.
                                        Capped by compare.max_r. The saved adapter is only its output, P x D
    (fixed size)         ia3, full      reported as they are; vary ia3_target_modules in an ablation
    (fixed size)         ln_tuning      one weight [D] per targeted norm (vary ln_tuning_target_modules)
"""

import warnings
from dataclasses import dataclass

from ftcore import peft
from ftcore.errors import FtcoreError
from ftcore.formats.hf import build_model
from ftcore.model import ModelConfig
from ftcore.peft.attach import find_targets
from ftcore.peft.boft import block_layout
from ftcore.peft.config import PeftConfig
from ftcore.peft.lokr import LokrLinear, full_rank
from ftcore.peft.oft import OftLinear
from ftcore.schema import build

KNOBS = {"lora": "r", "dora": "r", "vera": "r", "hira": "r", "hra": "r", "adalora": "init_r", "loha": "r", "lokr": "r",
         "oft": "oft_block_size", "boft": "boft_block_size", "lily": "r", "prefix": "num_virtual_tokens",
         "prompt": "num_virtual_tokens", "ptuning": "encoder_hidden_size"}


@dataclass
class Sized:
    """A method's PEFT settings with the knob set, and its exact trainable-parameter count."""

    peft: dict
    knob: str | None  # None: the method has a fixed size
    size: int | None
    trainable: int
    note: str = ""  # why the count is not the largest one within the budget ("" when it is)


def count_trainable(model_cfg: ModelConfig, peft_settings: dict) -> int:
    """Trainable parameters of the method applied to the model (built on the meta device)."""
    model = build_model(model_cfg)
    with warnings.catch_warnings():  # OFT's block sizes moved to a divisor: the count already says what it is
        warnings.filterwarnings("ignore", message=r"Invalid `(oft_block_size|r)`")
        peft.apply(model, peft_settings, init=False)
    return peft.count_parameters(model)[0]


def lokr_full_rank(model_cfg: ModelConfig, peft_settings: dict) -> int:
    """LoKr: the r from which every adapted layer's factors are full matrices (the count stops growing)."""
    model = build_model(model_cfg)
    peft.apply(model, {**peft_settings, "r": 1}, init=False)
    return max(full_rank(m.out_features, m.in_features, m.decompose_both, m.decompose_factor)
               for m in model.modules() if isinstance(m, LokrLinear))  # fmt: skip


def oft_widest(model_cfg: ModelConfig, peft_settings: dict) -> int:
    """OFT: the block size from which every adapted layer is one block (the largest in_features)."""
    model = build_model(model_cfg)
    peft.apply(model, {**peft_settings, "r": 0, "oft_block_size": 1}, init=False)  # (1 divides every size)
    return max(m.in_features for m in model.modules() if isinstance(m, OftLinear))


def boft_block_sizes(model_cfg: ModelConfig, peft_settings: dict, max_size: int) -> list[int]:
    """BOFT: the block sizes 1..max_size that every adapted layer's in_features allows (with its butterfly factors)."""
    cfg = build(PeftConfig, {**peft_settings, "boft_block_size": 1, "boft_block_num": 0}, "peft.")
    model = build_model(model_cfg)
    ins = {model.get_submodule(n).in_features for n in find_targets(model, cfg.target_modules)}
    m = cfg.boft_n_butterfly_factor
    return [h for h in range(1, max_size + 1) if all(not isinstance(block_layout(i, h, 0, m), str) for i in ins)]


def solve_boft(model_cfg: ModelConfig, settings: dict, budget: int, max_size: int) -> Sized:
    """The largest valid boft_block_size whose exact count is <= budget (a binary search over the valid sizes)."""
    sizes = boft_block_sizes(model_cfg, settings, max_size)
    if not sizes:
        raise FtcoreError(f"compare: no boft_block_size up to {max_size} (compare.max_r) divides the in_features of "
                          "every adapted layer; change peft.target_modules or peft.boft_n_butterfly_factor")
    counts = {}

    def count(h: int) -> int:
        if h not in counts:
            counts[h] = count_trainable(model_cfg, sized(settings, "boft_block_size", h))
        return counts[h]

    if count(sizes[0]) > budget:
        h = sizes[0]
        return Sized(sized(settings, "boft_block_size", h), "boft_block_size", h, counts[h],
                     f"over budget at the smallest valid boft_block_size={h}")  # fmt: skip
    lo, hi = 0, len(sizes)  # the count grows with the size: count(sizes[lo]) <= budget < count(sizes[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(sizes[mid]) <= budget else (lo, mid)
    h, note = sizes[lo], ""
    if lo == len(sizes) - 1 and count(h) < budget:
        note = (f"capped at boft_block_size={h}: the largest block size up to {max_size} (compare.max_r) that "
                "divides every adapted layer's in_features")  # fmt: skip
    return Sized(sized(settings, "boft_block_size", h), "boft_block_size", h, counts[h], note)


def solve_budget(model_cfg: ModelConfig, peft_settings: dict, budget: int, max_size: int) -> Sized:
    """The largest knob value (1..max_size) whose trainable count is <= budget; budget 0 keeps the settings."""
    settings = dict(peft_settings)
    knob = KNOBS.get(settings["method"])
    if knob is None or budget <= 0:
        size = settings.get(knob) if knob else None
        return Sized(settings, knob, size, count_trainable(model_cfg, settings))

    if settings["method"] == "boft":
        return solve_boft(model_cfg, settings, budget, max_size)
    cap_note = f"capped at {knob}={max_size} (compare.max_{'virtual_tokens' if knob == 'num_virtual_tokens' else 'r'})"
    if settings["method"] == "oft" and (widest := oft_widest(model_cfg, settings)) < max_size:
        max_size = widest
        cap_note = f"capped at oft_block_size={widest}: one block per layer from there (the count stops growing)"
    if settings["method"] == "lokr" and (full := lokr_full_rank(model_cfg, settings)) < max_size:
        max_size = full
        cap_note = f"capped at r={full}: every LoKr factor is a full matrix from there (more r only lowers alpha / r)"
    counts = {}

    def count(size: int) -> int:
        if size not in counts:
            counts[size] = count_trainable(model_cfg, sized(settings, knob, size))
        return counts[size]

    smallest = 2 if settings["method"] == "oft" else 1  # OFT's block of 1 has no parameters (b (b - 1) / 2 = 0)
    if count(smallest) > budget:
        return Sized(sized(settings, knob, smallest), knob, smallest, count(smallest),
                     f"over budget at the smallest {knob}={smallest}")  # fmt: skip
    # every count is affine in the knob: guess from two counts, then check the guess exactly
    slope = count(smallest + 1) - count(smallest)
    guess = min(max_size, smallest + (budget - count(smallest)) // slope) if slope > 0 else max_size
    if count(guess) <= budget and (guess == max_size or count(guess + 1) > budget):
        lo = guess
    else:  # not affine after all: binary search for the largest size within the budget
        lo, hi = smallest, max_size + 1  # count(lo) <= budget < count(hi), count(max_size + 1) taken as infinite
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    note = ""
    if lo == max_size and count(max_size) < budget:
        note = cap_note
    return Sized(sized(settings, knob, lo), knob, lo, count(lo), note)


def sized(settings: dict, knob: str, size: int) -> dict:
    """The settings with the knob at `size`; AdaLoRA's target_r stays below its init_r, BOFT's block_num is 0."""
    out = {**settings, knob: size}
    if knob == "oft_block_size":
        out["r"] = 0  # sized by the block size alone
    if knob == "init_r":
        out["target_r"] = min(out.get("target_r", 8), size - 1)
    if knob == "boft_block_size":
        out["boft_block_num"] = 0
    return out
