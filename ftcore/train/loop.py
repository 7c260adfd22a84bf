"""train(cfg): setup -> load -> baseline -> adapt -> resume -> loop -> finish. Read it top to bottom.

One optimizer step = grad_accum micro-batches (step.py); the loss is the token-weighted mean over the
whole step (summed token losses / target tokens of the step), so it does not depend on how the step is
split into micro-batches. Schedules are pure functions of the step; checkpoints hold everything a
resumed run needs to continue bit for bit (trainable params, optimizer, scaler, RNG, sampler).

Under torchrun (dist=ddp|fsdp) every rank runs this same function on its share of each global batch
(the sampler is sharded by rank); token counts and loss sums are all-reduced, so the step loss is
the global batch's, as one process would compute it. Rank 0 alone logs and writes files; every rank
takes part in the evaluations and the export (a share of the generations; its shards).
"""

import gc
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from ftcore import peft
from ftcore.config import RunConfig
from ftcore.data.collate import Batcher, pad_token_id
from ftcore.data.format import IGNORE
from ftcore.data.pipeline import build_datasets
from ftcore.data.sampler import Sampler, eval_batches
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError, NonFiniteLoss
from ftcore.eval.evaluate import evaluate_few_shot, evaluate_task, validation_loss
from ftcore.eval.forgetting import forgetting_report, make_probe, probe_loss
from ftcore.eval.metrics import perplexity
from ftcore.eval.report import write_eval
from ftcore.formats.hf import load_meta, load_pretrained, save_pretrained
from ftcore.monitor.reference import build_reference
from ftcore.peft.adalora import AdaLoraStep
from ftcore.peft.oft import OftStep
from ftcore.train import checkpoint
from ftcore.train.flops import peak_flops, train_flops_per_token
from ftcore.train.log import RunLogger, read_metrics, rewrite_metrics
from ftcore.train.optim import build_optimizer, lr_at, set_lr
from ftcore.train.parallel import (
    World,
    enable_activation_checkpointing,
    gather_model,
    init_distributed,
    parallelize,
    whole_tensor,
)
from ftcore.train.run_info import write_run_info
from ftcore.train.sharded_load import materialize, why_not_sharded
from ftcore.train.step import EagerStep, GraphedStep, autocast, set_fast_paths


class StopReason(str, Enum):
    """Why the loop ended (summary["stop_reason"])."""

    FINISHED = "finished"  # the run's length reached (train.max_steps, or train.epochs in steps)
    SIGNAL = "stopped"  # SIGINT/SIGTERM: a checkpoint was saved; resume with train.resume=auto
    EARLY_STOPPING = "early_stopping"  # train.early_stopping_patience evaluations without improvement


@dataclass
class Outcome:
    """How the loop ended: the reason, the line printed for it, and the signal that stopped it (if one did)."""

    reason: StopReason
    message: str
    signal: str | None = None  # SIGINT | SIGTERM


@dataclass
class Run:
    """What every phase shares: the config, this process's place, the run directory and the logger."""

    cfg: RunConfig
    world: World
    run_dir: Path
    logger: RunLogger
    peak_flops: float | None  # one device's dense bf16 peak, where known (for MFU)
    stop: "StopSignal"  # SIGINT/SIGTERM: deferred to the end of the step inside the loop, at once elsewhere
    base_dir: Path | None = None  # sharded loading: the checkpoint each rank reads its shards from (sharded_load.py)

    @property
    def rank0(self) -> bool:
        return self.world.rank == 0


@dataclass
class Data:
    splits: dict  # name -> examples (pipeline.build_datasets)
    train: Batcher
    val: Batcher | None
    val_batches: list[list[int]]  # index lists of the validation batches scored at each evaluation
    pad_id: int


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint (the "loop" entry) and restored on resume."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    tokens: int = 0


@dataclass
class Trainer:
    """What the loop steps: the step, its optimizer and sampler, and where checkpoints go."""

    model: nn.Module  # the Transformer (sharded in place under FSDP2)
    train_model: nn.Module  # what forward runs on: the model, or its DDP wrapper
    step: EagerStep | GraphedStep
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: Sampler
    trainable: int  # parameter counts, taken before sharding
    total: int
    max_steps: int  # the run's length: train.max_steps, or train.epochs x the sampler's steps per epoch
    state: LoopState = field(default_factory=LoopState)


