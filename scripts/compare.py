"""Compare PEFT methods at matched trainable-parameter budgets over several seeds (Hydra).

    python scripts/compare.py compare.methods=[lora,ia3,prompt] compare.seeds=[0,1] compare.budget=200000 \
        data=arithmetic train.max_steps=100 [compare.lrs=[1e-3,1e-2]] [hydra.run.dir=comparisons/x]

Every run is an ordinary training run in <hydra.run.dir>/runs/; results.csv, results.md and the
plots land in hydra.run.dir. Rerunning the same command skips finished runs and resumes the rest.
"""

import shlex

import hydra
import hydra_schema  # scripts/hydra_schema.py: the dataclass defaults as Hydra's base
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ftcore.cli import user_errors
from ftcore.compare import compare_config, run_comparison

hydra_schema.register()


@hydra.main(config_path="../conf", config_name="compare", version_base=None)
def main(cfg: DictConfig) -> float | None:
    with user_errors("interrupted; rerun the same command to resume"):  # returns a value for Hydra's sweepers
        values = OmegaConf.to_container(cfg, resolve=True)
        cc = compare_config(values.pop("compare"))
        hc = HydraConfig.get()
        command = shlex.join(["python", "scripts/compare.py", *hc.overrides.task])
        result = run_comparison(cc, values, hc.runtime.output_dir, command=command)
    scores = [r["score_mean"] for r in result.get("results", []) if r["score_mean"] is not None]
    return max(scores) if scores else None


if __name__ == "__main__":
    main()
