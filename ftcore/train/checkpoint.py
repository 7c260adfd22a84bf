"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a directory `checkpoints/step_00000120/` holding
  trainable.safetensors  the parameters that train (adapter, or the whole model for full fine-tuning)
  state.pt               optimizer, grad scaler, RNG states (python, numpy, torch, cuda), sampler
                         position, loop counters (step, best val loss, patience) and anything else
  manifest.json          every other file's size and SHA-256, written last
It is written under a temporary name `.tmp_step_*`, fsynced and renamed into place, so a crash never leaves
a partial `step_*` directory; `newest_valid()` checks the manifest, so a checkpoint damaged afterwards
(a truncated copy, a bad disk) is skipped for the previous one. A full disk while writing is one
FtcoreError; the temporary directory is removed and the older checkpoints stay.

Multi-process runs (dist=ddp|fsdp) write a sharded checkpoint with torch.distributed.checkpoint (DCP):
  dcp/                   trainable parameters and optimizer state under their parameter names, each
                         rank writing its own shards (a shared filesystem is needed across nodes)
  rng_rank{R}.pt         each rank's RNG states
  state.pt               as above, minus the optimizer and RNG, plus the world size
All ranks write into `.tmp_step_N/` and hash a share of its files; rank 0 writes the manifest and renames
the directory into place.
Either format resumes with any number of processes: DCP reshards a sharded checkpoint (or joins it for one
process), and a single-process checkpoint is sent to the ranks' shards tensor by tensor.
"""

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ftcore.errors import FtcoreError
from ftcore.formats.safetensors import SafetensorsFile, save_safetensors

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ftcore-checkpoint/1"


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
    with write_errors(final, tmp):
        save_safetensors(trainable_state(model), tmp / "trainable.safetensors")
        save_torch({**state, "rng": rng_state(), "step": step}, tmp / "state.pt")
        write_manifest(tmp, file_hashes(tmp, manifest_files(tmp)))
    publish(tmp, final)
    prune(root, keep, state.get("best_step"))
    return final


@contextmanager
def write_errors(final: Path, tmp: Path):
    """A failed write (a full disk, an I/O error) becomes one FtcoreError; the unfinished directory is removed."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(final, describe(e)) from None


def describe(e: BaseException) -> str:
    return getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def write_failure(final: Path, cause: str) -> FtcoreError:
    free = shutil.disk_usage(final.parent).free / 2**30
    return FtcoreError(f"{final}: cannot write the checkpoint ({cause}; {free:.2f} GiB free); "
                       "the older checkpoints are intact")  # fmt: skip


class _RecordingFile:
    """A binary file whose write errors are remembered: torch.save reports them as a bare RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def save_torch(obj, path: Path):
    """torch.save, fsynced; a failed write raises the OSError that caused it."""
    with open(path, "wb") as raw:
        f = _RecordingFile(raw)
        try:
            torch.save(obj, f)
        except RuntimeError:
            if f.error is not None:
                raise f.error from None
            raise
        raw.flush()
        os.fsync(raw.fileno())


def load_torch(path: Path):
    """torch.load of a file we wrote; a missing, empty or truncated one is one FtcoreError."""
    if not path.is_file():
        raise FtcoreError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        size = path.stat().st_size
        raise FtcoreError(f"{path}: cannot read it ({size} bytes; truncated or corrupt: {first})") from None


def publish(tmp: Path, final: Path):
    """Rename a complete checkpoint directory into place (replacing one of the same step) and fsync the parent."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the manifest ---


def manifest_files(ckpt_dir: Path) -> list[str]:
    """The checkpoint's files (not the manifest), relative to it, sorted."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_hashes(ckpt_dir: Path, names: list[str]) -> dict:
    """{relative name: {"bytes": size, "sha256": hex digest}}."""
    out = {}
    for name in names:
        h = hashlib.sha256()
        with open(ckpt_dir / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[name] = {"bytes": (ckpt_dir / name).stat().st_size, "sha256": h.hexdigest()}
    return out


def write_manifest(ckpt_dir: Path, files: dict):
    with open(ckpt_dir / MANIFEST, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def verify(ckpt_dir) -> str | None:
    """Why `ckpt_dir` is not the complete checkpoint its manifest describes, or None if it is."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST}"
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is corrupt"
    for name, (size, _) in expected.items():
        if not (ckpt_dir / name).is_file():
            return f"{name} is missing"
        if (ckpt_dir / name).stat().st_size != size:
            return f"{name} has {(ckpt_dir / name).stat().st_size} bytes, the manifest says {size} (truncated?)"
    actual = file_hashes(ckpt_dir, list(expected))
    for name, (_, digest) in expected.items():
        if actual[name]["sha256"] != digest:
            return f"{name} differs from the manifest's checksum (corrupt)"
    return None


