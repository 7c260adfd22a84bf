"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a directory `checkpoints/step_00000120/` holding
  trainable.safetensors  the parameters that train (adapter, or the whole model for full fine-tuning)
  state.pt               optimizer, grad scaler, RNG states (python, numpy, torch, cuda), sampler
                         position, loop counters (step, best val loss, patience) and anything else
It is written under a temporary name and renamed into place, so a crash never leaves a partial
checkpoint that `latest()` would pick.
"""

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ftcore.errors import FtcoreError
from ftcore.safetensors_io import SafetensorsFile, save_safetensors

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save(ckpt_root, step: int, model: torch.nn.Module, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under ckpt_root atomically; keep the newest `keep` (and any `best`)."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_step_", dir=root))
    save_safetensors(trainable_state(model), tmp / "trainable.safetensors")
    torch.save({**state, "rng": rng_state(), "step": step}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        protected = {state.get("best_step")}
        old = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))[:-keep]
        for p in old:
            if int(STEP_DIR.match(p.name).group(1)) not in protected:
                shutil.rmtree(p)
    return final


def latest(ckpt_root) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = Path(ckpt_root)
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    return steps[-1] if steps else None


def load(ckpt_dir, model: torch.nn.Module) -> dict:
    """Copy the saved trainable parameters into `model`, restore RNG states; return the saved state."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").is_file():
        raise FtcoreError(f"{ckpt_dir}: not a checkpoint (no state.pt)")
    params = dict(model.named_parameters())
    st = SafetensorsFile(ckpt_dir / "trainable.safetensors")
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(st.names()) != trainable:
        diff = sorted(set(st.names()) ^ trainable)
        raise FtcoreError(f"{ckpt_dir}: trainable parameters differ from the model's, e.g. {diff[0]!r}")
    with torch.no_grad():
        for name in st.names():
            if st.shape(name) != tuple(params[name].shape):
                raise FtcoreError(
                    f"{ckpt_dir}: tensor {name!r} has shape {list(st.shape(name))}, model has {list(params[name].shape)}"
                )
            params[name].copy_(st.get(name))
    state = torch.load(ckpt_dir / "state.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state
