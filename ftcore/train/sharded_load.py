"""Sharded loading (dist=fsdp): no rank ever holds the whole model.

    model, tokenizer, model_dir = load_meta(path)     # the architecture on the meta device, no weights
    peft.apply(model, cfg, init=False)                 # the method's layers, on meta too
    parallelize(model, world, ...)                     # fully_shard: each parameter becomes a DTensor shard (meta)
    materialize(model, model_dir, dtype, device, cfg)  # storage for this rank's shards, filled from the checkpoint

Each rank reads only the rows of its own shards from the safetensors files (pread at the shard's byte
offset: FSDP2 shards a parameter by rows, and a row range is one contiguous byte range), converted to
the run's dtype, so a rank's memory is its shards plus one shard-sized read; nothing is sent between
ranks. We chose this over rank 0 reading and scattering each tensor: it reads every byte once in total
(once per replica under HSDP), needs no communication, and rank 0 never holds more than the others.
The adapter's parameters come from the same seeded init a 1-process run draws (peft.apply on a
stand-in of the base whose weights are zero-stride views, which costs no memory): every rank computes
the same whole adapter (it is small) and keeps its shards. Methods whose init reads the base weights
(peft.init_reads_base) and a quantized base (quantized as it is read) load the whole base instead.
"""

import warnings

import torch
from torch import nn

from ftcore import peft
from ftcore.formats.hf import build_model, checkpoint_tensors
from ftcore.peft.config import PeftConfig


def why_not_sharded(peft_cfg: PeftConfig, quantize: str) -> str | None:
    """Why this run loads the whole base on every rank instead, or None when it loads shards only."""
    if quantize != "none":
        return f"model.quantize={quantize}: the base is quantized as it is read"
    return peft.init_reads_base(peft_cfg)


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of the whole parameter that this rank's shard holds (all of them if not a DTensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], offset[0] + shape[0]


def local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


@torch.no_grad()
def fill_from_checkpoint(model: nn.Module, model_dir, dtype: torch.dtype) -> set[str]:
    """Copy this rank's rows of every checkpoint tensor into the (materialized) model; return the names filled.

    Names and whole shapes are checked as the whole-model load checks them (checkpoint_tensors). A tensor is
    read in the checkpoint's dtype, cast to `dtype` (model.dtype) and then to the parameter's (the float32
    trainables of full fine-tuning), as the whole-model load followed by the float32 cast computes it.
    """
    stand_in = build_model(model.cfg)  # the base's parameters, by name and whole shape
    stand_in.tie_weights()
    tensors = checkpoint_tensors(model_dir, stand_in)
    params = dict(model.named_parameters())
    for name, (st, stored) in tensors.items():
        p = params[name]
        start, stop = local_rows(p)
        local(p).copy_(st.read_rows(stored, start, stop).to(dtype).to(p.dtype))
    return set(tensors)


@torch.no_grad()
def adapter_init(model: nn.Module, peft_cfg: PeftConfig, tokenizer, dtype: torch.dtype):
    """The method's initial parameters and buffers by name, whole, on CPU: peft.apply with its seed on a stand-in
    of the base whose weights are zero-stride views of one zero (the method's init does not read them)."""
    stand_in = build_model(model.cfg)
    for module in stand_in.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            zeros = torch.zeros((), dtype=dtype).expand(p.shape)
            module.register_parameter(name, nn.Parameter(zeros, requires_grad=False))
    stand_in.tie_weights()
    stand_in.reset_buffers(torch.device("cpu"))
    with warnings.catch_warnings():  # the method's warnings were given when it was attached to the run's model
        warnings.simplefilter("ignore")
        peft.apply(stand_in, peft_cfg, tokenizer=tokenizer)
    peft.trainables_to_float32(stand_in)
    return dict(stand_in.named_parameters()), dict(stand_in.named_buffers())


@torch.no_grad()
def materialize(model: nn.Module, model_dir, dtype: torch.dtype, device: torch.device, peft_cfg: PeftConfig | None,
                tokenizer=None):  # fmt: skip
    """Give a sharded meta-device model (PEFT attached with init=False) this rank's storage and its values:
    the base from the checkpoint (this rank's rows), the method's parameters and buffers from its seeded init."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty makes new plain Parameters, one per module (a DTensor is swapped in place)
    filled = fill_from_checkpoint(model, model_dir, dtype)
    missing = [n for n, _ in model.named_parameters() if n not in filled]
    if missing:
        params, buffers = adapter_init(model, peft_cfg, tokenizer, dtype)
        for name, p in model.named_parameters():
            if name not in filled:
                start, stop = local_rows(p)
                local(p).copy_(params[name][start:stop])
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    model.reset_buffers(device)
    return model
