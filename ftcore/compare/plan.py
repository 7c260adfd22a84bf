"""Plan a comparison: arms (a method at a solved size, or one ablation value), and one run per arm and seed.

Every run is a plain run-config dict for ftcore.config.run_config, fully resolved (every key
explicit), so it can be trained here (`train(run_config(d))`) or written to YAML and launched by
`scripts/train.py` under python or torchrun. Its directory name carries its config hash:

    <out>/runs/lora_s0_3fa1c2d9/        a final run (arm lora, seed 0)
    <out>/lr_trials/lora_lr0.001_0b7e.../  a short learning-rate trial

A restarted sweep finds each run by that hash: finished runs (eval.json written) are skipped,
runs with a checkpoint are resumed (train.resume=auto), a changed config gets a new directory.
"""

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ftcore.compare.budget import KNOBS, Sized, solve_budget
from ftcore.compare.config import CompareConfig
from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig
from ftcore.train.checkpoint import step_dirs

STATUS_FILE = "compare_status.json"  # written by the sweep after each run: status, wall time, peak memory
RUN_CONFIG_FILE = (
    "compare_run.yaml"  # the run's config, for `scripts/train.py --config-dir RUN_DIR --config-name compare_run`
)
# what does not change a run's training or test score: paths, logging, and the report-only evaluation extras
# (a comparison started before such a key existed still finds its runs)
NOT_HASHED = ("run_dir", "logger", "train.resume", "data.cache_dir", "data.group_field", "eval.report_failures",
              "eval.forgetting", "eval.forgetting_path", "eval.forgetting_samples", "eval.forgetting_tokens",
              "eval.forgetting_seed", "eval.drift_reference", "eval.drift_prompts")  # fmt: skip


@dataclass
class Arm:
    """One row of the results table: a method at a size (and, in an ablation, one value of the varied key)."""

    name: str
    method: str
    sized: Sized
    budget: int


@dataclass
class Run:
    arm: Arm
    stage: str  # "final" | "lr_trial"
    seed: int
    lr: float
    config: dict  # for ftcore.config.run_config; run_dir included
    hash: str

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def name(self) -> str:
        return self.run_dir.name


def label(value) -> str:
    """A short label for an ablation value: [q_proj, v_proj] -> q+v."""
    if isinstance(value, (list, tuple)):
        return "+".join(str(v).removesuffix("_proj") for v in value)
    return str(value)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text)


def plan_arms(cc: CompareConfig, model_cfg: ModelConfig) -> list[Arm]:
    """An arm per method (x ablation value), its size knob solved for cc.budget on the meta-device model."""
    values = cc.vary.values if cc.vary.key else [None]
    arms = []
    kinds = [(m, m, {}) for m in cc.methods] + [(name, v["method"], v) for name, v in cc.variants.items()]
    for base_name, method, variant in kinds:
        knob = KNOBS.get(method)
        if cc.vary.key and cc.vary.key == knob and cc.budget:
            raise FtcoreError(f"compare.vary.key={knob} is {method}'s size knob; set compare.budget=0 to ablate it")
        for value in values:
            settings = {**cc.peft.get(method, {}), **variant, "method": method}
            if cc.vary.key:
                settings[cc.vary.key] = list(value) if isinstance(value, (list, tuple)) else value
            max_size = cc.max_virtual_tokens if knob == "num_virtual_tokens" else cc.max_r
            sized = solve_budget(model_cfg, settings, cc.budget, max_size)
            name = f"{base_name} {cc.vary.key}={label(value)}" if cc.vary.key else base_name
            arms.append(Arm(name, method, sized, cc.budget))
    return arms


def resolved(d: dict) -> dict:
    """Every key of a run config made explicit (defaults filled in), validated."""
    return dataclasses.asdict(run_config(d))