def train(cfg: RunConfig) -> dict:
    """Run one fine-tune; returns the summary also written to the run directory."""
    with StopSignal() as stop:
        run, phase = None, "the setup"
        try:
            run = setup(cfg, stop)
            phase = "loading"
            model, tokenizer, data = load(run)
            resume_from = run.world.broadcast(prepare_run_dir(cfg, run.run_dir) if run.rank0 else None)
            phase = "the baseline evaluation"
            baseline = evaluate_baseline(run, model, tokenizer, data, resuming=resume_from is not None)
            phase = "the setup of the method"
            trainer = adapt(run, model, tokenizer, data)
            if resume_from is not None:
                resume(run, trainer, resume_from)
            outcome = loop(run, trainer, data)  # a signal here stops it after the current step, with a checkpoint
            phase = "the final export and evaluation"
            return finish(run, trainer, tokenizer, data, baseline, outcome)
        except Interrupted as e:
            stop.defer = True  # a second signal while the summary is made changes nothing
            return interrupted(run, phase, e.signal)


# -- phases ---------------------------------------------------------------------------------------------


def setup(cfg: RunConfig, stop: "StopSignal") -> Run:
    """Processes, seeds, the run directory (resolved config, git SHA, versions) and the logger."""
    world = init_distributed(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_minutes)
    if cfg.train.cuda_graph and world.device.type != "cuda":  # train.device=cpu, or auto without CUDA
        raise FtcoreError(f"train.cuda_graph: it needs a CUDA device (the run is on {world.device.type})")
    run_dir = Path(world.broadcast(cfg.run_dir))  # rank 0's (Hydra's ${now} may differ by a second across ranks)
    torch.manual_seed(cfg.train.seed)  # dropout (and anything else drawn from the default generator)
    if world.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, cfg)
    config_json = json.loads((run_dir / "config.json").read_text()) if world.rank == 0 else None
    logger = RunLogger(run_dir, cfg.logger, config_json, rank=world.rank)
    return Run(cfg, world, run_dir, logger, peak_flops(world.device), stop)


def load(run: Run):
    """The base model and tokenizer, the tokenized splits and their batchers.

    dist=fsdp: the model is built on the meta device and each rank reads its own shards after sharding
    (adapt), unless the method's init reads the base weights or the base is quantized as it is read.
    """
    cfg, world = run.cfg, run.world
    why_whole = why_not_sharded(cfg.peft, cfg.model.quantize) if world.backend == "fsdp" else None
    if world.backend == "fsdp" and why_whole is None:
        model, tokenizer, run.base_dir = load_meta(cfg.model.path, DTYPES[cfg.model.dtype])
    else:
        if why_whole is not None:
            world.print(f"every rank loads the whole base before sharding it: {why_whole}")
        model, tokenizer = load_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=world.device,
                                           quant=cfg.model.quant_spec())  # fmt: skip
    # data.augment: its model (the base by default) is loaded on a data-cache miss only, beside the run's model
    splits, data_report = build_datasets(cfg.data, tokenizer, base_model=cfg.model.path, device=world.device,
                                         dtype=DTYPES[cfg.model.dtype])  # fmt: skip
    if run.rank0:
        (run.run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2) + "\n")
    pad_id = pad_token_id(tokenizer)
    train_data = Batcher.from_config(splits["train"], cfg.data, pad_id)
    val_data = Batcher.from_config(splits["validation"], cfg.data, pad_id) if splits["validation"] else None
    val_batches = eval_batches(val_data.lengths, cfg.train.batch_size) if val_data else []
    val_batches = val_batches[: cfg.train.eval_batches * world.size or None]  # eval_batches per rank
    return model, tokenizer, Data(splits, train_data, val_data, val_batches, pad_id)


BASELINE_KEYS = ("zero_shot", "few_shot", "probe", "probe_loss")  # what evaluate_baseline returns


