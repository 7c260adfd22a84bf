"""The scripts' Hydra base: the dataclass defaults, registered as the nodes conf/*.yaml start from.

conf/config.yaml, compare.yaml and evaluate.yaml list ftcore_run, ftcore_compare or ftcore_evaluate
first in their defaults, so every key exists (overridable as `train.max_steps=5`, no `+`; Hydra's struct
mode rejects unknown ones) and the group files hold only what an option changes. The nodes are plain
dicts: OmegaConf 2.3 cannot type `list[str] | str`, and ftcore.schema.build checks the types anyway.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ftcore.compare.config import COMPARABLE, CompareConfig
from ftcore.config import RunConfig
from ftcore.data.config import DEMOS
from ftcore.eval.run import EvalRunConfig
from ftcore.peft.config import PeftConfig
from ftcore.schema import declared


def data_name(path: str, task: str | None) -> str:
    """What run directories are named after: data.task where set, else the demo's name, else the file's stem."""
    if task:
        return task
    return path if path in DEMOS else Path(path).stem


def nodes() -> dict[str, dict]:
    """The base node of each primary config (run_dir/out_dir left out: the scripts set them to hydra.run.dir)."""
    run = {k: v for k, v in declared(RunConfig).items() if k != "run_dir"}
    compare = {k: v for k, v in run.items() if k != "peft"}  # the runs' shared base; PEFT settings per method
    compare["compare"] = {**declared(CompareConfig), "peft": {m: declared(PeftConfig) for m in COMPARABLE}}
    evaluate = {k: v for k, v in declared(EvalRunConfig).items() if k != "out_dir"}
    return {"ftcore_run": run, "ftcore_compare": compare, "ftcore_evaluate": evaluate}


def register():
    """Store the base nodes and the ftcore.data_name resolver (call before hydra.main or compose)."""
    cs = ConfigStore.instance()
    for name, node in nodes().items():
        cs.store(name=name, node=node)
    if not OmegaConf.has_resolver("ftcore.data_name"):
        OmegaConf.register_new_resolver("ftcore.data_name", data_name)
