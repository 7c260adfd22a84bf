"""Evaluate a base model, a base model plus adapter, a merged model, or a finished training run.

    evaluate(EvalRunConfig(run_dir="outputs/x"))               # the run's final/ against its base
    evaluate(EvalRunConfig(model=ModelSpec(path=base), adapter="adapter/"))
    evaluate(EvalRunConfig(model=ModelSpec(path="merged/"), baseline_path=base))

Each model gets the task metric (greedy generation on the split) and perplexity (exp of the
token-weighted mean loss, computed exactly as the training loop's validation loss).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ftcore import peft
from ftcore.config import EvalConfig, ModelSpec
from ftcore.data.collate import Batcher, pad_token_id
from ftcore.data.config import DataConfig
from ftcore.data.pipeline import build_datasets
from ftcore.data.sampler import eval_batches
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError
from ftcore.eval.evaluate import evaluate_task, validation_loss
from ftcore.eval.metrics import perplexity
from ftcore.eval.report import write_eval
from ftcore.formats.hf import load_pretrained
from ftcore.schema import build
from ftcore.train.parallel import pick_device


@dataclass
class EvalRunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = ""  # a training run: its config.json sets model and data, its final/ is evaluated
    adapter: str = ""  # a PEFT-format adapter directory applied to model.path
    baseline_path: str = ""  # a model to compare against (default: model.path when an adapter is given)
    out_dir: str = "eval_out"
    device: str = "auto"


def eval_run_config(d: dict) -> EvalRunConfig:
    """A validated EvalRunConfig from a plain nested dict (what conf/evaluate.yaml composes)."""
    return build(EvalRunConfig, d)


def from_training_run(cfg: EvalRunConfig) -> EvalRunConfig:
    """Take model, data and what to evaluate from a finished run directory."""
    run = Path(cfg.run_dir)
    if not (run / "config.json").is_file():
        raise FtcoreError(f"{run}: not a training run directory (no config.json)")
    trained = json.loads((run / "config.json").read_text())
    final = run / "final"
    method = trained["peft"]["method"]
    if method != "none" and not final.is_dir():
        raise FtcoreError(f"{run}: the run has no final/ (did it finish?)")
    cfg.data = build(DataConfig, trained["data"], "data.")
    cfg.model = build(ModelSpec, trained["model"])
    if method == "full":
        cfg.baseline_path, cfg.model.path = cfg.baseline_path or cfg.model.path, str(final)
    elif method != "none":
        cfg.adapter = str(final)
    return cfg


def score_model(model, tokenizer, examples, cfg: EvalRunConfig, device) -> dict:
    """Task metric and perplexity of one model on the split's examples."""
    result = evaluate_task(model, tokenizer, examples, cfg.data, cfg.eval, device)
    used = examples[: cfg.eval.max_examples or None]
    batcher = Batcher(used, pad_token_id(tokenizer))
    loss_sum, tokens = validation_loss(model, batcher, eval_batches(batcher.lengths, cfg.eval.batch_size), device)
    return {**result, "loss": loss_sum / tokens, "perplexity": perplexity(loss_sum, tokens), "tokens": tokens}


def evaluate(cfg: EvalRunConfig) -> dict:
    if cfg.run_dir:
        cfg = from_training_run(cfg)
    device = pick_device(cfg.device)
    dtype = DTYPES[cfg.model.dtype]
    model, tokenizer = load_pretrained(cfg.model.path, dtype=dtype, device=device, quant=cfg.model.quant_spec())
    # data.augment only adds rewrites to the training split: other splits are the same without them (no model load)
    data = cfg.data if cfg.eval.split == "train" else replace(cfg.data, augment="none")
    splits, _ = build_datasets(data, tokenizer, base_model=cfg.baseline_path or cfg.model.path, device=device,
                               dtype=dtype)  # fmt: skip
    examples = splits[cfg.eval.split]
    if not examples:
        raise FtcoreError(f"eval.split={cfg.eval.split!r} is empty for data.path={cfg.data.path!r}")
    baseline = None
    if cfg.adapter:
        if cfg.eval.baseline:
            print("evaluating the base model ...", flush=True)
            baseline = score_model(model.eval(), tokenizer, examples, cfg, device)
        peft.load_adapter(model, cfg.adapter)
    elif cfg.baseline_path and cfg.eval.baseline:
        print("evaluating the baseline model ...", flush=True)
        base_model, _ = load_pretrained(cfg.baseline_path, dtype=dtype, device=device, quant=cfg.model.quant_spec())
        baseline = score_model(base_model.eval(), tokenizer, examples, cfg, device)
        del base_model
    print("evaluating the model ...", flush=True)
    finetuned = score_model(model.eval(), tokenizer, examples, cfg, device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"model": cfg.model.path, "adapter": cfg.adapter or None, "baseline_model": cfg.baseline_path or None}
    return write_eval(out, cfg.eval.split, finetuned, baseline, extra, failures=cfg.eval.report_failures)
