"""Fine-tune: `python scripts/train.py [peft=dora] [optim.lr=1e-4] [train.max_steps=200] ...` (Hydra)."""

import math
import os
import sys

import hydra
import hydra_schema  # scripts/hydra_schema.py: the dataclass defaults as Hydra's base
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ftcore.cli import STOPPED_EXIT, user_errors
from ftcore.config import run_config
from ftcore.train import train

hydra_schema.register()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        values = OmegaConf.to_container(cfg, resolve=True)
        values["run_dir"] = HydraConfig.get().runtime.output_dir
        result = train(run_config(values))
    if result.get("signal"):  # stopped after saving a checkpoint: schedulers requeue on 130/143, not on 0
        sys.exit(STOPPED_EXIT[result["signal"]])
    loss = result.get("best_val_loss")  # what a Hydra sweeper minimizes (no validation split: the worst value)
    return math.inf if loss is None else loss


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone writes .hydra/ and the job log
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none"]
    main()