def evaluate_baseline(run: Run, model, tokenizer, data: Data, resuming: bool) -> dict:
    """What the base model does before training, every rank generating a share: {"zero_shot": its test score,
    "few_shot": with eval.few_shot training examples in context, "probe": the forgetting probe, "probe_loss": its
    loss on it}, each None when off. Sharded loading: on a sharded copy of the base, loaded as the run's model
    will be and dropped after. Kept in baseline_eval.json for a resumed run."""
    cfg, world, path = run.cfg, run.world, run.run_dir / "baseline_eval.json"
    if resuming:
        saved = json.loads(path.read_text()) if path.exists() else {}
        if "score" in saved and "zero_shot" not in saved:  # a run started before the few-shot/forgetting keys
            saved = {"zero_shot": saved}
        return {key: saved.get(key) for key in BASELINE_KEYS}
    ev = cfg.eval
    baseline = dict.fromkeys(BASELINE_KEYS)
    if not (ev.baseline or ev.few_shot or ev.forgetting or ev.drift_reference):
        return baseline
    world.print("evaluating the base model ...")
    base = model
    if run.base_dir is not None:
        base, _, _ = load_meta(run.base_dir, DTYPES[cfg.model.dtype])
        base.requires_grad_(False)  # evaluated only: FSDP2 leaves its token table and lm_head sharded (streamed)
        parallelize(base, world, cfg.train.precision, cfg.dist.replicate, cfg.dist.cpu_offload)
        materialize(base, run.base_dir, DTYPES[cfg.model.dtype], world.device, None)
    if ev.baseline:
        baseline["zero_shot"] = evaluate_task(base, tokenizer, data.splits[ev.split], cfg.data, ev, world.device, world)
    if ev.few_shot:
        baseline["few_shot"] = evaluate_few_shot(base, tokenizer, data.splits, cfg.data, ev, world.device, world)
    if ev.forgetting:
        probe = make_probe(base, tokenizer, ev, cfg.model.path, cfg.data.cache_dir, world)
        baseline["probe"], baseline["probe_loss"] = probe, probe_loss(base, probe, world.device)
    if ev.drift_reference:  # every rank: a sharded base's forwards run on all of them
        real = [ex for ex in data.splits["train"] if "augmented" not in ex]  # the user's prompts, no rewrites
        reference = build_reference(base, real, cfg.data, tokenizer, data.pad_id, world.device, ev.drift_prompts,
                                    cfg.data.seed)  # fmt: skip
        if run.rank0:
            reference.save(run.run_dir / "drift_reference.json")
    if base is not model:  # freed now (FSDP2's hooks make a reference cycle), before the run's shards are made
        for module in base.modules():
            if hasattr(module, "reshard"):
                module.reshard()
        del base
        gc.collect()
        if world.device.type == "cuda":
            torch.cuda.empty_cache()
    if run.rank0:
        path.write_text(json.dumps(baseline, indent=2) + "\n")
    return baseline


