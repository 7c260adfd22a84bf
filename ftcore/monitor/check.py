"""A check of a finished run on fresh labeled data: the task score against the run's stored test score, and the
fresh prompts' drift against the training prompts. For cron or CI (scripts/monitor.py).

    record = run_check(MonitorConfig(run_dir="outputs/x", data="fresh.jsonl"))
    record["passed"]            # False when score < stored_score - max_drop
    append_history(Path("outputs/x/monitor.jsonl"), record)

The fresh file is read, cleaned, formatted and tokenized as the run's data config says, and scored whole (no
split; the first `limit` examples with a limit) by ftcore.eval.run.score_model with the run's eval settings
(generation length, batch size) and its trained model (final/), or with `url` the model a server serves under
`served_model` (remote.py: the same prompt token ids, greedy; no perplexity then). The stored score is
eval.json's test score; the base score is eval.json's baseline (else baseline_eval.json's), for scale: both are
the run's, on its test split.
Drift scores (drift.py) come from the fresh prompts exactly as drift_reference.json was built (reference.py): the
prompts as the model sees them, embedded by the base model.

A record (one line of monitor.jsonl): time (UTC), run_dir, file, sha256, read (the file's records), removed
(by cleaning and the length filter, by reason: a shift to longer inputs shows here), examples (what is left),
n (scored), task, metric, score, perplexity, served (url and model, or null), stored_score,
stored_n, base_score, base_fresh_score (the base on the fresh file, with score_base), drop
(stored_score - score), max_drop, passed, drift (the scores, or null),
drift_thresholds, drift_over (the scores over them), git, versions.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from ftcore import peft
from ftcore.config import EvalConfig
from ftcore.data.collate import pad_token_id
from ftcore.data.config import resolve_path
from ftcore.data.pipeline import build_file
from ftcore.data.tasks import get_task
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError
from ftcore.eval.evaluate import evaluate_task, headline
from ftcore.eval.run import EvalRunConfig, from_training_run, score_model
from ftcore.formats.hf import load_pretrained
from ftcore.monitor.config import DriftThresholds
from ftcore.monitor.drift import DriftReference
from ftcore.monitor.reference import prompt_embeddings, prompt_ids
from ftcore.monitor.remote import served_generate
from ftcore.schema import build, invalid
from ftcore.textfile import read_json_object
from ftcore.train.parallel import pick_device
from ftcore.train.run_info import git_state, versions


@dataclass
class MonitorConfig:
    run_dir: str
    data: str  # the fresh labeled file, in the run's data format
    max_drop: float | None = None  # fail when the score is this far (absolute) below the stored test score;
    # None = 5% of the metric's scale: 0.05 (accuracy, F1, ROUGE), 5 BLEU points
    limit: int = 0  # score the first N examples of the file (0 = all)
    device: str = "auto"
    drift: bool = True  # also the drift scores (needs the run's drift_reference.json)
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    url: str = ""  # score the model served there (scripts/serve.py) instead of loading final/
    served_model: str = ""  # its name on that server (the request's `model`)
    api_key: str = ""
    score_base: bool = False  # also score the base model on the fresh file (base_fresh_score)

    def __post_init__(self):
        if self.max_drop is not None and not (self.max_drop >= 0):
            raise invalid("--max-drop", self.max_drop, "a number >= 0")
        if self.limit < 0:
            raise invalid("--limit", self.limit, ">= 0 (0 = the whole file)")
        if self.url and not self.served_model:
            raise FtcoreError("--url: also give --served-model, the model's name on that server")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FtcoreError(f"{path}: no such file ({what})")
    return read_json_object(path)


def stored_scores(run: Path, task) -> tuple[float, int, float | None]:
    """(the run's test score, its n, the base model's score or None) from eval.json (baseline_eval.json)."""
    report = read_json(run / "eval.json", "the run's stored test score: did the run finish?")
    try:
        stored = headline(task, report["finetuned"])
    except KeyError as e:
        raise FtcoreError(f"{run / 'eval.json'}: no {e} in its finetuned scores") from None
    base = headline(task, report["baseline"]) if report.get("baseline") else None
    if base is None and (run / "baseline_eval.json").is_file():
        saved = read_json_object(run / "baseline_eval.json")
        zero_shot = saved.get("zero_shot", saved if "score" in saved else None)  # an older run: the result itself
        base = zero_shot["score"] if zero_shot else None
    return stored, report.get("n"), base


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def drift_notes(n: int, thresholds: DriftThresholds) -> list[str]:
    """Warnings when n prompts' noise alone (drift.py) is over half a threshold."""
    notes = []
    if 9 / n > thresholds.length_psi / 2:
        notes.append(f"length_psi of {n} prompts has noise of about 9/n = {9 / n:.2f} "
                     f"(threshold {thresholds.length_psi})")  # fmt: skip
    if 1 / math.sqrt(n) > thresholds.embedding_shift / 2:
        notes.append(f"embedding_shift of {n} prompts has noise of about 1/sqrt(n) = {1 / math.sqrt(n):.2f} "
                     f"(threshold {thresholds.embedding_shift})")  # fmt: skip
    return notes


