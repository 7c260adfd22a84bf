"""Evaluate and compare: `python scripts/evaluate.py run_dir=outputs/<run>` (Hydra; see conf/evaluate.yaml).

Writes eval.json, report.md (baseline vs fine-tuned: task metric and perplexity) and
predictions.jsonl into hydra.run.dir.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ftcore.errors import FtcoreError
from ftcore.eval.run import eval_run_config, evaluate


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
def main(cfg: DictConfig):
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
        values["out_dir"] = HydraConfig.get().runtime.output_dir
        evaluate(eval_run_config(values))
    except FtcoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