def adapt(run: Run, model, tokenizer, data: Data) -> Trainer:
    """Attach the method (trainables in float32), set the speed switches, parallelize, build the step."""
    cfg, world = run.cfg, run.world
    # the saved adapter records its base (adapter_config.json's base_model_name_or_path), as HF PEFT does
    base = cfg.peft.base_model_name_or_path or cfg.model.path
    method_step = None
    sampler = Sampler(
        data.train.lengths, cfg.train.batch_size, grad_accum=cfg.train.grad_accum, world_size=world.size,
        rank=world.rank, seed=cfg.data.seed + cfg.train.seed, bucketing=cfg.data.bucketing and not cfg.data.packing,
    )  # fmt: skip
    max_steps = run_length(run, sampler)
    if cfg.peft.method == "adalora":
        peft_cfg = replace(cfg.peft, base_model_name_or_path=base, total_step=cfg.peft.total_step or max_steps)
    else:
        peft_cfg = replace(cfg.peft, base_model_name_or_path=base)
    sharded_load = run.base_dir is not None  # the model is on the meta device: its init comes with its shards
    peft.apply(model, peft_cfg, tokenizer=tokenizer, init=not sharded_load)
    if cfg.peft.method == "adalora":
        method_step = AdaLoraStep(model.adalora, cfg.peft.orth_reg_weight)
    peft.trainables_to_float32(model)
    world.print(peft.summary(model))
    trainable, total = peft.count_parameters(model)
    set_fast_paths(model, cfg.train.fused_kernels, cfg.train.loss_chunk_size, cfg.train.fused_lora)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    # FSDP2 shards `model` in place (HSDP with dist.replicate > 1); DDP wraps it
    train_model = parallelize(model, world, cfg.train.precision, cfg.dist.replicate, cfg.dist.cpu_offload)
    if sharded_load:  # each rank's shards of the base from the checkpoint, of the method from its seeded init
        materialize(model, run.base_dir, DTYPES[cfg.model.dtype], world.device, peft_cfg, tokenizer)
    if cfg.peft.method == "oft" and cfg.peft.coft:  # FSDP2: keep the stored shards projected (oft.project_shards)
        method_step = OftStep(model)
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.train.activation_offload and world.device.type != "cuda":
        warnings.warn(f"train.activation_offload: a no-op on {world.device.type} (activations are in host memory "
                      "already)", stacklevel=2)  # fmt: skip
    eager = EagerStep(model, optimizer, world, cfg.train.precision, cfg.optim.grad_clip, train_model, method_step,
                      cfg.train.activation_offload)  # fmt: skip
    step = eager
    if cfg.train.cuda_graph:  # the whole step captured once and replayed; other shapes run eagerly
        step = GraphedStep(model, optimizer, eager, cfg.train.precision, cfg.optim.grad_clip)
    return Trainer(model, train_model, step, optimizer, eager.scaler, sampler, trainable, total, max_steps)


def run_length(run: Run, sampler: Sampler) -> int:
    """The run's length in optimizer steps; train.epochs: said in one line (items, global batch, steps per epoch)."""
    epochs, max_steps = run.cfg.train.epochs, run.cfg.train.total_steps(sampler.steps_per_epoch)
    if epochs:
        run.world.print(f"train.epochs={epochs:g}: {max_steps} steps ({sampler.steps_per_epoch} per epoch: "
                        f"{len(sampler.lengths)} train items // global batch {sampler.global_batch})")  # fmt: skip
    return max_steps


def resume(run: Run, trainer: Trainer, path: Path):
    """Trainable parameters, optimizer, scaler, sampler, RNG and loop counters from a checkpoint."""
    world = run.world
    if world.distributed:  # either checkpoint format, from any world size (DCP reshards)
        saved = checkpoint.load_sharded(path, trainer.model, trainer.optimizer)
    else:
        saved = checkpoint.load(path, trainer.model, trainer.optimizer)
    saved_world = saved.get("world_size", 1)
    if saved_world != world.size:
        world.print(f"resuming a {saved_world}-process checkpoint with {world.size}: the data order is the same "
                    "(it follows the global batch); dropout's random draws are not")  # fmt: skip
        if run.cfg.train.eval_batches and world.rank == 0:
            n = run.cfg.train.eval_batches
            warnings.warn(f"train.eval_batches={n} is per process: validation scores up to {n * world.size} batches "
                          f"now, {n * saved_world} before, so val_loss (the best checkpoint, early stopping) "
                          "compares over other examples; train.eval_batches=0 scores the whole split", stacklevel=2)
    trainer.scaler.load_state_dict(saved["scaler"])
    trainer.sampler.load_state_dict(saved["sampler"])
    trainer.state = LoopState(**saved["loop"])
    per_epoch = trainer.sampler.steps_per_epoch
    if saved.get("steps_per_epoch", per_epoch) != per_epoch:  # the global batch is the same (the sampler checks)
        warnings.warn(f"the train split changed: an epoch is {per_epoch} steps now, {saved['steps_per_epoch']} in the "
                      "checkpoint, so the data order (and a length set by train.epochs) differs from the saved run's",
                      stacklevel=2)  # fmt: skip
    if "adalora" in saved:  # the rank allocator's importance averages, mask and step count
        trainer.model.adalora.load_state_dict(saved["adalora"])
    if run.rank0:
        truncate_metrics(run.run_dir, trainer.state.step)
    world.print(f"resumed from {path} at step {trainer.state.step}")


