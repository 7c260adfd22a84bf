"""Run logging: metrics.jsonl (always), W&B (optional, imported lazily), all on rank 0 only.

metrics.jsonl survives faults: each event is one whole line, written and fsynced before the step goes on;
a write that fails (a full disk) stops the run with one line, and the partial line it may leave at the
end is skipped with a warning by read_metrics and dropped by the resume's rewrite (rewrite_metrics).
"""

import json
import math
import os
import warnings
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
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise FtcoreError(f"{self.path}: cannot append the step {clean['step']} event ({e.strerror or e}); "
                              "the last checkpoint is intact: free space, then resume with train.resume=auto") from None
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
    """The events of metrics.jsonl; a partial last line (an interrupted append) is skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    events = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # no newline after it: the write was cut off
                warnings.warn(f"{path}:{i}: a partial last line (an interrupted write) is ignored", stacklevel=2)
                continue
            raise FtcoreError(f"{path}:{i}: expected one JSON object per line") from None
    return events


def rewrite_metrics(run_dir, events: list[dict]):
    """Replace metrics.jsonl by `events` atomically (a temporary file, then a rename)."""
    path = Path(run_dir) / "metrics.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
