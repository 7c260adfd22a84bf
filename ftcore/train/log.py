"""Run logging: metrics.jsonl (always), W&B (optional, imported lazily), all on rank 0 only."""

import json
import math
from pathlib import Path

from ftcore.config import LogConfig, WandbConfig
from ftcore.errors import FtcoreError


class RunLogger:
    """Appends one JSON object per event to metrics.jsonl and mirrors it to W&B when enabled."""

    def __init__(self, run_dir, cfg: LogConfig, config_dict: dict | None = None, rank: int = 0):
        self.rank = rank
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            self.wandb_run = start_wandb(cfg.wandb, Path(run_dir), config_dict)

    def log(self, event: dict):
        """event: {"step": int, ...numbers}; non-finite floats are written as null (valid JSON)."""
        if self.rank != 0:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if k != "step"}, step=clean["step"])

    def summary(self, values: dict):
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def start_wandb(cfg: WandbConfig, run_dir: Path, config_dict: dict | None):
    try:
        import wandb
    except ImportError:
        raise FtcoreError("logger.wandb.mode is not 'disabled' but wandb is not installed (pip install wandb)") from None
    return wandb.init(
        project=cfg.project, name=cfg.name, group=cfg.group, tags=list(cfg.tags), mode=cfg.mode,
        dir=str(run_dir), config=config_dict, reinit="finish_previous",
    )  # fmt: skip


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