def loop(run: Run, trainer: Trainer, data: Data) -> Outcome:
    """Steps until the run's length (trainer.max_steps), a signal or early stopping: log, validate, checkpoint."""
    cfg, world, state, stop = run.cfg, run.world, trainer.state, run.stop
    patience = cfg.train.early_stopping_patience
    if patience and state.bad_evals >= patience:  # resumed from the checkpoint that stopped early
        return Outcome(StopReason.EARLY_STOPPING, f"early stopping at step {state.step}: no improvement in "
                       f"{patience} evaluations")  # fmt: skip
    progress = make_progress(cfg, trainer, enabled=run.rank0)
    batches = iter_forever(trainer.sampler)
    outcome = Outcome(StopReason.FINISHED, "finished")
    try:
        stop.defer = True
        while state.step < trainer.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(state.step, cfg.optim, trainer.max_steps)
            set_lr(trainer.optimizer, lr)
            micro = [data.train(next(batches)) for _ in range(cfg.train.grad_accum)]
            step_tokens = world.sum(sum(int((b["targets"] != IGNORE).sum()) for b in micro))  # of the global batch
            try:
                loss_sum, grad_norm = trainer.step(micro, step_tokens)
            except NonFiniteLoss as e:
                if cfg.train.on_nonfinite == "stop":
                    raise e.at_step(state.step + 1) from None
                run.logger.log({"step": state.step + 1, "skipped": 1, "loss": e.loss})
                state.step += 1
                continue
            state.step += 1
            state.tokens += world.sum(sum(int((b["input_ids"] != data.pad_id).sum()) for b in micro))
            loss, seconds = loss_sum / step_tokens, time.perf_counter() - t0
            epoch = state.step / trainer.sampler.steps_per_epoch
            tokens_per_s = log_step(run, trainer.model, state.step, epoch, micro, loss, lr, grad_norm, seconds)
            progress.update(1)
            progress.set_description(epoch_label(cfg, epoch), refresh=False)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

            at_end = state.step == trainer.max_steps
            every = cfg.train.eval_every and state.step % cfg.train.eval_every == 0
            evaluate_now = bool(data.val_batches) and (at_end or every)
            if evaluate_now:
                validate(run, trainer, data)
            save_now = cfg.train.save_every and state.step % cfg.train.save_every == 0
            stopping = world.any(stop.received)  # a signal to any rank stops all of them at this step
            if evaluate_now or save_now or stopping or at_end:  # at_end: a stopped final evaluation resumes
                save_checkpoint(run, trainer)
            if stopping:
                by = stop.received or "a signal to another rank"
                message = f"stopped by {by} at step {state.step}; resume with train.resume=auto"
                # a signal to another rank: most likely a scheduler's SIGTERM to the whole job
                return Outcome(StopReason.SIGNAL, message, stop.received or "SIGTERM")
            if patience and state.bad_evals >= patience:
                message = f"early stopping at step {state.step}: no improvement in {patience} evaluations"
                outcome = Outcome(StopReason.EARLY_STOPPING, message)
                break
    finally:
        stop.defer = False
        progress.close()
    return outcome


