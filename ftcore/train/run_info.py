"""What makes a run reproducible, saved in its directory: resolved config, git SHA, package versions."""

import dataclasses
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "huggingface_hub", "hydra-core", "wandb", "ftcore")


def git_state(repo: Path) -> dict:
    def git(*args):
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}


def versions(packages=PACKAGES) -> dict:
    """Python's version and each package's installed version (None if not installed)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_run_info(run_dir: Path, cfg) -> None:
    """config.yaml + config.json (the resolved config) and run_info.json (git, versions, command)."""
    config = dataclasses.asdict(cfg)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
    except ImportError:  # JSON is valid YAML: the library runs without PyYAML (it comes with Hydra)
        text = json.dumps(config, indent=2) + "\n"
    (run_dir / "config.yaml").write_text(text)
    info = {"git": git_state(Path(__file__).resolve().parents[2]), "versions": versions(), "argv": sys.argv,
            "host": platform.node(), "platform": platform.platform()}  # fmt: skip
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
