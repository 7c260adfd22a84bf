"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a directory `checkpoints/step_00000120/` holding
  trainable.safetensors  the parameters that train (adapter, or the whole model for full fine-tuning)
  state.pt               optimizer, grad scaler, RNG states (python, numpy, torch, cuda), sampler
                         position, loop counters (step, best val loss, patience) and anything else
It is written under a temporary name and renamed into place, so a crash never leaves a partial
checkpoint that `latest()` would pick.

Multi-process runs (dist=ddp|fsdp) write a sharded checkpoint with torch.distributed.checkpoint (DCP):
  dcp/                   trainable parameters and optimizer state under their parameter names, each
                         rank writing its own shards (a shared filesystem is needed across nodes)
  rng_rank{R}.pt         each rank's RNG states
  state.pt               as above, minus the optimizer and RNG, plus the world size
All ranks write into `.tmp_step_N/`; after a barrier rank 0 renames it into place.
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
from ftcore.formats.safetensors import SafetensorsFile, save_safetensors

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state(every_gpu: bool = True) -> dict:
    """This process's RNG states; CUDA: every visible GPU's (one process) or only the current one's (a rank)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if every_gpu and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


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
    prune(root, keep, state.get("best_step"))
    return final


def prune(root: Path, keep: int, best_step: int | None):
    """Delete all but the newest `keep` checkpoints (never the best one); keep <= 0 keeps all."""
    if keep > 0:
        old = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))[:-keep]
        for p in old:
            if int(STEP_DIR.match(p.name).group(1)) != best_step:
                shutil.rmtree(p)


def remove_unfinished(ckpt_root):
    """Delete the `.tmp_step_*` directories a killed run left (a model's size each, for full fine-tuning)."""
    root = Path(ckpt_root)
    if root.is_dir():
        for d in root.glob(".tmp_step_*"):
            shutil.rmtree(d, ignore_errors=True)


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
    if is_sharded(ckpt_dir):
        n = torch.load(ckpt_dir / "state.pt", weights_only=False).get("world_size")
        raise FtcoreError(f"{ckpt_dir}: a sharded checkpoint of a {n}-process run; resume it with "
                          f"torchrun --nproc_per_node={n} ... dist=fsdp (or ddp)")  # fmt: skip
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


# --- sharded checkpoints (dist=ddp|fsdp): every rank calls these together ---


def is_sharded(ckpt_dir) -> bool:
    return (Path(ckpt_dir) / "dcp").is_dir()


def _dcp_state(model: torch.nn.Module, optimizer=None):
    """{"model": trainable parameters (DTensor shards under FSDP2), "optimizer": its state}, keyed by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer is not None else [], options=options)
    return {"model": model_sd, "optimizer": optim_sd} if optimizer is not None else {"model": model_sd}


def save_sharded(ckpt_root, step: int, model: torch.nn.Module, optimizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` with DCP from every rank: shards, per-rank RNG, rank 0's state.pt; atomic."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir()
    dist.barrier()
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / "dcp")
    torch.save(rng_state(every_gpu=False), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({**state, "step": step, "world_size": dist.get_world_size()}, tmp / "state.pt")
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep, state.get("best_step"))
    dist.barrier()
    return final


def load_sharded(ckpt_dir, model: torch.nn.Module, optimizer=None) -> dict:
    """Load a sharded checkpoint into the (sharded) model and optimizer on every rank; restore this
    rank's RNG states; return rank 0's saved state (state.pt)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").is_file():
        raise FtcoreError(f"{ckpt_dir}: not a checkpoint (no state.pt)")
    if not is_sharded(ckpt_dir):
        raise FtcoreError(f"{ckpt_dir}: a single-process checkpoint; resume it with dist=single (plain python)")
    state = torch.load(ckpt_dir / "state.pt", weights_only=False)
    world = dist.get_world_size()
    if state["world_size"] != world:
        raise FtcoreError(f"{ckpt_dir}: written by {state['world_size']} processes, resumed with {world}; "
                          f"use torchrun --nproc_per_node={state['world_size']} (and the same batch settings)")  # fmt: skip
    to_load = _dcp_state(model, optimizer)
    try:
        dcp.load(to_load, checkpoint_id=ckpt_dir / "dcp")
    except Exception as e:  # noqa: BLE001 - DCP reports missing keys/shapes in long multi-rank messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtcoreError(f"{ckpt_dir}: cannot load into this model ({first[:300]})") from None
    # strict=False: the frozen parameters are not in the checkpoint (dcp.load has checked the trainable ones)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        set_model_state_dict(model, to_load["model"], options=options)
    else:
        set_state_dict(model, [optimizer], model_state_dict=to_load["model"], optim_state_dict=to_load["optimizer"],
                       options=options)  # fmt: skip
    set_rng_state(torch.load(ckpt_dir / f"rng_rank{dist.get_rank()}.pt", weights_only=False))
    return state