def finish(run: Run, trainer: Trainer, tokenizer, data: Data, baseline, outcome: Outcome) -> dict:
    """The best weights saved to final/ and scored on the test split (every rank generating a share)."""
    cfg, world, state, model = run.cfg, run.world, trainer.state, trainer.model
    world.print(outcome.message)
    trainable = trainer.trainable
    summary = {"status": outcome.message, "stop_reason": outcome.reason.value, "step": state.step,
               "max_steps": trainer.max_steps, "steps_per_epoch": trainer.sampler.steps_per_epoch,
               "trainable_params": trainable, "total_params": trainer.total}  # fmt: skip
    if outcome.reason is StopReason.SIGNAL:
        run.logger.close()
        return {**summary, "signal": outcome.signal}
    if state.best_step is not None and state.best_step != state.step:
        best = run.run_dir / "checkpoints" / f"step_{state.best_step:08d}"
        if world.distributed:
            checkpoint.load_sharded(best, model)
        else:
            checkpoint.load(best, model)
        world.print(f"loaded the best checkpoint (step {state.best_step}, val_loss {state.best_val_loss:.4f})")
    summary.update(best_step=state.best_step, best_val_loss=state.best_val_loss)
    save_final(model, tokenizer, cfg, run.run_dir / "final", world)  # every rank: a sharded model's tensors gathered
    split = data.splits[cfg.eval.split]
    finetuned = evaluate_task(model, tokenizer, split, cfg.data, cfg.eval, world.device, world)  # a share per rank
    forgetting = None
    if baseline["probe"] is not None:  # every rank: a sharded model's forwards run on all of them
        tuned = probe_loss(model, baseline["probe"], world.device)
        forgetting = forgetting_report(baseline["probe"], baseline["probe_loss"], tuned)
    if not run.rank0:
        world.barrier()  # wait for rank 0's report
        return summary
    report = write_eval(run.run_dir, cfg.eval.split, finetuned, baseline["zero_shot"], summary, baseline["few_shot"],
                        forgetting, cfg.eval.report_failures)  # fmt: skip
    scores = {f"test_{k}": v for k, v in report["finetuned"].items() if isinstance(v, float)}
    run.logger.log({"step": state.step, **scores})
    run.logger.summary({"trainable_params": trainable, "test_score": finetuned["score"]})
    run.logger.close()
    world.barrier()
    return {**summary, **report}


# -- the loop's parts -----------------------------------------------------------------------------------


def log_step(run: Run, model, step: int, epoch: float, micro: list[dict], loss: float, lr: float, grad_norm: float,
             seconds: float) -> float:  # fmt: skip
    """One train event: epoch, loss, lr, grad norm, tokens/s over all ranks, CUDA peak memory, MFU where known."""
    world = run.world
    tokens_per_s = world.sum(sum(b["input_ids"].numel() for b in micro)) / seconds  # all ranks
    event = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": grad_norm,
             "tokens_per_s": tokens_per_s}  # fmt: skip
    if world.device.type == "cuda":
        event["peak_mem_gb"] = torch.cuda.max_memory_allocated(world.device) / 2**30
    if run.peak_flops is not None:
        flops = train_flops_per_token(model.cfg, micro[0]["input_ids"].shape[1], run.cfg.peft.method == "full")
        event["mfu"] = tokens_per_s * flops / (run.peak_flops * world.size)
    run.logger.log(event)
    return tokens_per_s


