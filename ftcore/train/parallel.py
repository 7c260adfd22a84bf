"""How the model runs across processes and memory: torchrun setup, activation checkpointing, FSDP2 / DDP.

    world = init_distributed(cfg.dist, cfg.train.device)  # torchrun's RANK/WORLD_SIZE/LOCAL_RANK; nccl or gloo
    enable_activation_checkpointing(model)                # before sharding: block forwards wrapped in place
    train_model = parallelize(model, world, precision)    # FSDP2 shards `model` in place; DDP returns a wrapper
    whole = gather_model(model, world)                    # rank 0: the unsharded model (all shards), else None
    save_pretrained(model, out, whole=whole_tensor, writer=world.rank == 0)  # streamed: one whole tensor at a time

FSDP2 (`fully_shard` per block, on the token table and lm_head, then the root) and DDP both average gradients over
ranks; the step scales its loss by the world size so that average is the sum over the global batch (see
step.py). The loss is computed inside the model's forward, so neither wrapper needs a special case.
Single-process runs get a World of size 1 whose collectives are identities.
"""

import atexit
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ftcore.errors import FtcoreError

LAUNCH = "launch it with torchrun, e.g. `torchrun --nproc_per_node=2 scripts/train.py dist={}`"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FtcoreError(f"train.device={name!r} but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


@dataclass
class World:
    """This process's place in the run; the collectives are no-ops for a single process."""

    backend: str = "single"  # single | ddp | fsdp
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.backend != "single"

    def print(self, *args):
        if self.rank == 0:
            print(*args, flush=True)

    def sum(self, value):
        """The sum of `value` (a number) over all ranks; ints stay ints."""
        if not self.distributed:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return round(t.item()) if isinstance(value, int) else t.item()

    def any(self, flag: bool) -> bool:
        return self.sum(int(bool(flag))) > 0

    def all(self, flag: bool) -> bool:
        return self.sum(int(not flag)) == 0

    def gather(self, obj) -> list:
        """Every rank's `obj` (anything picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` (anything picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(backend: str, device_name: str = "auto", timeout_minutes: int = 60) -> World:
    """A World from torchrun's environment (or an already initialized process group, as tests make).

    ddp/fsdp: device cuda:LOCAL_RANK and backend nccl when CUDA is available (and train.device is
    not cpu), else cpu with gloo. The group is destroyed at exit.
    """
    size_env = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "single":
        if size_env > 1 or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise FtcoreError(f"dist=single but {max(size_env, 2)} processes were started; use dist=ddp or dist=fsdp")
        return World(device=pick_device(device_name))
    if not dist.is_available():
        raise FtcoreError(f"dist={backend}: this torch build has no torch.distributed")
    initialized = dist.is_initialized()
    if not initialized and "RANK" not in os.environ:
        raise FtcoreError(f"dist={backend}: RANK/WORLD_SIZE are not set; {LAUNCH.format(backend)}")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if initialized else 0))
    if device_name not in ("auto", "cpu", "cuda"):
        raise FtcoreError(f"train.device={device_name!r} with dist={backend}: each process uses cuda:LOCAL_RANK; "
                          "use train.device=auto, cuda or cpu")  # fmt: skip
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not initialized:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
        atexit.register(_destroy)
    return World(backend, dist.get_rank(), dist.get_world_size(), local_rank, device)


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them.

    The block's forward is wrapped in place (no wrapper module), so parameter names, state dicts
    and adapter keys are unchanged. Non-reentrant checkpointing restores the RNG (dropout) state.
    Call it before fully_shard: FSDP2's hooks then run around the checkpointed forward, and the
    recomputation in backward sees the parameters FSDP2 has just all-gathered for that block.
    """
    for block in model.layers:
        if getattr(block, "_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._checkpointed = True
    return model


def parallelize(model: nn.Module, world: World, precision: str = "fp32", replicate: int = 1,
                cpu_offload: bool = False) -> nn.Module:  # fmt: skip
    """What the train step calls: the model (single, or sharded in place by FSDP2) or its DDP wrapper.

    Apply PEFT, the float32 cast of trainable parameters and activation checkpointing first.
    FSDP2: one group per block; a frozen token table and lm_head in a group that is never gathered (each rank
    broadcasts its rows block by block where they are used: model/vocab_stream.py); a trainable untied table in
    its own group; then the root (final norm, a trainable lm_head (with the embeddings when tied), prefix/prompt
    encoders), which stays gathered from the first forward to the end of backward. With precision=bf16 the
    gathered parameters are bf16 and gradients reduce in fp32.
    replicate > 1 (HSDP): a 2-D mesh [replicate, world / replicate]; each replica shards the model over its
    row of ranks and gradients are reduce-scattered within it, then all-reduced across replicas.
    cpu_offload: FSDP2's CPUOffloadPolicy (sharded parameters, gradients, optimizer state on the host).
    """
    if world.backend == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if world.backend == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if world.size % replicate:
            raise FtcoreError(f"dist.replicate={replicate} does not divide the world size {world.size}: each replica "
                              "needs the same number of ranks")  # fmt: skip
        if replicate > 1:
            mesh = init_device_mesh(world.device.type, (replicate, world.size // replicate),
                                    mesh_dim_names=("replicate", "shard"))  # fmt: skip
        else:
            mesh = init_device_mesh(world.device.type, (world.size,))
        options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32))
        if cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
        for block in model.layers:
            fully_shard(block, **options)
        stream = vocab_stream(model, precision)
        streamed = [m for m, on in ((model.embed_tokens, stream.embed), (model.lm_head, stream.head)) if on]
        if streamed:  # one group that is never gathered: its rows are broadcast block by block where used
            fully_shard(streamed, **options)
            model.vocab_stream = stream
        if not model.cfg.tie_word_embeddings and not stream.embed:  # gathered for the lookup only
            fully_shard(model.embed_tokens, **options)
        fully_shard(model, **options)  # the rest; a trainable tied table is lm_head's too: the root's
        if world.device.type == "cpu":  # no streams to overlap with: free each all-gather buffer at its copy-out
            model._set_unshard_async_op(True)  # (synchronous, FSDP2 keeps it until the next one, for CUDA streams)
    return model


def vocab_stream(model: nn.Module, precision: str):
    """Which of the token table and lm_head FSDP2 leaves sharded, used block by block (model/vocab_stream.py):
    each one that is frozen and plain (nn.Embedding, bias-free nn.Linear: no adapter over it)."""
    from ftcore.model.vocab_stream import VocabStream

    embed = type(model.embed_tokens) is nn.Embedding and not model.embed_tokens.weight.requires_grad
    head = type(model.lm_head) is nn.Linear and model.lm_head.bias is None and not model.lm_head.weight.requires_grad
    if model.cfg.tie_word_embeddings:
        embed = head = embed and head
    return VocabStream(embed, head, dtype=torch.bfloat16 if precision == "bf16" else None)


def grad_sync(train_model: nn.Module, sync: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step (FSDP2 reduces each)."""
    if not sync and isinstance(train_model, DistributedDataParallel):
        return train_model.no_sync()
    return nullcontext()


def gather_model(model: nn.Module, world: World, frozen: bool = True) -> nn.Module | None:
    """The whole model on rank 0 (None elsewhere); every rank calls it together.

    FSDP2: every rank sends its shards and rank 0 builds a plain copy (same PEFT method, all
    tensors whole) on its device; never rank 0's slice alone. Single-process and DDP models
    (`model` is the unwrapped module) are whole already.
    frozen=False: only the trainable parameters and the buffers are gathered, the frozen base of the copy
    stays on the meta device (no memory): what saving an adapter reads.
    """
    if world.backend != "fsdp":
        return model if world.rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ftcore import peft
    from ftcore.model import Transformer
    from ftcore.quant.weight import QuantStorage

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if frozen:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # one trainable at a time, the frozen shards never gathered (the state dict API gathers them all first)
        state = {n: whole_tensor(p) for n, p in model.named_parameters() if n in trainable}
    if world.rank != 0:
        return None
    state = {n: t.cpu() for n, t in state.items()}
    with torch.device("meta"):
        whole = Transformer(model.cfg)
    for name, layer in model.named_modules():  # a quantized base: the same quantized layers, to take the whole tensors
        if frozen and isinstance(layer, QuantStorage):
            parent, _, leaf = name.removesuffix(".base_layer").rpartition(".")
            setattr(whole.get_submodule(parent), leaf, layer.empty_copy())
    if getattr(model, "peft_config", None) is not None:
        peft.apply(whole, model.peft_config, init=False)
    missing, unexpected = whole.load_state_dict(state, strict=False, assign=True)
    whole.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_word_embeddings)
               and (frozen or k in trainable)]  # fmt: skip
    if missing or unexpected:
        raise RuntimeError(f"gather_model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # buffers outside the state dict (FSDP2 does not shard them): VeRA's shared matrices, PiSSA's initial adapter
    modules = dict(whole.named_modules())
    for name, buf in model.named_buffers():
        module, _, leaf = name.rpartition(".")
        if module in modules:  # frozen=False: a quantized base layer's buffers have no place in the plain copy
            modules[module]._buffers[leaf] = buf.detach().to(world.device, copy=True)
    whole.reset_buffers(world.device)
    if getattr(model, "adalora", None) is not None:  # the saved adapter keeps only the allocator's kept ranks
        whole.adalora.rank_pattern = model.adalora.rank_pattern
    if getattr(model, "hf_config", None) is not None:
        whole.hf_config = model.hf_config
    return whole.to(world.device).train(model.training) if frozen else whole


def whole_tensor(t: torch.Tensor) -> torch.Tensor | None:
    """A parameter's whole tensor on rank 0, None on the others (every rank calls it together).

    An FSDP2 shard (a DTensor sharded by rows over all ranks): each rank sends its rows and rank 0 receives
    them in place into one buffer, so rank 0 holds one whole tensor and the others nothing more (full_tensor()
    would all-gather it to every rank, and copy it once more). Other layouts (HSDP): full_tensor(). Not a
    DTensor: the tensor itself.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t.detach()
    mesh, rank = t.device_mesh, dist.get_rank()
    local = t.to_local().detach().to(mesh.device_type)  # dist.cpu_offload keeps shards on the host; NCCL needs a GPU
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or mesh.size() != dist.get_world_size():
        full = DTensor.from_local(local, mesh, t.placements, shape=t.shape, stride=t.stride()).full_tensor()
        return full if rank == 0 else None
    world = mesh.size()
    rows = -(-t.shape[0] // world)  # FSDP2's shards: torch.chunk's, the last ones shorter (or empty)
    if local.shape[0] != rows:
        local = torch.cat([local, local.new_zeros(rows - local.shape[0], *local.shape[1:])])
    if rank != 0:
        dist.send(local.contiguous(), dst=0)
        return None
    full = local.new_empty(rows * world, *local.shape[1:])
    for src, chunk in enumerate(full.chunk(world)):  # received in place (gloo's gather would copy once more)
        if src == 0:
            chunk.copy_(local)
        else:
            dist.recv(chunk, src=src)
    return full[: t.shape[0]]
