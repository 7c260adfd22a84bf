"""ftcore imports and trains with torch and its data deps alone: no hydra, omegaconf, wandb, yaml,
transformers or peft (the last two are test-only references; hydra and wandb are lazy)."""

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