def validate(run: Run, trainer: Trainer, data: Data):
    """Validation loss over data.val_batches (all ranks); tracks the best step for early stopping."""
    world, state = run.world, trainer.state
    context = autocast(world.device, run.cfg.train.precision)
    mine = data.val_batches[world.rank :: world.size]  # rank r scores batches r, r + W, ...
    loss_sum, n = validation_loss(trainer.model, data.val, mine, world.device, context)
    if len(mine) < -(-len(data.val_batches) // world.size):
        # FSDP needs the same number of forwards on every rank: one short re-scores batch 0, result dropped
        validation_loss(trainer.model, data.val, data.val_batches[:1], world.device, context)
    loss_sum, n = world.sum(loss_sum), world.sum(n)
    val_loss = loss_sum / n
    run.logger.log({"step": state.step, "val_loss": val_loss, "val_ppl": perplexity(loss_sum, n)})
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
    else:
        state.bad_evals += 1


def save_checkpoint(run: Run, trainer: Trainer):
    state = trainer.state
    saved = {"scaler": trainer.scaler.state_dict(), "sampler": trainer.sampler.state_dict(),
             "loop": dict(vars(state)), "best_step": state.best_step, "max_steps": trainer.max_steps,
             "steps_per_epoch": trainer.sampler.steps_per_epoch}  # fmt: skip
    if getattr(trainer.model, "adalora", None) is not None:
        saved["adalora"] = trainer.model.adalora.state_dict()
    root, keep = run.run_dir / "checkpoints", run.cfg.train.keep_checkpoints
    if run.world.distributed:  # DCP: each rank writes its shards of the trainable parameters and optimizer
        checkpoint.save_sharded(root, state.step, trainer.model, trainer.optimizer, saved, keep=keep)
    else:
        checkpoint.save(root, state.step, trainer.model, {"optimizer": trainer.optimizer.state_dict(), **saved},
                        keep=keep)  # fmt: skip


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the loop (loading, the baseline or the final evaluation): stop at once."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class StopSignal:
    """SIGINT/SIGTERM handlers for the whole run. Inside the loop (`defer`) a signal sets a flag: the loop
    saves a checkpoint after the current step and exits. Elsewhere it raises Interrupted at once: nothing in
    flight there needs saving, the newest checkpoint (if any) is already complete."""

    def __init__(self):
        self.received, self.defer, self.previous = None, False, {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if not self.defer:
            raise Interrupted(self.received)


def interrupted(run: Run | None, phase: str, signal_name: str) -> dict:
    """The summary of a run stopped outside the loop, and one line saying what is saved and how to go on."""
    saved = checkpoint.step_dirs(run.run_dir / "checkpoints") if run and run.rank0 else []
    if saved:
        message = (f"stopped by {signal_name} during {phase}; saved: checkpoint {saved[-1]}; "
                   "resume with train.resume=auto")  # fmt: skip
    else:
        message = f"stopped by {signal_name} during {phase}; no checkpoint was saved yet; run the command again"
    if run is None:
        print(message, flush=True)
    else:
        run.world.print(message)
        run.logger.close()
    return {"status": message, "stop_reason": StopReason.SIGNAL.value, "signal": signal_name}


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> Path | None:
    """Rank 0, before anything is written: the checkpoint to resume from (or None), with the leftovers of
    killed runs removed (unfinished .tmp_* checkpoints) and, on a fresh start, the old metrics.jsonl kept
    as metrics.jsonl.prev so that the new run's steps are not appended to another run's."""
    checkpoint.remove_unfinished(run_dir / "checkpoints")
    resume_from = find_resume(cfg, run_dir)
    metrics = run_dir / "metrics.jsonl"
    if resume_from is None and metrics.exists():
        os.replace(metrics, run_dir / "metrics.jsonl.prev")
    return resume_from


def find_resume(cfg: RunConfig, run_dir: Path) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":  # the newest checkpoint that passes its manifest's checks
        return checkpoint.newest_valid(run_dir / "checkpoints")
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise FtcoreError(f"train.resume={cfg.train.resume!r}: no such checkpoint directory")
    reason = checkpoint.verify(path)
    if reason is not None and (path / checkpoint.MANIFEST).is_file():
        raise FtcoreError(f"train.resume={cfg.train.resume!r}: {reason}; choose another checkpoint")
    return path


def truncate_metrics(run_dir: Path, step: int):
    """Drop events logged after the checkpoint we resume from (they will be logged again), and a partial line."""
    rewrite_metrics(run_dir, [e for e in read_metrics(run_dir) if e["step"] <= step])


def iter_forever(sampler: Sampler):
    while True:
        yield from sampler


def make_progress(cfg: RunConfig, trainer: Trainer, enabled: bool = True):
    from tqdm import tqdm

    disable = not (cfg.logger.progress and enabled)
    start = trainer.state.step
    return tqdm(total=trainer.max_steps, initial=start, disable=disable, dynamic_ncols=True,
                desc=epoch_label(cfg, start / trainer.sampler.steps_per_epoch))  # fmt: skip


def epoch_label(cfg: RunConfig, epoch: float) -> str:
    """The progress bar's description: `epoch 1.4/2` (train.epochs set) or `epoch 1.4`."""
    return f"epoch {epoch:.1f}" + (f"/{cfg.train.epochs:g}" if cfg.train.epochs else "")


def save_final(model, tokenizer, cfg: RunConfig, out_dir: Path, world: World):
    """The adapter in HF PEFT format, or (full fine-tuning) the whole model in HF layout; rank 0 writes.

    Every rank calls it. A sharded model (FSDP2) is never gathered whole: full fine-tuning streams one
    parameter at a time to rank 0's file; an adapter is saved from a copy holding only the trainables.
    """
    sharded = world.backend == "fsdp"
    if cfg.peft.method == "full":
        save_pretrained(model, out_dir, tokenizer, whole=whole_tensor if sharded else None, writer=world.rank == 0)
    elif cfg.peft.method != "none":
        adapter = gather_model(model, world, frozen=False)
        if adapter is not None:
            peft.save_adapter(adapter, out_dir)
