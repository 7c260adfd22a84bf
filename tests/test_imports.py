"""ftcore imports and trains with torch and its data deps alone: no hydra, omegaconf, wandb, yaml,
transformers or peft (the last two are test-only references; hydra and wandb are lazy)."""

import os
import subprocess
import sys

from test_train import data_cache, tiny_dir  # noqa: F401 (fixtures)

BLOCKED = ("hydra", "omegaconf", "wandb", "yaml", "transformers", "peft", "accelerate", "lightning", "trl")

SCRIPT = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import ftcore
for m in pkgutil.walk_packages(ftcore.__path__, "ftcore."):
    importlib.import_module(m.name)
from ftcore.config import run_config
from ftcore.train import train
result = train(run_config({{
    "model": {{"path": sys.argv[1]}}, "peft": {{"method": "ia3"}},
    "data": {{"path": "arithmetic", "task": "arithmetic", "cache_dir": sys.argv[2]}},
    "train": {{"max_steps": 2, "batch_size": 2, "eval_every": 0, "device": "cpu"}},
    "eval": {{"baseline": False, "max_examples": 2, "max_new_tokens": 2}},
    "logger": {{"wandb": {{"mode": "disabled"}}, "progress": False}}, "run_dir": sys.argv[3],
}}))
assert result["status"] == "finished", result
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
"""


def test_library_runs_without_optional_packages(tiny_dir, data_cache, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_dir), data_cache, str(tmp_path)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok []"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "final" / "adapter_config.json").is_file()


def test_pyproject_lists_every_package():
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "ftcore").rglob("__init__.py")}
    assert set(listed) == found | {"ftcore.kernels"}


def test_installed_package_finds_the_kernel_sources(tmp_path):
    """A non-editable install (what a wheel holds) ships kernels/ as ftcore/kernels, and ops finds it there."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    for name in ("ftcore", "kernels"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    probe = "import ftcore.model.ops as ops; print(ops.kernel_dir()); print(*sorted(p.name for p in ops.kernel_dir().iterdir()))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    where, names = r.stdout.splitlines()
    assert Path(where) == site / "ftcore" / "kernels"
    assert set(names.split()) >= {"ftcore_kernels.cpp", "rms_norm.cu", "rope.cu", "swiglu.cu", "common.cuh"}
