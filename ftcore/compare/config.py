"""CompareConfig: what a comparison sweeps (conf/compare/*.yaml mirrors it; Hydra's `compare` node maps onto it).

The training groups (model, data, optim, train, eval, logger, dist) are the runs' shared base;
`compare.peft.<method>` holds each method's PEFT settings (conf/peft/<method>.yaml by default).
"""

from dataclasses import dataclass, field

from ftcore.errors import FtcoreError
from ftcore.peft.config import METHODS
from ftcore.schema import build

LAUNCHES = ("inprocess", "subprocess", "print")


@dataclass
class VaryConfig:
    """An ablation: one PEFT key takes each of `values` (an arm per value and method)."""

    key: str = ""  # e.g. r, target_modules, num_virtual_tokens; "" = no ablation
    values: list = field(default_factory=list)


@dataclass
class CompareConfig:
    name: str = "methods"  # names the default output directory comparisons/<name>_<task>
    methods: list[str] = field(default_factory=lambda: ["lora", "ia3", "prompt"])
    seeds: list[int] = field(default_factory=lambda: [0])  # train.seed and peft.seed of each run
    budget: int = 0  # trainable parameters each method's size knob is solved for; 0 = sizes as configured
    max_r: int = 512  # upper bound of the LoRA/DoRA rank the solver may pick
    max_virtual_tokens: int = 100  # upper bound of prefix/prompt lengths the solver may pick
    lrs: list = field(default_factory=list)  # learning rates to try for every method ([] = no sweep);
    #   the lowest validation loss after lr_steps steps wins
    method_lrs: dict = field(default_factory=dict)  # {method: [lrs]} replaces lrs for that method
    lr_steps: int = 0  # steps of each learning-rate trial; 0 = train.max_steps // 4
    lr_eval_examples: int = 8  # test examples a trial generates for (it is chosen by validation loss)
    lr: dict = field(default_factory=dict)  # {method: lr} without a sweep; unset/null = optim.lr
    vary: VaryConfig = field(default_factory=VaryConfig)
    peft: dict = field(default_factory=dict)  # {method: PEFT settings}
    baseline: bool = True  # score the base model once (not once per run)
    plots: bool = True  # PNG plots (needs matplotlib: pip install 'ftcore[plots]')
    launch: str = "inprocess"  # inprocess: train() here | subprocess: `launcher scripts/train.py` | print
    launcher: str = "python"  # the subprocess/print command prefix, e.g. "torchrun --nproc_per_node=4"

    def __post_init__(self):
        if self.launch not in LAUNCHES:
            raise FtcoreError(f"compare.launch: {self.launch!r} is not one of {', '.join(LAUNCHES)}")
        if not self.methods:
            raise FtcoreError("compare.methods: expected at least one method")
        for m in self.methods:
            if m not in METHODS or m == "none":
                raise FtcoreError(f"compare.methods: {m!r} is not one of {', '.join(METHODS[1:])}")
            if m not in self.peft:
                raise FtcoreError(
                    f"compare.peft.{m}: no PEFT settings for {m!r} (conf/compare.yaml loads conf/peft/{m}.yaml)"
                )
        if len(set(self.methods)) != len(self.methods):
            raise FtcoreError(f"compare.methods: {self.methods} lists a method twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise FtcoreError(f"compare.seeds: expected distinct seeds, got {self.seeds}")
        if self.budget < 0:
            raise FtcoreError(f"compare.budget: expected a number of parameters >= 0, got {self.budget}")
        for key in ("max_r", "max_virtual_tokens", "lr_eval_examples"):
            if getattr(self, key) < 1:
                raise FtcoreError(f"compare.{key}: must be >= 1, got {getattr(self, key)}")
        if self.vary.key and not self.vary.values:
            raise FtcoreError(f"compare.vary.values: expected values for peft.{self.vary.key}")
        for m, lr in self.lr.items():
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
                raise FtcoreError(f"compare.lr.{m}: expected a positive learning rate or null, got {lr!r}")
        for m, lrs in self.lrs_by_method().items():
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 for x in lrs):
                raise FtcoreError(f"compare.lrs: expected positive learning rates, got {lrs!r}")

    def lrs_by_method(self) -> dict[str, list[float]]:
        """The learning rates to try for each method ({} when there is no sweep)."""
        unknown = sorted(m for m, v in self.method_lrs.items() if v and m not in self.methods)
        if unknown:
            raise FtcoreError(f"compare.method_lrs.{unknown[0]}: not one of compare.methods {self.methods}")
        found = {m: list(self.method_lrs.get(m) or self.lrs) for m in self.methods}
        return {m: [float(x) for x in v] for m, v in found.items() if v}


def compare_config(d: dict) -> CompareConfig:
    """A validated CompareConfig from a plain dict (Hydra's resolved `compare` node)."""
    return build(CompareConfig, d, "compare.")
