"""CompareConfig: what a comparison sweeps (Hydra's `compare` node maps onto it; conf/compare/*.yaml are ablations).

The training groups (model, data, optim, train, eval, logger, dist) are the runs' shared base;
`compare.peft.<method>` holds each method's PEFT settings (a method left out takes PeftConfig's
defaults; the CLI fills each from conf/peft/<method>.yaml, as `peft=<method>` would).
"""

from dataclasses import dataclass, field

from ftcore.errors import FtcoreError
from ftcore.peft.config import METHODS, PeftConfig
from ftcore.schema import build, invalid, one_of

LAUNCHES = ("inprocess", "subprocess", "print")
COMPARABLE = METHODS[1:]  # every method but none


@dataclass
class VaryConfig:
    """An ablation: one PEFT key takes each of `values` (an arm per value and method)."""

    key: str = ""  # e.g. r, target_modules, num_virtual_tokens; "" = no ablation
    values: list = field(default_factory=list)


@dataclass
class StatsConfig:
    """The uncertainty of the results table (ftcore/compare/stats.py): bootstrap intervals, paired swap tests."""

    resamples: int = 2000  # bootstrap draws of test examples and seeds (95% percentile intervals)
    permutations: int = 10000  # random swaps per paired test (all 2^n when fewer)
    alpha: float = 0.05  # a difference is marked when its Holm-adjusted p-value is below this
    seed: int = 0  # the generator of both


@dataclass
class CompareConfig:
    name: str = "methods"  # names the default output directory comparisons/<name>_<task>
    methods: list[str] = field(default_factory=lambda: ["lora", "ia3", "prompt"])  # any of COMPARABLE; [all]: every one
    seeds: list[int] = field(default_factory=lambda: [0])  # train.seed and peft.seed of each run
    budget: int = 0  # trainable parameters each method's size knob is solved for; 0 = sizes as configured
    max_r: int = 512  # upper bound of the rank the solver may pick (LoRA/DoRA/VeRA/HiRA/HRA/LoHa/LoKr/Lily r, AdaLoRA
    #   init_r, BOFT boft_block_size, P-tuning encoder_hidden_size)
    max_virtual_tokens: int = 100  # upper bound of prefix/prompt lengths the solver may pick
    lrs: list[float] = field(default_factory=list)  # learning rates to try for every method ([] = no sweep);
    #   the lowest validation loss after lr_steps steps wins
    # {method: [lrs]} replaces lrs for that method; null = lrs
    method_lrs: dict[str, list[float] | None] = field(default_factory=lambda: dict.fromkeys(COMPARABLE))
    lr_steps: int = 0  # steps of each learning-rate trial; 0 = a quarter of the run (max_steps // 4 or epochs / 4)
    lr_eval_examples: int = 8  # test examples a trial generates for (it is chosen by validation loss)
    # {method: lr} without a sweep; null = optim.lr
    lr: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(COMPARABLE))
    vary: VaryConfig = field(default_factory=VaryConfig)
    peft: dict[str, dict] = field(default_factory=dict)  # {method: PEFT settings}; a missing method: the defaults
    # {arm name: PEFT settings with a method} more arms after the methods', e.g. {pissa: {method: lora, init: pissa}};
    # each starts from compare.peft.<method> and trials the method's learning rates
    variants: dict[str, dict] = field(default_factory=dict)
    baseline: bool = True  # score the base model once (not once per run)
    plots: bool = True  # PNG plots (needs matplotlib: pip install 'ftcore[plots]')
    stats: StatsConfig = field(default_factory=StatsConfig)
    launch: str = "inprocess"  # inprocess: train() here | subprocess: `launcher scripts/train.py` | print
    launcher: str = "python"  # the subprocess/print command prefix, e.g. "torchrun --nproc_per_node=4"

    def __post_init__(self):
        one_of("compare.launch", self.launch, LAUNCHES)
        if list(self.methods) == ["all"]:
            self.methods = list(COMPARABLE)
        if not self.methods:
            raise invalid("compare.methods", self.methods, "at least one method")
        for m in self.methods:
            one_of("compare.methods", m, COMPARABLE)
        if len(set(self.methods)) != len(self.methods):
            raise invalid("compare.methods", self.methods, "each method once")
        for m in self.peft:
            one_of("compare.peft", m, COMPARABLE)
        for m in self.methods:
            build(PeftConfig, {**self.peft.get(m, {}), "method": m}, f"compare.peft.{m}.")
        for name, v in self.variants.items():
            if name in self.methods:
                raise invalid(f"compare.variants.{name}", v, "a name that is not one of compare.methods")
            if not isinstance(v, dict) or "method" not in v:
                raise invalid(f"compare.variants.{name}", v, "PEFT settings with a method, e.g. {method: lora, "
                              "init: pissa}")  # fmt: skip
            one_of(f"compare.variants.{name}.method", v["method"], COMPARABLE)
            build(PeftConfig, {**self.peft.get(v["method"], {}), **v}, f"compare.variants.{name}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise invalid("compare.seeds", self.seeds, "distinct seeds")
        if self.budget < 0:
            raise invalid("compare.budget", self.budget, "a number of parameters >= 0")
        for key in ("resamples", "permutations"):
            if getattr(self.stats, key) < 1:
                raise invalid(f"compare.stats.{key}", getattr(self.stats, key), ">= 1")
        if not 0 < self.stats.alpha < 1:
            raise invalid("compare.stats.alpha", self.stats.alpha, "a probability in (0, 1)")
        for key in ("max_r", "max_virtual_tokens", "lr_eval_examples"):
            if getattr(self, key) < 1:
                raise invalid(f"compare.{key}", getattr(self, key), ">= 1")
        if self.vary.key and not self.vary.values:
            raise invalid("compare.vary.values", self.vary.values, f"values for peft.{self.vary.key}")
        for m, lr in self.lr.items():
            if lr is not None and lr <= 0:
                raise invalid(f"compare.lr.{m}", lr, "a positive learning rate or null")
        for m, lrs in self.lrs_by_method().items():
            if any(x <= 0 for x in lrs):
                raise invalid("compare.lrs", lrs, "positive learning rates")

    def lrs_by_method(self) -> dict[str, list[float]]:
        """The learning rates to try for each method ({} when there is no sweep)."""
        methods = list(dict.fromkeys([*self.methods, *(v["method"] for v in self.variants.values())]))
        unknown = sorted(m for m, v in self.method_lrs.items() if v and m not in methods)
        if unknown:
            raise FtcoreError(f"compare.method_lrs.{unknown[0]}: not one of compare.methods {self.methods} (or a "
                              "variant's method)")  # fmt: skip
        found = {m: list(self.method_lrs.get(m) or self.lrs) for m in methods}
        return {m: [float(x) for x in v] for m, v in found.items() if v}


def compare_config(d: dict) -> CompareConfig:
    """A validated CompareConfig from a plain dict (Hydra's resolved `compare` node)."""
    return build(CompareConfig, d, "compare.")
