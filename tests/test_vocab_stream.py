"""The token table and lm_head used from their row shards (model/vocab_stream.py), 2 gloo processes, against the
whole-table ops in float64: embedding lookup, logits, and the summed cross-entropy with its gradient.

Each rank brings a different batch (one has no tokens at all), the vocabulary does not split evenly into blocks
or ranks, and the loss's token chunks are smaller than a rank's batch.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ftcore.data.format import IGNORE
from ftcore.model.loss import softcap

V, D, ROWS, CHUNK = 37, 8, 5, 4
TOKENS = {0: 9, 1: 0}  # per rank; rank 1 has no target tokens in the second case


def whole_weight() -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def rank_inputs(rank: int, n: int):
    g = torch.Generator().manual_seed(10 + rank)
    hidden = torch.randn(n, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[::3] = IGNORE
    ids = torch.randint(0, V, (2, 3), generator=g)
    return hidden, targets, ids


def reference(weight, hidden, targets, ids, cap: float = 0.0) -> dict:
    """The whole table's ops in float64 (the loss over soft-capped logits when cap > 0)."""
    h = hidden.clone().requires_grad_(True)
    loss = F.cross_entropy(softcap(F.linear(h, weight), cap), targets, ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return {"embed": F.embedding(ids, weight), "logits": F.linear(hidden, weight), "loss": loss.detach(),
            "dh": h.grad}  # fmt: skip


def stream_worker(rank, world, init_file, out_dir, device="cpu"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ftcore.model.vocab_stream import VocabStream

    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    errors = {}
    for mesh_shape, placements in (((world,), [Shard(0)]), ((1, world), [Replicate(), Shard(0)])):  # FSDP2, HSDP
        mesh = init_device_mesh(device, mesh_shape)
        for n, cap in ((7, 0.0), (TOKENS[rank], 0.0), (7, 1.5)):
            for dtype in (torch.float32, torch.bfloat16):
                weight = whole_weight()
                hidden, targets, ids = rank_inputs(rank, n)
                ref = reference(weight.to(dtype).double(), hidden.to(dtype).double(), targets, ids, cap)
                shard = distribute_tensor(weight.float().to(device), mesh, placements)
                stream = VocabStream(embed=True, head=True, dtype=dtype, rows=ROWS, token_chunk=CHUNK)
                h = hidden.to(device, dtype).requires_grad_(True)
                loss = stream.loss_sum(shard, h, targets.to(device), cap)
                (loss * 2.0).backward()
                got = {"embed": stream.embedding(shard, ids.to(device)), "loss": loss.detach(), "dh": h.grad / 2.0,
                       "logits": stream.logits(shard, hidden.to(device, dtype))}  # fmt: skip
                got = {k: v.cpu() for k, v in got.items()}
                key = f"{len(mesh_shape)}d n={n} cap={cap} {dtype}"
                errors[key] = {k: (got[k].double() - ref[k]).abs().max().item() if ref[k].numel() else 0.0
                               for k in ref}  # fmt: skip
                errors[key]["shapes"] = [list(got[k].shape) == list(ref[k].shape) for k in ref]
                errors[key]["dtypes"] = [str(got[k].dtype) for k in ("embed", "logits", "loss", "dh")]
    (Path(out_dir) / f"errors.{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


@pytest.mark.dist
def test_streamed_tables_equal_the_whole_tables(tmp_path):
    mp.spawn(stream_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    check(tmp_path, ranks=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_tables_on_a_gpu_with_nccl(tmp_path):
    """The same on the GPUs there are (NCCL's broadcast; CUDA matmuls), 2 processes where 2 GPUs are, else 1."""
    world = min(torch.cuda.device_count(), 2)
    mp.spawn(stream_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path), "cuda"), nprocs=world,
             join=True)  # fmt: skip
    check(tmp_path, ranks=world)


def check(out_dir: Path, ranks: int):
    for rank in range(ranks):
        errors = json.loads((out_dir / f"errors.{rank}.json").read_text())
        assert len(errors) == 12, errors
        for key, err in errors.items():
            assert all(err.pop("shapes")), key
            dtype = "float32" if "float32" in key else "bfloat16"
            assert err.pop("dtypes") == [f"torch.{dtype}", f"torch.{dtype}", "torch.float32", f"torch.{dtype}"], key
            # float32: summation order only; bfloat16: the logits' and the gradient's matmuls round to 8 bits
            tol = {"embed": 0.0, "logits": 1e-5, "loss": 1e-5, "dh": 1e-5} if dtype == "float32" else \
                {"embed": 0.0, "logits": 0.06, "loss": 0.02, "dh": 0.03}  # fmt: skip
            for k, e in err.items():
                assert e <= tol[k], (rank, key, k, e)
