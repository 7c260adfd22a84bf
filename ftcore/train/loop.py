"""train(cfg): build -> load -> adapt -> data -> loop -> evaluate -> save. Read it top to bottom.

One optimizer step = grad_accum micro-batches; the loss is the token-weighted mean over the whole
step (summed token losses / target tokens of the step), so it does not depend on how the step is
split into micro-batches. Schedules are pure functions of the step; checkpoints hold everything a
resumed run needs to continue bit for bit (trainable params, optimizer, scaler, RNG, sampler).

Under torchrun (dist=ddp|fsdp) every rank runs this same function on its share of each global batch
(the sampler is sharded by rank); token counts and loss sums are all-reduced, so the step loss is
the global batch's, as one process would compute it. Rank 0 alone logs, writes files and evaluates.
"""

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from ftcore import peft
from ftcore.config import RunConfig
from ftcore.data.collate import Batcher, pad_token_id
from ftcore.data.pipeline import build_datasets
from ftcore.data.sampler import Sampler, eval_batches
from ftcore.dtypes import AUTOCAST, DTYPES
from ftcore.errors import FtcoreError
from ftcore.eval.evaluate import evaluate_task, validation_loss
from ftcore.eval.metrics import perplexity
from ftcore.eval.report import write_eval
from ftcore.formats.hf import load_pretrained, save_pretrained
from ftcore.model import ops
from ftcore.model.loss import batch_loss_sum
from ftcore.train import checkpoint
from ftcore.train import step as cuda_graph
from ftcore.train.flops import peak_flops, train_flops_per_token
from ftcore.train.log import RunLogger, read_metrics
from ftcore.train.optim import build_optimizer, lr_at, set_lr
from ftcore.train.parallel import (  # pick_device: kept importable from here (scripts use ftcore.train.pick_device)
    enable_activation_checkpointing,
    gather_model,
    grad_sync,
    init_distributed,
    parallelize,
    pick_device,  # noqa: F401
)
from ftcore.train.run_info import write_run_info


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg: RunConfig) -> dict:
    """Run one fine-tune; returns the summary also written to the run directory."""
    world = init_distributed(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_minutes)
    device, rank0 = world.device, world.rank == 0
    cuda_graph.check_config(cfg, device)
    ops.configure(fused_kernels=cfg.train.fused_kernels, loss_chunk_size=cfg.train.loss_chunk_size,
                  fused_lora=cfg.train.fused_lora)
    run_dir = Path(world.broadcast(cfg.run_dir))  # rank 0's (Hydra's ${now} may differ by a second across ranks)
    torch.manual_seed(cfg.train.seed)  # init of adapters and dropout; data order has its own seed
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, cfg)
    config_json = json.loads((run_dir / "config.json").read_text()) if rank0 else None
    logger = RunLogger(run_dir, cfg.logger, config_json, rank=world.rank)
    autocast = (
        torch.autocast(device.type, dtype=AUTOCAST[cfg.train.precision])
        if cfg.train.precision in AUTOCAST
        else nullcontext()
    )

    # model, data
    model, tokenizer = load_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=device)
    splits, data_report = build_datasets(cfg.data, tokenizer)
    if rank0:
        (run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2) + "\n")
    pad_id = pad_token_id(tokenizer)
    train_data = Batcher.from_config(splits["train"], cfg.data, pad_id)
    val_data = Batcher.from_config(splits["validation"], cfg.data, pad_id) if splits["validation"] else None
    val_batches = eval_batches(val_data.lengths, cfg.train.batch_size) if val_data else []
    val_batches = val_batches[: cfg.train.eval_batches * world.size or None]  # eval_batches per rank

    resume_from = world.broadcast(find_resume(cfg, run_dir) if rank0 else None)
    baseline = None
    if cfg.eval.baseline and resume_from is None and rank0:  # on the whole base model; the others wait at step 1
        print("evaluating the base model ...", flush=True)
        baseline = evaluate_task(model, tokenizer, splits[cfg.eval.split], cfg.data, cfg.eval, device)
        (run_dir / "baseline_eval.json").write_text(json.dumps(baseline, indent=2) + "\n")
    elif resume_from is not None and (run_dir / "baseline_eval.json").exists():
        baseline = json.loads((run_dir / "baseline_eval.json").read_text())

    # adapt, then train only what the method trains (kept in float32 over a possibly bf16 base)
    # the saved adapter records its base (adapter_config.json's base_model_name_or_path), as HF PEFT does
    peft.apply(model, replace(cfg.peft, base_model_name_or_path=cfg.peft.base_model_name_or_path or cfg.model.path),
               tokenizer=tokenizer)  # fmt: skip
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    world.print(peft.summary(model))
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    trainable, total = peft.count_parameters(model)
    train_model = parallelize(model, world, cfg.train.precision)  # FSDP2 shards `model` in place; DDP wraps it

    sampler = Sampler(
        train_data.lengths, cfg.train.batch_size, grad_accum=cfg.train.grad_accum, world_size=world.size,
        rank=world.rank, seed=cfg.data.seed + cfg.train.seed, bucketing=cfg.data.bucketing and not cfg.data.packing,
    )  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    state = {"step": 0, "best_val_loss": math.inf, "best_step": None, "bad_evals": 0, "tokens": 0}
    if resume_from is not None:
        if world.distributed:
            saved = checkpoint.load_sharded(resume_from, model, optimizer)
        else:
            saved = checkpoint.load(resume_from, model)
            optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        sampler.load_state_dict(saved["sampler"])
        state.update(saved["loop"])
        if rank0:
            truncate_metrics(run_dir, state["step"])
        world.print(f"resumed from {resume_from} at step {state['step']}")

    peak, full_finetune = peak_flops(device), cfg.peft.method == "full"
    graphed = None  # train.cuda_graph: the whole step captured once and replayed (ftcore/train/step.py)
    if cfg.train.cuda_graph:
        graphed = cuda_graph.GraphedStep(model, optimizer, cfg.train.precision, cfg.optim.grad_clip)
    stop = StopSignal()
    ckpt_root = run_dir / "checkpoints"
    progress = make_progress(cfg, state["step"], enabled=rank0)
    batches = iter_forever(sampler)
    status = "finished"

    def save_checkpoint():
        saved = {"scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "loop": dict(state),
                 "best_step": state["best_step"]}  # fmt: skip
        if world.distributed:  # DCP: each rank writes its shards of the trainable parameters and optimizer
            checkpoint.save_sharded(ckpt_root, state["step"], model, optimizer, saved, keep=cfg.train.keep_checkpoints)
        else:
            saved = {"optimizer": optimizer.state_dict(), **saved}
            checkpoint.save(ckpt_root, state["step"], model, saved, keep=cfg.train.keep_checkpoints)

    try:
        while state["step"] < cfg.train.max_steps:
            step = state["step"]
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.train.max_steps)
            set_lr(optimizer, lr)
            micro = [train_data(next(batches)) for _ in range(cfg.train.grad_accum)]
            step_tokens = world.sum(sum(int((b["targets"] != -100).sum()) for b in micro))  # of the global batch
            replayed = graphed(micro, step_tokens) if graphed else None  # the whole step, or None: run it eagerly
            loss_total = 0.0
            for i, batch in enumerate(micro if replayed is None else []):
                with grad_sync(train_model, i == len(micro) - 1):
                    with autocast:
                        loss_sum, _ = batch_loss_sum(train_model, batch, device)
                    # DDP and FSDP average gradients over ranks; x world size makes that the global batch's sum
                    scaler.scale(loss_sum / step_tokens * world.size).backward()
                loss_total += loss_sum.item()
            if replayed is not None:
                loss_total, grad_norm = replayed
            loss = world.sum(loss_total) / step_tokens
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                if cfg.train.on_nonfinite == "stop":
                    raise FtcoreError(
                        f"non-finite loss {loss} at step {step + 1}; lower optim.lr, use train.precision=fp32, "
                        f"or set train.on_nonfinite=skip"
                    )
                logger.log({"step": step + 1, "skipped": 1, "loss": loss})
                state["step"] += 1
                continue
            if replayed is None:
                scaler.unscale_(optimizer)
                grad_norm = grad_clip(model, cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += world.sum(sum(int((b["input_ids"] != pad_id).sum()) for b in micro))
            dt = time.perf_counter() - t0
            tokens_per_s = world.sum(sum(b["input_ids"].numel() for b in micro)) / dt  # all ranks
            event = {"step": state["step"], "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
            if device.type == "cuda":
                event["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if peak is not None:
                seq_len = micro[0]["input_ids"].shape[1]
                flops = train_flops_per_token(model.cfg, seq_len, full_finetune)
                event["mfu"] = tokens_per_s * flops / (peak * world.size)  # peak is one device's
            logger.log(event)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

            at_end = state["step"] == cfg.train.max_steps
            evaluate_now = val_batches and (at_end or (cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0))
            if evaluate_now:
                loss_sum, n = validation_loss_all_ranks(model, val_data, val_batches, device, autocast, world)
                val_loss = loss_sum / n
                logger.log({"step": state["step"], "val_loss": val_loss, "val_ppl": perplexity(loss_sum, n)})
                if val_loss < state["best_val_loss"]:
                    state.update(best_val_loss=val_loss, best_step=state["step"], bad_evals=0)
                else:
                    state["bad_evals"] += 1
            save_now = cfg.train.save_every and state["step"] % cfg.train.save_every == 0
            stopping = world.any(stop.received)  # a signal to any rank stops all of them at this step
            if evaluate_now or save_now or stopping:
                save_checkpoint()
            if stopping:
                by = stop.received or "a signal to another rank"
                status = f"stopped by {by} at step {state['step']}; resume with train.resume=auto"
                break
            patience = cfg.train.early_stopping_patience
            if patience and state["bad_evals"] >= patience:
                status = f"early stopping at step {state['step']}: no improvement in {patience} evaluations"
                break
    finally:
        stop.restore()
        progress.close()

    world.print(status)
    summary = {"status": status, "step": state["step"], "trainable_params": trainable, "total_params": total}
    if status.startswith("stopped"):
        logger.close()
        return summary

    # keep the best weights, save them, and evaluate on the test split (rank 0, on the whole model)
    if state["best_step"] is not None and state["best_step"] != state["step"]:
        best = ckpt_root / f"step_{state['best_step']:08d}"
        if world.distributed:
            checkpoint.load_sharded(best, model)
        else:
            checkpoint.load(best, model)
        world.print(f"loaded the best checkpoint (step {state['best_step']}, val_loss {state['best_val_loss']:.4f})")
    summary.update(best_step=state["best_step"], best_val_loss=state["best_val_loss"])
    whole = gather_model(model, world)  # FSDP: every shard gathered into a copy on rank 0; None on other ranks
    if whole is None:
        world.barrier()  # wait for rank 0's export and evaluation
        return summary
    save_final(whole, tokenizer, cfg, run_dir / "final")
    finetuned = evaluate_task(whole, tokenizer, splits[cfg.eval.split], cfg.data, cfg.eval, device)
    report = write_eval(run_dir, cfg.eval.split, finetuned, baseline, summary)
    logger.log({"step": state["step"], **{f"test_{k}": v for k, v in report["finetuned"].items() if isinstance(v, float)}})
    logger.summary({"trainable_params": trainable, "test_score": finetuned["score"]})
    logger.close()
    world.barrier()
    return {**summary, **report}


def find_resume(cfg: RunConfig, run_dir: Path) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        return checkpoint.latest(run_dir / "checkpoints")
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise FtcoreError(f"train.resume={cfg.train.resume!r}: no such checkpoint directory")
    return path


def truncate_metrics(run_dir: Path, step: int):
    """Drop events logged after the checkpoint we resume from (they will be logged again)."""
    events = [e for e in read_metrics(run_dir) if e["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def iter_forever(sampler: Sampler):
    while True:
        yield from sampler


def validation_loss_all_ranks(model, val_data, batches, device, autocast, world) -> tuple[float, int]:
    """(summed token loss, tokens) over `batches`: rank r scores batches r, r + W, ... and the sums are
    all-reduced. FSDP needs the same number of forwards on every rank: a rank short of one re-scores
    batch 0 and drops the result."""
    mine = batches[world.rank :: world.size]
    loss_sum, n = validation_loss(model, val_data, mine, device, autocast)
    if len(mine) < -(-len(batches) // world.size):
        validation_loss(model, val_data, batches[:1], device, autocast)
    return world.sum(loss_sum), world.sum(n)


def grad_clip(model, max_norm: float) -> float:
    """Clip to the global grad norm (over every rank's shards under FSDP2); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): reduce the partial norms of the shards
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def make_progress(cfg: RunConfig, start: int, enabled: bool = True):
    from tqdm import tqdm

    disable = not (cfg.logger.progress and enabled)
    return tqdm(total=cfg.train.max_steps, initial=start, disable=disable, dynamic_ncols=True)


def save_final(model, tokenizer, cfg: RunConfig, out_dir: Path):
    """The adapter in HF PEFT format, or (full fine-tuning) the whole model in HF layout."""
    if cfg.peft.method == "full":
        save_pretrained(model, out_dir, tokenizer)
    elif cfg.peft.method != "none":
        peft.save_adapter(model, out_dir)
