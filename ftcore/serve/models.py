"""What the server serves: one base model, any number of adapters on it, and the engines that batch them.

An Engine is one model that decodes one batch at a time. The shared engine is the base model with a Router
at every module some LoRA-family/IA3/LN-tuning/OFT/... adapter replaced (routing.py): requests for the base
and for all those adapters share its batches. An adapter that changes the sequence (prefix, prompt tuning,
P-tuning) gets an engine of its own (a shared_copy of the base, so no base tensor is duplicated); so does a
whole fine-tuned model (a directory with config.json, e.g. full fine-tuning's final/), which has its own
weights. An adapter that changes the base weights when attached (an unconverted PiSSA/OLoRA adapter, or one
whose file carries base weights) is attached to a private copy of the base and routed like the others. Lily
mixes the rows of a batch (its router averages over all of them): its requests decode one at a time on an
engine of their own.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_pretrained
from ftcore.formats.safetensors import SafetensorsFile
from ftcore.peft.attach import VIRTUAL_TOKENS
from ftcore.peft.config import is_principal
from ftcore.peft.io import CONFIG, WEIGHTS, config_from_peft, load_adapter, read_json_object
from ftcore.serve.routing import Routing, attach_routers, shared_copy

# Lily's router averages its softmax over every token of the batch, so a row's answer depends on its batch mates
# (and on padding): its requests are decoded one at a time.
ROW_COUPLED = ("lily",)


@dataclass
class Engine:
    """A model decoding one batch at a time; `routing` is set for the shared (routed) engine only."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    routing: Routing | None = None
    max_batch: int = 0  # rows per batch, 0 = the server's --max-batch; 1 for a method whose rows interact


@dataclass
class Served:
    """A model name clients ask for: its engine and, on the shared engine, its adapter index (0 = base)."""

    name: str
    engine: Engine
    adapter: int = 0
    method: str = "base"
    path: str = ""
    drift_reference: Path | None = None  # the training run's drift_reference.json, when the run saved one


@dataclass
class ServedModels:
    base: Served
    by_name: dict[str, Served] = field(default_factory=dict)

    @property
    def engines(self) -> list[Engine]:
        seen = {}
        for s in self.by_name.values():
            seen.setdefault(id(s.engine), s.engine)
        return list(seen.values())


def adapter_method(adapter_dir: Path) -> tuple[str, bool]:
    """(method, loading it changes the base weights): an unconverted PiSSA/OLoRA init, or base weights saved in the
    adapter file (HF PEFT saves a targeted embed_tokens/lm_head's `base_layer.weight`, and loading copies them in)."""
    path = adapter_dir / CONFIG
    cfg = config_from_peft(read_json_object(path), path)
    weights = adapter_dir / WEIGHTS
    carries_base = weights.is_file() and any(".base_layer." in n for n in SafetensorsFile(weights).names())
    return cfg.method, is_principal(cfg.init) or carries_base


def run_drift_reference(model_dir: Path) -> Path | None:
    """A run's final/ sits in the run directory, beside the drift_reference.json training saved."""
    path = model_dir.parent / "drift_reference.json"
    return path if path.is_file() else None


def load_served(base_path: str, adapters: dict[str, str], dtype=torch.float32, device="cpu",
                base_name: str = "") -> ServedModels:  # fmt: skip
    """Load the base and every adapter (name -> directory); names must be unique and differ from the base's."""
    model, tokenizer = load_pretrained(base_path, dtype=dtype, device=device)
    model.eval()
    base_name = base_name or Path(str(base_path).rstrip("/")).name or "base"
    routed, routed_served, own = [], [], []
    for name, where in adapters.items():
        if name == base_name:
            raise FtcoreError(f"--adapter {name}={where}: the name is the base model's; pick another")
        where = Path(where)
        if (where / "config.json").is_file() and not (where / CONFIG).is_file():  # a whole fine-tuned model
            m, tok = load_pretrained(where, dtype=dtype, device=device)
            m.eval()
            own.append(Served(name, Engine(name, m, tok), 0, "full", str(where), run_drift_reference(where)))
            continue
        if not (where / CONFIG).is_file():
            raise FtcoreError(f"--adapter {name}={where}: no {CONFIG} or config.json (expected a PEFT adapter "
                              "directory such as <run>/final, or a whole model)")  # fmt: skip
        method, changes_base = adapter_method(where)
        m = load_adapter(copy.deepcopy(model) if changes_base else shared_copy(model), where)
        m.eval()
        if method in VIRTUAL_TOKENS or method in ROW_COUPLED:  # changes the sequence, or mixes rows: on its own
            engine = Engine(name, m, tokenizer, max_batch=1 if method in ROW_COUPLED else 0)
            own.append(Served(name, engine, 0, method, str(where), run_drift_reference(where)))
        else:
            routed.append(m)
            routed_served.append(Served(name, None, len(routed), method, str(where), run_drift_reference(where)))
    shared = Engine(base_name, model, tokenizer, attach_routers(model, routed))
    served = ServedModels(Served(base_name, shared, 0, "base", str(base_path)))
    served.by_name[base_name] = served.base
    for s in routed_served:
        s.engine = shared
        served.by_name[s.name] = s
    for s in own:
        served.by_name[s.name] = s
    return served


def comparison_adapters(comparison_dir) -> dict[str, str]:
    """Every final/ of a comparison directory (its plan.json's runs), named `<arm>-seed<k>`."""
    plan_path = Path(comparison_dir) / "plan.json"
    if not plan_path.is_file():
        raise FtcoreError(f"{plan_path}: not found (expected a scripts/compare.py output directory)")
    plan = json.loads(plan_path.read_text())
    out = {}
    for run in plan.get("runs", []):
        run_dir = Path(run["run_dir"])
        if not run_dir.is_absolute():  # relative to where compare ran: look beside plan.json
            run_dir = plan_path.parent / "runs" / run_dir.name
        final = run_dir / "final"
        if final.is_dir():
            out[f"{run['arm']}-seed{run['seed']}"] = str(final)
    if not out:
        raise FtcoreError(f"{comparison_dir}: no finished run has a final/ directory")
    return out