def step_dirs(ckpt_root) -> list[Path]:
    """The `step_*` checkpoint directories under ckpt_root, oldest first."""
    root = Path(ckpt_root)
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []


def newest_valid(ckpt_root) -> Path | None:
    """The newest checkpoint that passes `verify`, or None. Newer ones that fail are renamed aside to
    `step_N.corrupt` (kept for inspection, never resumed, nor kept by `prune` as the newest) with a warning."""
    for ckpt in reversed(step_dirs(ckpt_root)):
        reason = verify(ckpt)
        if reason == f"no {MANIFEST}":  # written before checkpoints had one: its files must at least load
            reason = loads_without_manifest(ckpt)
        if reason is None:
            return ckpt
        aside = ckpt.with_name(ckpt.name + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        warnings.warn(f"{ckpt}: {reason}; skipped (moved to {aside.name}), resuming from an older checkpoint",
                      stacklevel=2)  # fmt: skip
    return None


def loads_without_manifest(ckpt: Path) -> str | None:
    """Why a checkpoint without a manifest cannot be read (state.pt, and the parameters' header), or None."""
    try:
        load_torch(ckpt / "state.pt")
        if not is_sharded(ckpt):
            if not (ckpt / "trainable.safetensors").is_file():
                return "trainable.safetensors is missing"
            SafetensorsFile(ckpt / "trainable.safetensors")
    except FtcoreError as e:
        return str(e)
    return None


def prune(root: Path, keep: int, best_step: int | None):
    """Delete all but the newest `keep` checkpoints (never the best one); keep <= 0 keeps all."""
    if keep > 0:
        for p in step_dirs(root)[:-keep]:
            if int(STEP_DIR.match(p.name).group(1)) != best_step:
                shutil.rmtree(p)


def remove_unfinished(ckpt_root):
    """Delete the `.tmp_step_*` directories a killed run left (a model's size each, for full fine-tuning)."""
    root = Path(ckpt_root)
    if root.is_dir():
        for d in root.glob(".tmp_step_*"):
            shutil.rmtree(d, ignore_errors=True)


def load(ckpt_dir, model: torch.nn.Module, optimizer=None) -> dict:
    """One process: the saved trainable parameters (and optimizer state) into `model`, the RNG states restored;
    return the saved state. A sharded checkpoint (any world size) loads too, DCP joining its shards."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").is_file():
        raise FtcoreError(f"{ckpt_dir}: not a checkpoint (no state.pt)")
    if is_sharded(ckpt_dir):
        return _load_dcp(ckpt_dir, model, optimizer, rank=0, distributed=False)
    state = load_torch(ckpt_dir / "state.pt")
    st = _trainable_file(ckpt_dir, model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in st.names():
            params[name].copy_(st.get(name))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


def _trainable_file(ckpt_dir: Path, model: torch.nn.Module) -> SafetensorsFile:
    """trainable.safetensors, checked against the model's trainable parameters (names and whole shapes)."""
    if not (ckpt_dir / "trainable.safetensors").is_file():
        raise FtcoreError(f"{ckpt_dir / 'trainable.safetensors'}: missing (the checkpoint is incomplete)")
    st = SafetensorsFile(ckpt_dir / "trainable.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(st.names()) != set(trainable):
        diff = sorted(set(st.names()) ^ set(trainable))
        raise FtcoreError(f"{ckpt_dir}: trainable parameters differ from the model's, e.g. {diff[0]!r}")
    for name in st.names():  # a DTensor's shape is the whole parameter's
        if st.shape(name) != tuple(trainable[name].shape):
            raise FtcoreError(f"{ckpt_dir}: tensor {name!r} has shape {list(st.shape(name))}, model has "
                              f"{list(trainable[name].shape)}")  # fmt: skip
    return st


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
    from torch.distributed.checkpoint.api import CheckpointException

    rank = dist.get_rank()
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir()
    dist.barrier()
    cause = None
    try:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / "dcp")
        save_torch(rng_state(every_gpu=False), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            save_torch({**state, "step": step, "world_size": dist.get_world_size()}, tmp / "state.pt")
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP gathers the ranks' write errors
        cause = describe(e)
    causes = [None] * dist.get_world_size()
    dist.all_gather_object(causes, cause)  # every rank's files are complete, or every rank raises
    if any(causes):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise write_failure(final, next(c for c in causes if c))
    names = manifest_files(tmp)
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, file_hashes(tmp, names[rank :: dist.get_world_size()]))  # a share each
    if rank == 0:
        write_manifest(tmp, {name: h[name] for h in hashes for name in h})
        publish(tmp, final)
        prune(root, keep, state.get("best_step"))
    dist.barrier()
    return final


def load_sharded(ckpt_dir, model: torch.nn.Module, optimizer=None) -> dict:
    """Every rank together: a checkpoint into the (sharded) model and optimizer; return rank 0's saved state.

    A sharded checkpoint may come from another world size: DCP reads each rank's slices from the saved shards
    (resharding). A single-process checkpoint is read by rank 0 and sent tensor by tensor, each rank keeping its
    shards. Each rank restores its own saved RNG states where the checkpoint has them (same or larger world).
    """
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").is_file():
        raise FtcoreError(f"{ckpt_dir}: not a checkpoint (no state.pt)")
    if is_sharded(ckpt_dir):
        return _load_dcp(ckpt_dir, model, optimizer, dist.get_rank(), distributed=True)
    return _load_whole_into_shards(ckpt_dir, model, optimizer, dist.get_rank())


def _load_dcp(ckpt_dir: Path, model, optimizer, rank: int, distributed: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = load_torch(ckpt_dir / "state.pt")
    to_load = _dcp_state(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes so
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(to_load, checkpoint_id=ckpt_dir / "dcp", no_dist=not distributed)
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
    if (ckpt_dir / f"rng_rank{rank}.pt").is_file():
        set_rng_state(load_torch(ckpt_dir / f"rng_rank{rank}.pt"))
    return state


def _load_whole_into_shards(ckpt_dir: Path, model, optimizer, rank: int) -> dict:
    """A single-process checkpoint into a sharded model: rank 0 reads it, set_state_dict sends each tensor."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    st = _trainable_file(ckpt_dir, model)  # every rank checks names and shapes, so all fail together
    model_sd, optim_sd, state, error = {}, {}, None, None
    if rank == 0:
        try:
            state = load_torch(ckpt_dir / "state.pt")
            saved_optimizer, rng = state.pop("optimizer"), state.pop("rng")
            model_sd = {name: st.get(name) for name in st.names()}
            if optimizer is not None:
                optim_sd = _optimizer_by_name(saved_optimizer, model, optimizer)
            set_rng_state(rng)
        except FtcoreError as e:
            error = str(e)
    box = [(state, error)]
    dist.broadcast_object_list(box, src=0)  # the sampler and loop state, small (or rank 0's error)
    state, error = box[0]
    if error is not None:
        raise FtcoreError(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, ignore_frozen_params=True,
                               strict=False)  # fmt: skip
    # separately: set_state_dict would take the other ranks' empty model dict for "optimizer only"
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, [optimizer], optim_sd, options=options)
    return state


def _optimizer_by_name(saved: dict, model: torch.nn.Module, optimizer) -> dict:
    """A torch optimizer state dict (parameters by position) keyed by parameter name instead, as DCP's is.
    Positions follow the optimizer's groups, which build_optimizer fills in the same order at any world size."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups, i = [], 0
    for group in saved["param_groups"]:
        groups.append({**group, "params": order[i : i + len(group["params"])]})
        i += len(group["params"])
    if i != len(order):
        raise FtcoreError(f"the checkpoint's optimizer has {i} parameters, this run's {len(order)}")
    return {"state": {order[k]: v for k, v in saved["state"].items()}, "param_groups": groups}