def config_hash(d: dict) -> str:
    """Hash of what a run computes: the resolved config minus paths and logging (NOT_HASHED)."""
    cfg = resolved(d)
    for dotted in NOT_HASHED:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def trial_length(cc: CompareConfig, train: dict) -> dict:
    """A learning-rate trial's train.max_steps (compare.lr_steps, else a quarter of the run's) or train.epochs."""
    if not train["epochs"]:
        return {"max_steps": cc.lr_steps or max(1, train["max_steps"] // 4)}
    if cc.lr_steps:
        raise FtcoreError(f"compare.lr_steps={cc.lr_steps}: the runs are train.epochs={train['epochs']:g} long, "
                          "which has no step count to scale a trial's warmup by; expected compare.lr_steps=0 (trials "
                          "of a quarter of the epochs) or runs set by train.max_steps")  # fmt: skip
    return {"epochs": train["epochs"] / 4}


def make_run(base: dict, arm: Arm, seed: int, lr: float, out_dir: Path, group: str, stage: str = "final",
             trial: dict | None = None, trial_examples: int = 0) -> Run:  # fmt: skip
    """A run of `arm` with train.seed = peft.seed = seed at learning rate lr, in its own directory.

    trial (stage lr_trial): the trial's length from trial_length, {"max_steps": N} or {"epochs": E}.
    """
    cfg = copy.deepcopy(base)
    cfg["peft"] = {**arm.sized.peft, "seed": seed}
    cfg["train"].update(seed=seed, resume="auto")
    cfg["optim"]["lr"] = lr
    cfg["eval"]["baseline"] = False  # the sweep scores the base model once (zero- and few-shot)
    cfg["eval"]["few_shot"] = 0
    if stage == "lr_trial":  # a short run; warmup shrinks with it
        ((key, short),) = trial.items()
        full, cfg["train"][key] = cfg["train"][key], short
        cfg["optim"]["warmup_steps"] = round(cfg["optim"]["warmup_steps"] * short / full)
        cfg["eval"]["max_examples"] = trial_examples
        cfg["eval"]["forgetting"] = False  # a trial is chosen by its validation loss
    cfg["run_dir"] = "."
    cfg = resolved(cfg)
    digest = config_hash(cfg)
    lr_part = f"_lr{lr:g}" if stage == "lr_trial" else f"_s{seed}"
    name = slug(arm.name.replace(" ", "_")) + lr_part + "_" + digest[:8]
    cfg["run_dir"] = str(Path(out_dir) / ("lr_trials" if stage == "lr_trial" else "runs") / name)
    cfg["logger"]["wandb"]["group"] = group
    cfg["logger"]["wandb"]["name"] = name
    return locate(Run(arm, stage, seed, lr, cfg, digest))


def saved_hash(run_dir: Path) -> str | None:
    """The hash of a run directory's saved config, resolved by the current code (None if unreadable)."""
    try:
        if (run_dir / "config.json").is_file():
            return config_hash(json.loads((run_dir / "config.json").read_text()))
        if (run_dir / RUN_CONFIG_FILE).is_file():
            import yaml  # comes with Hydra

            return config_hash(yaml.safe_load((run_dir / RUN_CONFIG_FILE).read_text()))
    except (FtcoreError, ValueError, TypeError, KeyError):
        return None
    return None


def locate(run: Run) -> Run:
    """Use an existing directory of the same run made before a config key was added to ftcore.

    Its saved config, resolved by today's code (new keys take their defaults), has the run's hash,
    though its name carries the hash of the day it was made.
    """
    if run.run_dir.exists():
        return run
    stem = run.name.rsplit("_", 1)[0]
    for d in sorted(run.run_dir.parent.glob(f"{stem}_*")):
        if d.is_dir() and saved_hash(d) == run.hash:
            run.config["run_dir"] = str(d)
            run.config["logger"]["wandb"]["name"] = d.name
            break
    return run


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_state(run: Run) -> str:
    """finished (eval.json written) | diverged (stopped on a non-finite loss) | partial (has a checkpoint) | new."""
    if (run.run_dir / "eval.json").is_file():
        return "finished"
    if read_status(run.run_dir).get("status") == "diverged":
        return "diverged"
    if step_dirs(run.run_dir / "checkpoints"):
        return "partial"
    return "new"
