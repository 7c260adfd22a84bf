"""Multi-process training on CPU with gloo: 2 processes (FSDP2 or DDP) reproduce 1 process with the same global batch.

One spawn of 2 workers runs every distributed job (process start-up dominates on 2 cores); the
1-process references run in the test process. Global batch 4 everywhere: 1 process x batch 2 x
accumulation 2, or 2 processes x batch 1 x accumulation 2 (so validation also scores the same examples).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_train import ROOT, data_cache, losses, tiny_dir, tiny_run  # noqa: F401 - pytest fixtures

import ftcore.model.loss
import ftcore.model.vocab_stream
import ftcore.train.loop
from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.train import train
from ftcore.train.log import read_metrics

TOL = 1e-5
COMMON = {"eval__baseline": False, "train__max_steps": 6, "train__eval_every": 3, "train__eval_batches": 2,
          "eval__max_examples": 4, "eval__max_new_tokens": 3}  # fmt: skip
NO_DROPOUT = {"peft__dropout": 0.0}
METHODS = {"full": {"peft__method": "full"}, "lora": NO_DROPOUT,
           "prefix": {"peft__method": "prefix", "peft__num_virtual_tokens": 4},
           "pissa": {"peft__init": "pissa", **NO_DROPOUT}, "vera": {"peft__method": "vera", "peft__r": 8, **NO_DROPOUT},
           "hira": {"peft__method": "hira", "peft__r": 4, **NO_DROPOUT},
           "hra": {"peft__method": "hra", "peft__r": 4}, "ln_tuning": {"peft__method": "ln_tuning"},
           "adalora": {"peft__method": "adalora", "peft__init_r": 4, "peft__target_r": 2, "peft__tinit": 1,
                       "peft__tfinal": 2, **NO_DROPOUT},
           "loha": {"peft__method": "loha", "peft__r": 4, "peft__alpha": 8},
           "lokr": {"peft__method": "lokr", "peft__r": 2, "peft__alpha": 4, "peft__decompose_both": True,
                    "peft__decompose_factor": 8},
           # COFT's projection binds from the first updates: FSDP2's stored shards must stay projected (OftStep)
           "oft": {"peft__method": "oft", "peft__oft_block_size": 16, "peft__coft": True, "peft__eps": 0.02},
           "lily": {"peft__method": "lily", "peft__r": 4, "peft__stride_A": 2, "peft__num_B": 3},
           "ptuning": {"peft__method": "ptuning", "peft__num_virtual_tokens": 4, "peft__encoder_hidden_size": 16},
           "boft": {"peft__method": "boft", "peft__boft_block_size": 8, "peft__boft_n_butterfly_factor": 2},
           # QLoRA: the decoder's linears NF4 with double quantization, their 4-bit storage sharded by rows
           "qlora": {"model__quantize": "nf4", **NO_DROPOUT},
           # untied embeddings (the tiny model with its own lm_head): FSDP2 shards them as their own group
           "full_untied": {"peft__method": "full"}}  # fmt: skip
# Lily's router averages over every token of a micro-batch, so its 1-process reference takes the 2-process runs'
# micro-batches of one example: batch 1 x accumulation 4 (and 4 validation batches of 1)
SINGLE = {"lily": {"train__batch_size": 1, "train__grad_accum": 4, "train__eval_batches": 4}}
# name -> (dist backend, method); the FSDP runs also checkpoint activations (they must compose with fully_shard)
DIST_RUNS = {"fsdp_full": ("fsdp", "full"), "fsdp_lora": ("fsdp", "lora"), "fsdp_prefix": ("fsdp", "prefix"),
             "ddp_lora": ("ddp", "lora"), "fsdp_pissa": ("fsdp", "pissa"), "fsdp_vera": ("fsdp", "vera"),
             "fsdp_hira": ("fsdp", "hira"), "fsdp_hra": ("fsdp", "hra"), "fsdp_ln_tuning": ("fsdp", "ln_tuning"),
             "fsdp_loha": ("fsdp", "loha"), "fsdp_lokr": ("fsdp", "lokr"),
             "ddp_adalora": ("ddp", "adalora"), "fsdp_adalora": ("fsdp", "adalora"), "fsdp_oft": ("fsdp", "oft"),
             "fsdp_lily": ("fsdp", "lily"), "fsdp_ptuning": ("fsdp", "ptuning"), "fsdp_boft": ("fsdp", "boft"),
             "fsdp_qlora": ("fsdp", "qlora"), "hsdp_lora": ("fsdp", "lora"), "fsdp_lora_offload": ("fsdp", "lora"),
             "fsdp_full_untied": ("fsdp", "full_untied"), "hsdp_full": ("fsdp", "full")}  # fmt: skip
# dist settings of a run beyond the backend: HSDP as 2 replicas of 1 shard each (the 2-D mesh's all-reduce across
# replicas; the full fine-tune's export gathers from it), and FSDP2's CPU offload policy
DIST_OPTIONS = {"hsdp_lora": {"replicate": 2}, "hsdp_full": {"replicate": 2},
                "fsdp_lora_offload": {"cpu_offload": True}}  # fmt: skip
# methods resumed across world sizes: a run checkpointed by 1 process continues on 2, and one by 2 on 1
RESHARDED = ("lora", "full")


def single_cfg(tiny_dir, data_cache, run_dir, method, **extra):  # noqa: F811
    options = {"train__batch_size": 2, "train__grad_accum": 2, **COMMON, **METHODS[method], **SINGLE.get(method, {})}
    return tiny_run(model_dir(tiny_dir, method), data_cache, run_dir, **{**options, **extra})


def dist_cfg(tiny_dir, data_cache, run_dir, backend, method, **extra):  # noqa: F811
    cfg = tiny_run(model_dir(tiny_dir, method), data_cache, run_dir, train__batch_size=1, train__grad_accum=2, **COMMON,
                   **METHODS[method], train__gradient_checkpointing=backend == "fsdp", **extra)  # fmt: skip
    cfg["dist"] = {"backend": backend}
    return cfg


def model_dir(tiny: Path, method: str) -> Path:
    """The tiny model, or for *_untied methods a copy with its own lm_head (made once, beside it)."""
    if not method.endswith("_untied"):
        return tiny
    untied = tiny.parent / "untied"
    if not untied.is_dir():
        shutil.copytree(tiny, untied)
        config = json.loads((untied / "config.json").read_text())
        (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
        tensors = load_file(untied / "model.safetensors")
        head = torch.randn(tensors["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(3))
        save_file({**tensors, "lm_head.weight": head * 0.02}, untied / "model.safetensors")
    return untied


def worker(rank, world, init_file, jobs):
    """Run each (config, sigterm_step) in turn on this rank; a SIGTERM to rank 1 alone must stop both ranks."""
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    real_lr_at = ftcore.train.loop.lr_at
    real_chunked = ftcore.model.loss.linear_cross_entropy
    real_streamed = ftcore.model.vocab_stream.cross_entropy_sum
    real_load_meta, real_load_pretrained = ftcore.train.loop.load_meta, ftcore.train.loop.load_pretrained
    for cfg, sigterm_step in jobs:
        chunked = {"train": 0, "eval": 0, "streamed_train": 0, "streamed_eval": 0}

        def counting(real, prefix=""):  # which loss path ran: chunked (FSDP2's gathered lm_head too) or streamed
            def loss(*args, **kwargs):
                chunked[prefix + ("train" if torch.is_grad_enabled() else "eval")] += 1
                return real(*args, **kwargs)

            return loss

        ftcore.model.loss.linear_cross_entropy = counting(real_chunked)
        ftcore.model.vocab_stream.cross_entropy_sum = counting(real_streamed, "streamed_")
        loads = {"meta": 0, "whole": 0}  # sharded loading builds on the meta device; the others load the whole base

        def counted(kind, real):
            def load(*args, **kwargs):
                loads[kind] += 1
                return real(*args, **kwargs)

            return load

        ftcore.train.loop.load_meta = counted("meta", real_load_meta)
        ftcore.train.loop.load_pretrained = counted("whole", real_load_pretrained)

        def lr_at(step, optim_cfg, max_steps, _at=sigterm_step):
            if step == _at and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_lr_at(step, optim_cfg, max_steps)

        ftcore.train.loop.lr_at = lr_at
        train(run_config(cfg))
        (Path(cfg["run_dir"]) / f"chunked_calls_rank{rank}.json").write_text(json.dumps(chunked))
        (Path(cfg["run_dir"]) / f"loads_rank{rank}.json").write_text(json.dumps(loads))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_dir, data_cache, tmp_path_factory):  # noqa: F811
    """Run directories: single_<method> (1 process) and the 2-process runs of DIST_RUNS, plus a stopped+resumed one."""
    root = tmp_path_factory.mktemp("dist")
    dirs = {f"single_{m}": root / f"single_{m}" for m in METHODS}
    for method in METHODS:
        train(run_config(single_cfg(tiny_dir, data_cache, dirs[f"single_{method}"], method)))
    jobs = []
    for name, (backend, method) in DIST_RUNS.items():
        dirs[name] = root / name
        cfg = dist_cfg(tiny_dir, data_cache, dirs[name], backend, method)
        cfg["dist"].update(DIST_OPTIONS.get(name, {}))
        jobs.append((cfg, None))
    dirs["fsdp_lora_resumed"] = root / "fsdp_lora_resumed"
    resumed = dist_cfg(tiny_dir, data_cache, dirs["fsdp_lora_resumed"], "fsdp", "lora")
    jobs.append((resumed, 2))  # SIGTERM during step 3 -> checkpoint at step 3, stop
    jobs.append(({**resumed, "train": {**resumed["train"], "resume": "auto"}}, None))
    for method in RESHARDED:  # 1 -> 2 processes: the 1-process run's step-3 checkpoint, resumed by 2
        dirs[f"fsdp_{method}_from_single"] = root / f"fsdp_{method}_from_single"
        cfg = dist_cfg(tiny_dir, data_cache, dirs[f"fsdp_{method}_from_single"], "fsdp", method)
        jobs.append(({**cfg, "train": {**cfg["train"], "resume": str(step_3(dirs[f"single_{method}"]))}}, None))
    mp.spawn(worker, args=(2, str(root / "rendezvous"), jobs), nprocs=2, join=True)
    for method in RESHARDED:  # 2 -> 1: the 2-process run's sharded step-3 checkpoint, resumed by 1
        dirs[f"single_{method}_from_fsdp"] = root / f"single_{method}_from_fsdp"
        cfg = single_cfg(tiny_dir, data_cache, dirs[f"single_{method}_from_fsdp"], method)
        train(run_config({**cfg, "train": {**cfg["train"], "resume": str(step_3(dirs[f"fsdp_{method}"]))}}))
    return dirs


def step_3(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_00000003"


def curve(run_dir, key):
    return [e[key] for e in read_metrics(run_dir) if key in e]


def max_diff(a: list, b: list) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def final_tensors(run_dir) -> dict:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(final / name)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(DIST_RUNS))
def test_loss_curve_equals_single_process(runs, name):
    single = runs[f"single_{DIST_RUNS[name][1]}"]
    for key in ("loss", "val_loss"):
        diff = max_diff(curve(runs[name], key), curve(single, key))
        print(f"{name} {key}: max abs diff {diff:.2e}")
        assert diff < TOL, key
    # the global grad norm (over both ranks' shards under FSDP) tracks too, within float noise of a 3M-entry sum
    norms = curve(runs[name], "grad_norm"), curve(single, "grad_norm")
    print(f"{name} grad_norm: max rel diff {max_diff(*norms) / min(norms[1]):.2e}")
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert len(curve(runs[name], "loss")) == 6  # rank 0 alone wrote metrics.jsonl
    assert [e["step"] for e in read_metrics(runs[name]) if "val_loss" in e] == [3, 6]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(DIST_RUNS))
def test_every_rank_takes_the_chunked_loss(runs, name):
    """The loss is computed inside forward, so the chunked linear cross-entropy runs under FSDP2 and DDP as well
    (per rank: 6 steps x 2 micro-batches with gradients; validation at steps 3 and 6 without); under FSDP2 a
    frozen lm_head is used from its shards (vocab_stream.py) and a trainable one (full) gathered."""
    streamed = DIST_RUNS[name][0] == "fsdp" and not DIST_RUNS[name][1].startswith("full")
    path = "streamed_" if streamed else ""
    for rank in (0, 1):
        calls = json.loads((runs[name] / f"chunked_calls_rank{rank}.json").read_text())
        assert calls[path + "train"] == 6 * 2 and calls[path + "eval"] > 0, (rank, calls)
        assert sum(calls.values()) == calls[path + "train"] + calls[path + "eval"], (rank, calls)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(DIST_RUNS))
def test_export_gathers_every_shard(runs, name):
    """The adapter (or full model) saved after a 2-process run equals the 1-process one: whole tensors, not a shard."""
    single, got = final_tensors(runs[f"single_{DIST_RUNS[name][1]}"]), final_tensors(runs[name])
    assert got.keys() == single.keys()
    diff = max(float((got[k].float() - single[k].float()).abs().max()) for k in got)
    print(f"{name} export: {len(got)} tensors, max abs diff {diff:.2e}")
    assert all(got[k].shape == single[k].shape for k in got)
    # Full fine-tuning and VeRA's few lambda entries: Adam turns float noise in near-zero gradient entries into
    # ~lr-sized steps; one process with batch 4 x accumulation 1 instead of 2 x 2 already differs by 2.7e-5 (full)
    # (a lone slice would differ by O(1)). LoHa the same, more (W1a, W1b, W2a get no gradient at the first step, as
    # W2b starts at 0): one entry (layers.1 v_proj hada_w1_b) already differs by 1.9e-5 between batch 4 x 1 and
    # 2 x 2 in one process, and by 1.6e-4 under FSDP2, the other 16383 within 1e-5 (the loss curve within 1e-5).
    # HRA too: one process with batch 1 x accumulation 4 instead of 2 x 2 already differs by 1.2e-5 in 2 of the 512
    # entries of layers.1 down_proj's hra_u (each rank's micro-batch here is 1), as much as FSDP2 does.
    # VeRA: one of the 64 entries of layers.1 o_proj's vera_lambda_b differs by 1.7e-4 with the lm_head streamed
    # from its shards (its summation order), the other entries within 1e-5 and the loss curve within 1e-6.
    loose = {"full": 1e-4, "full_untied": 1e-4, "vera": 3e-4, "loha": 1e-3, "hra": 1e-4}
    assert diff < loose.get(DIST_RUNS[name][1], TOL)
    report = json.loads((runs[name] / "eval.json").read_text())
    assert report["n"] == 4 and report["step"] == 6


@pytest.mark.dist
def test_sharded_checkpoint_resume_is_exact(runs):
    straight, resumed = runs["fsdp_lora"], runs["fsdp_lora_resumed"]
    ckpt = resumed / "checkpoints" / "step_00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert not list((resumed / "checkpoints").glob(".tmp*"))
    for key in ("loss", "val_loss", "grad_norm"):
        assert curve(resumed, key) == curve(straight, key), key  # bit for bit
    a, b = final_tensors(straight), final_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.dist
def test_torchrun_cli_multirun_sweep(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """`torchrun ... scripts/train.py -m ...`: every rank runs the Hydra sweep's jobs in step, one distributed run
    each; here the methods the 1-process comparisons above do not cover, under FSDP2 with bf16 parameters."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train.py"), "-m", "peft=dora,ia3,prompt", "dist=fsdp", "train.precision=bf16",
           f"model.path={tiny_dir}", "train.max_steps=2", "train.eval_every=0", "train.batch_size=2",
           "train.eval_batches=1", "eval.max_examples=2", "eval.max_new_tokens=2", "logger.wandb.mode=disabled",
           "logger.wandb.group=sweep-1", "logger.wandb.name=${peft.method}-run", "logger.progress=false", f"data.cache_dir={data_cache}",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${peft.method}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for method in ("dora", "ia3", "prompt"):
        run_dir = tmp_path / method
        loss = losses(run_dir)
        assert len(loss) == 2 and all(math.isfinite(x) for x in loss)
        adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
        assert adapter["peft_type"] == {"dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}[method]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["dist"]["backend"] == "fsdp"
        assert config["logger"]["wandb"]["group"] == "sweep-1" and config["logger"]["wandb"]["name"] == f"{method}-run"
        assert (run_dir / "eval.json").is_file()


def test_dist_needs_torchrun(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = tiny_run(tiny_dir, data_cache, tmp_path)
    with pytest.raises(FtcoreError, match=r"dist=fsdp: RANK/WORLD_SIZE are not set; launch it with torchrun"):
        train(run_config({**cfg, "dist": {"backend": "fsdp"}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FtcoreError, match="dist=single but 2 processes were started; use dist=ddp or dist=fsdp"):
        train(run_config(cfg))
    with pytest.raises(FtcoreError, match="train.precision=fp16 is not supported with dist=fsdp"):
        run_config({**cfg, "dist": {"backend": "fsdp"}, "train": {**cfg["train"], "precision": "fp16"}})
    with pytest.raises(FtcoreError, match=r"^dist.replicate=2: an FSDP2 setting; use dist=fsdp \(dist.backend is ddp\)$"):
        run_config({**cfg, "dist": {"backend": "ddp", "replicate": 2}})
    with pytest.raises(FtcoreError, match=r"^dist.cpu_offload=True: an FSDP2 setting; use dist=fsdp"):
        run_config({**cfg, "dist": {"cpu_offload": True}})
    with pytest.raises(FtcoreError, match=r"^dist.replicate=0: expected a positive number of replicas"):
        run_config({**cfg, "dist": {"backend": "fsdp", "replicate": 0}})
    from ftcore.train.parallel import World, parallelize

    with pytest.raises(FtcoreError, match=r"^dist.replicate=3 does not divide the world size 4: each replica needs"):
        parallelize(torch.nn.Linear(2, 2), World("fsdp", 0, 4), replicate=3)


@pytest.mark.dist
@pytest.mark.parametrize("method", RESHARDED)
@pytest.mark.parametrize("direction", ["1->2", "2->1"])
def test_resume_on_another_world_size_continues_the_curve(runs, method, direction):
    """A checkpoint resumed with another number of processes (same global batch): DCP reshards the trainable
    parameters and the optimizer state (or a 1-process checkpoint is sent to the shards), the sampler continues the
    same global order, so steps 4-6 are the uninterrupted run's."""
    resumed = runs[f"fsdp_{method}_from_single" if direction == "1->2" else f"single_{method}_from_fsdp"]
    straight = runs[f"single_{method}"]
    assert [e["step"] for e in read_metrics(resumed) if "loss" in e] == [4, 5, 6]
    for key in ("loss", "val_loss"):
        after = [e[key] for e in read_metrics(straight) if key in e and e["step"] > 3]
        diff = max_diff(curve(resumed, key), after)
        print(f"{method} {direction} {key}: max abs diff {diff:.2e}")
        assert diff < TOL, key
    single, got = final_tensors(straight), final_tensors(resumed)
    assert got.keys() == single.keys()
    assert max(float((got[k].float() - single[k].float()).abs().max()) for k in got) < {"full": 1e-4}.get(method, TOL)


# methods whose init reads the base weights, and QLoRA's base quantized as it is read: every rank loads the whole base
WHOLE_BASE = {"pissa", "ln_tuning", "qlora"}


@pytest.mark.dist
@pytest.mark.parametrize("name", [n for n, (backend, _) in DIST_RUNS.items() if backend == "fsdp"])
def test_fsdp_ranks_load_their_shards_only(runs, name):
    """Under FSDP2 the model is built on the meta device and each rank reads its own shards (sharded_load.py): the
    whole base is never loaded, except where the method's init needs it; the curves above equal 1 process's."""
    sharded = DIST_RUNS[name][1] not in WHOLE_BASE
    for rank in (0, 1):
        loads = json.loads((runs[name] / f"loads_rank{rank}.json").read_text())
        assert loads == ({"meta": 1, "whole": 0} if sharded else {"meta": 0, "whole": 1}), (rank, loads)


def gather_worker(rank, world, init_file, out_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ftcore.train.parallel import whole_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    got = {}
    for rows in (5, 4, 1):  # uneven shards, even ones, and a rank with no rows
        full = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
        whole = whole_tensor(distribute_tensor(full, mesh, [Shard(0)]))
        got[rows] = None if whole is None else whole.tolist()
    (Path(out_file).parent / f"{Path(out_file).name}.{rank}").write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.dist
def test_whole_tensor_gathers_every_rows_shard_on_rank_0_only(tmp_path):
    """The export's gather: rank 0 receives each rank's rows into one tensor (torch.chunk's uneven shards too);
    the other ranks get nothing."""
    mp.spawn(gather_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "got")), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"got.{r}").read_text()) for r in (0, 1))
    assert rank0 == {str(n): torch.arange(n * 3.0).reshape(n, 3).tolist() for n in (5, 4, 1)}
    assert rank1 == {"5": None, "4": None, "1": None}