def run_check(cfg: MonitorConfig) -> dict:
    """Score the run's model on the fresh file, compare with the stored score, measure drift: the record."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = Path(cfg.run_dir)
    ev = from_training_run(EvalRunConfig(run_dir=cfg.run_dir, device=cfg.device))  # names config.json, final/
    trained = read_json_object(run / "config.json")
    # the run's generation settings; every example of the file (cut to cfg.limit before scoring)
    ev.eval = replace(build(EvalConfig, trained.get("eval", {}), "eval."), max_examples=0, baseline=False)
    task = get_task(ev.data)
    stored, stored_n, base_score = stored_scores(run, task)
    reference = None
    if cfg.drift:
        ref_path = run / "drift_reference.json"
        if not ref_path.is_file():
            raise FtcoreError(f"{ref_path}: no such file (the run's drift reference; a run trained with "
                              f"eval.drift_reference=false has none: --no-drift skips the drift scores)")  # fmt: skip
        reference = DriftReference.load(ref_path)
    fresh = resolve_path(cfg.data, "--data")  # named before any model is loaded
    digest = sha256(fresh)

    device, dtype, quant = pick_device(cfg.device), DTYPES[ev.model.dtype], ev.model.quant_spec()
    full = bool(ev.baseline_path)  # full fine-tuning: model.path is final/, baseline_path the base
    base_path = ev.baseline_path if full else ev.model.path
    need_base = reference is not None or cfg.score_base
    model, tokenizer = load_pretrained(ev.model.path if full and not need_base else base_path, dtype=dtype,
                                       device=device, quant=quant)  # fmt: skip
    examples, prepared = build_file(fresh, ev.data, tokenizer, "--data")
    scored = examples[: cfg.limit or None]
    drift = None
    if reference is not None:  # the base model's embeddings, as reference.py made the reference's
        ids = prompt_ids(scored, ev.data.template, tokenizer)
        embeddings = None
        if reference.embedding_mean is not None:
            embeddings = prompt_embeddings(model, ids, pad_token_id(tokenizer), device)
        drift = reference.scores(ids, embeddings)
    base_fresh = None
    if cfg.score_base:  # the base model on the same file: is the fresh data harder, or did the model get worse?
        base_fresh = evaluate_task(model.eval(), tokenizer, scored, ev.data, ev.eval, device)["score"]
    if need_base and full and not cfg.url:
        del model
        model, _ = load_pretrained(ev.model.path, dtype=dtype, device=device, quant=quant)
    if cfg.url:  # the served model answers; no perplexity (the server returns no log-probabilities)
        gen = served_generate(cfg.url, cfg.served_model, cfg.api_key)
        result = evaluate_task(None, tokenizer, scored, ev.data, ev.eval, device, generate_fn=gen)
        result["perplexity"] = None
    else:
        if ev.adapter:
            peft.load_adapter(model, ev.adapter)
        result = score_model(model.eval(), tokenizer, scored, ev, device)

    max_drop = cfg.max_drop if cfg.max_drop is not None else 0.05 * (100 if task.metric == "bleu" else 1)
    drop = stored - result["score"]
    passed = drop <= max_drop + 1e-9  # 1.0 - 0.95 is 0.05000000000000004: at the threshold passes
    return {
        "time": started, "run_dir": str(run), "file": str(fresh), "sha256": digest,
        "examples": len(examples), "read": prepared["clean"]["input"],
        "removed": {k: v for k, v in {**prepared["clean"], **prepared["tokenize"]}.items() if k.startswith("removed")},
        "n": result["n"], "task": result["task"], "metric": result["metric"],
        "score": result["score"], "perplexity": result["perplexity"],
        "served": {"url": cfg.url, "model": cfg.served_model} if cfg.url else None,
        "stored_score": stored, "stored_n": stored_n, "base_score": base_score, "base_fresh_score": base_fresh,
        "drop": drop, "max_drop": max_drop, "passed": passed,
        "drift": drift, "drift_thresholds": cfg.thresholds.as_dict(),
        "drift_over": cfg.thresholds.over(drift) if drift is not None else [],
        "git": git_state(Path(__file__).resolve().parents[2]), "versions": versions(("torch", "ftcore")),
    }  # fmt: skip


RECORD_KEYS = ("score", "stored_score", "max_drop", "passed", "metric", "run_dir")  # what the plot reads


def append_history(path: Path, record: dict) -> None:
    """One JSON line per check, written whole (on a line of its own after a torn last line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")


def read_history(path: Path) -> list[dict]:
    """The history's records; a line that is not a record (a torn write, hand edits) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and all(k in record for k in RECORD_KEYS):
            records.append(record)
    return records


def summary(record: dict) -> str:
    """The check in a few lines: score vs stored (and base), pass/fail, drift scores with those over marked."""
    base = f", base {record['base_score']:.4f}" if record["base_score"] is not None else ""
    if record.get("base_fresh_score") is not None:
        base += f"; base model on this file {record['base_fresh_score']:.4f}"
    verdict = "PASS" if record["passed"] else f"FAIL (more than {record['max_drop']} below the stored score)"
    lines = [f"{record['metric']} on {record['file']} (n={record['n']}): {record['score']:.4f}; stored test score "
             f"{record['stored_score']:.4f} (n={record['stored_n']}){base}; "
             f"drop {record['drop']:+.4f}: {verdict}"]  # fmt: skip
    if record["drift"] is not None:
        parts = [f"{name} {value:.3f}" + (f" OVER {record['drift_thresholds'][name]}" if name in record["drift_over"]
                                          else "") for name, value in record["drift"].items()]  # fmt: skip
        lines.append("drift: " + ", ".join(parts))
    return "\n".join(lines)
