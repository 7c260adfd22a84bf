"""Evaluate and compare: `python scripts/evaluate.py run_dir=outputs/<run>` (Hydra; see conf/evaluate.yaml).

Writes eval.json, report.md (baseline vs fine-tuned: task metric and perplexity) and
predictions.jsonl into hydra.run.dir.
"""

import hydra
import hydra_schema  # scripts/hydra_schema.py: the dataclass defaults as Hydra's base
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ftcore.cli import user_errors
from ftcore.eval.run import eval_run_config, evaluate

hydra_schema.register()


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
def main(cfg: DictConfig):
    with user_errors():
        values = OmegaConf.to_container(cfg, resolve=True)
        values["out_dir"] = HydraConfig.get().runtime.output_dir
        evaluate(eval_run_config(values))


if __name__ == "__main__":
    main()
