"""Results of a comparison: runs.csv (one row per run), results.csv and results.md (one row per arm:
the task metric's mean ± std over seeds and its 95% bootstrap interval, trainable parameters, peak memory,
tokens/s, wall time), differences.csv (every pair of arms and each arm against the base model: the difference,
its interval, p-values and Holm's mark; stats.py), lr_trials.csv, and the plots (plots.py). Every number is read
back from the runs' own files: eval.json (test metric, trainable parameters, best validation loss),
predictions.jsonl (each test example's extracted answer), metrics.jsonl (validation curve, tokens/s, GPU peak
memory) and compare_status.json (wall time, peak RSS); the base model's from baseline/.
"""

import csv
import json
import math
import statistics
from pathlib import Path

from ftcore.compare import stats
from ftcore.compare.plan import read_status, run_state
from ftcore.config import run_config
from ftcore.data.tasks import get_task
from ftcore.eval.evaluate import headline
from ftcore.train.log import read_metrics

RUN_COLUMNS = ["arm", "method", "seed", "lr", "knob", "size", "trainable_params", "metric", "score", "best_val_loss",
               "final_val_loss", "forgetting", "steps", "tokens_per_s", "peak_mem_gb", "peak_mem_kind", "wall_s", "status",
               "config_hash", "run_dir"]  # fmt: skip
ARM_COLUMNS = ["arm", "method", "knob", "size", "trainable_params", "budget", "budget_ratio", "lr", "seeds", "metric",
               "score_mean", "score_std", "ci_low", "ci_high", "val_loss_mean", "val_loss_std", "forgetting_mean", "forgetting_std", "peak_mem_gb",
               "peak_mem_kind",
               "tokens_per_s", "wall_s_mean", "wall_s_total", "note"]  # fmt: skip


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_run(run, task, out_dir: Path) -> dict:
    """One run's row, from its eval.json, metrics.jsonl and compare_status.json (run_dir relative to out_dir)."""
    ev = read_json(run.run_dir / "eval.json") or {}
    events = read_metrics(run.run_dir)
    status = read_status(run.run_dir)
    val = [e["val_loss"] for e in events if e.get("val_loss") is not None]
    speed = [e["tokens_per_s"] for e in events if e.get("tokens_per_s") is not None]
    gpu_peak = [e["peak_mem_gb"] for e in events if e.get("peak_mem_gb") is not None]
    sized = run.arm.sized
    return {
        "arm": run.arm.name, "method": run.arm.method, "seed": run.seed, "lr": run.lr, "knob": sized.knob or "",
        "size": sized.size if sized.size is not None else "",
        "trainable_params": ev.get("trainable_params", sized.trainable),
        "metric": ev.get("metric", task.metric),
        "score": headline(task, ev["finetuned"]) if ev else None,
        "best_val_loss": ev.get("best_val_loss"),
        "final_val_loss": val[-1] if val else None,
        "forgetting": (ev.get("forgetting") or {}).get("increase"),
        "steps": ev.get("step"),
        "tokens_per_s": statistics.median(speed) if speed else None,
        "peak_mem_gb": max(gpu_peak) if gpu_peak else status.get("peak_mem_gb"),
        "peak_mem_kind": "cuda_allocated" if gpu_peak else status.get("peak_mem_kind"),
        "wall_s": status.get("wall_s"),
        "status": run_state(run),
        "config_hash": run.hash, "run_dir": str(relative(run.run_dir, out_dir)),
    }  # fmt: skip


def relative(path: Path, root: Path) -> Path:
    try:
        return Path(path).relative_to(root)
    except ValueError:
        return Path(path)


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(arm, rows: list[dict]) -> dict:
    """One arm's row: means and standard deviations (n-1) over its finished seeds."""
    done = [r for r in rows if r["status"] == "finished"]
    score_mean, score_std = mean_std([r["score"] for r in done])
    val_mean, val_std = mean_std([r["best_val_loss"] for r in done])
    forget_mean, forget_std = mean_std([r["forgetting"] for r in done])
    peaks = [r["peak_mem_gb"] for r in done if r["peak_mem_gb"] is not None]
    speed, _ = mean_std([r["tokens_per_s"] for r in done])
    walls = [r["wall_s"] for r in done if r["wall_s"] is not None]
    sized = arm.sized
    return {
        "arm": arm.name, "method": arm.method, "knob": sized.knob or "", "size": sized.size if sized.size else "",
        "trainable_params": sized.trainable, "budget": arm.budget or "",
        "budget_ratio": sized.trainable / arm.budget if arm.budget else "",
        "lr": rows[0]["lr"], "seeds": len(done), "metric": rows[0]["metric"],
        "score_mean": score_mean, "score_std": score_std, "val_loss_mean": val_mean, "val_loss_std": val_std,
        "forgetting_mean": forget_mean, "forgetting_std": forget_std,
        "peak_mem_gb": max(peaks) if peaks else None,
        "peak_mem_kind": next((r["peak_mem_kind"] for r in done if r["peak_mem_kind"]), None),
        "tokens_per_s": speed, "wall_s_mean": statistics.fmean(walls) if walls else None,
        "wall_s_total": sum(walls) if walls else None,
        "note": "; ".join(filter(None, [sized.note] + [f"seed {r['seed']} {r['status']}" for r in rows if r not in done])),
    }  # fmt: skip


DIFF_COLUMNS = ["a", "b", "diff", "ci_low", "ci_high", "p", "p_holm", "significant"]


def read_predictions(run_dir: Path) -> list[dict] | None:
    path = Path(run_dir) / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def significance(out_dir: Path, cc, arms, finals, runs: list[dict], table: list[dict], baseline) -> dict | None:
    """Bootstrap intervals and paired tests over the arms whose every seed finished (stats.compare_arms); each
    table row gets ci_low/ci_high. None when no arm has all its seeds or the runs do not share their test set."""
    metric = table[0]["metric"]
    by_arm = {}
    for arm in arms:
        mine = [(row, r) for row, r in zip(runs, finals) if r.arm is arm]
        if mine and all(row["status"] == "finished" for row, _ in mine):
            preds = [read_predictions(r.run_dir) for _, r in sorted(mine, key=lambda p: p[0]["seed"])]
            if all(p is not None for p in preds):
                by_arm[arm.name] = preds
    refs = {}
    if baseline and (zero := read_predictions(out_dir / "baseline")):
        refs["base model"] = zero
    if baseline and baseline.get("few_shot"):
        path = out_dir / "baseline" / "predictions_few_shot.jsonl"
        if path.is_file():
            refs[few_shot_name(baseline)] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    every = [p for preds in by_arm.values() for p in preds] + list(refs.values())
    if not by_arm or len({tuple(r["reference"] for r in p) for p in every}) != 1:
        return None
    classes = stats.classes_of(*by_arm.values(), *([p] for p in refs.values())) if metric == "f1" else None
    outcomes = {name: stats.outcomes(metric, preds, classes) for name, preds in by_arm.items()}
    references = {name: stats.outcomes(metric, [preds], classes) for name, preds in refs.items()}
    st = cc.stats
    result = stats.compare_arms(outcomes, references, st.resamples, st.permutations, st.seed, st.alpha)
    for row in table:
        if row["arm"] in result["arms"]:
            row["ci_low"], row["ci_high"] = result["arms"][row["arm"]]["ci"]
    write_csv(out_dir / "differences.csv", DIFF_COLUMNS,
              [{**p, "ci_low": p["ci"][0], "ci_high": p["ci"][1]} for p in result["pairs"]])  # fmt: skip
    return result


def write_csv(path: Path, columns: list[str], rows: list[dict]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def write_results(out_dir: Path, cc, arms, finals, trials, baseline, base: dict, command: str) -> dict:
    """Write runs.csv, results.csv, results.md (and lr_trials.csv, plots); return the rows."""
    from ftcore.compare.plots import write_plots

    task = get_task(run_config({**base, "peft": {"method": "none"}}).data)
    runs = [collect_run(r, task, out_dir) for r in finals]
    table = [aggregate(a, [row for row, r in zip(runs, finals) if r.arm is a]) for a in arms]
    sig = significance(out_dir, cc, arms, finals, runs, table, baseline)
    write_csv(out_dir / "runs.csv", RUN_COLUMNS, runs)
    write_csv(out_dir / "results.csv", ARM_COLUMNS, table)
    trial_rows = [collect_run(t, task, out_dir) for t in trials]
    if trials:
        write_csv(out_dir / "lr_trials.csv", RUN_COLUMNS, trial_rows)
    finished = any(r["status"] == "finished" for r in runs)
    plots = write_plots(out_dir, arms, finals, table, baseline, sig) if cc.plots and finished else []
    (out_dir / "results.md").write_text(markdown(cc, table, trial_rows, baseline, base, command, plots, sig))
    print(f"compare: results in {out_dir / 'results.md'}", flush=True)
    print(markdown_table(table, baseline, sig), flush=True)
    return {"results": table, "runs": runs, "lr_trials": trial_rows, "baseline": baseline, "plots": plots,
            "significance": sig}  # fmt: skip


def fmt(x, digits: int = 4) -> str:
    return "—" if x is None or x == "" else f"{x:.{digits}f}"


def few_shot_name(baseline: dict) -> str:
    return f"base model, {baseline['few_shot']['k']}-shot"


def ci_text(ci) -> str:
    return "—" if ci is None or ci[0] is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def markdown_table(table: list[dict], baseline: dict | None, sig: dict | None = None) -> str:
    metric = table[0]["metric"]
    n = table[0]["seeds"]
    head = (f"| arm | size | trainable params | lr | {metric} (mean ± std over seeds) | 95% CI | best val loss "
            f"| forgetting (nats/token) | peak mem (GB) | tokens/s | wall (s, per run) |")  # fmt: skip
    lines = [head, "| --- | --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: |"]
    refs = [("base model", baseline)] if baseline else []
    if baseline and baseline.get("few_shot"):
        refs.append((few_shot_name(baseline), baseline["few_shot"]))
    for name, ref in refs:
        ci = ci_text(sig["arms"].get(name, {}).get("ci") if sig else None)
        lines.append(f"| {name} | — | 0 | — | {ref['score']:.4f} | {ci} | — | — | — | — | — |")
    for r in table:
        size = f"{r['knob']}={r['size']}" if r["knob"] else "fixed"
        params = f"{r['trainable_params']:,}" + (f" ({100 * r['budget_ratio']:.1f}%)" if r["budget"] else "")
        score = fmt(r["score_mean"]) + (f" ± {r['score_std']:.4f}" if r["score_std"] is not None else "")
        val = fmt(r["val_loss_mean"]) + (f" ± {r['val_loss_std']:.4f}" if r["val_loss_std"] is not None else "")
        seeds = "" if r["seeds"] == n else f" (n={r['seeds']})"
        speed = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        ci = ci_text((r.get("ci_low"), r.get("ci_high")))
        forget = fmt(r["forgetting_mean"]) + (f" ± {r['forgetting_std']:.4f}" if r["forgetting_std"] is not None else "")
        lines.append(f"| {r['arm']} | {size} | {params} | {r['lr']:g} | {score}{seeds} | {ci} | {val} | {forget} "
                     f"| {fmt(r['peak_mem_gb'], 2)} | {speed} | {fmt(r['wall_s_mean'], 0)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def differences_table(sig: dict) -> str:
    """Every pair A - B with its interval and p-values; ✓ where Holm's adjusted p is below alpha."""
    lines = ["| A | B | A - B | 95% CI | p | p (Holm) | significant |",
             "| --- | --- | ---: | --- | ---: | ---: | :-: |"]
    for p in sig["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['diff']:+.4f} | {ci_text(p['ci'])} | {p['p']:.4f} "
                     f"| {p['p_holm']:.4f} | {'✓' if p['significant'] else ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_length(train: dict) -> str:
    """A run's length as configured: `2 epochs` (train.epochs) or `120 steps`."""
    return f"{train['epochs']:g} epochs" if train["epochs"] else f"{train['max_steps']} steps"


def markdown(cc, table, trial_rows, baseline, base: dict, command: str, plots: list[Path], sig=None) -> str:
    t, d, e = base["train"], base["data"], base["eval"]
    kinds = {r["peak_mem_kind"] for r in table if r["peak_mem_kind"]}
    budget = f"a budget of {cc.budget:,} trainable parameters" if cc.budget else "sizes as configured"
    lines = [f"# PEFT comparison: {d['task']} ({table[0]['metric']}), {base['model']['path']}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    setup = (f"{len(cc.seeds)} seeds ({', '.join(map(str, cc.seeds))}) per arm, {budget}; {run_length(t)} of "
             f"{t['batch_size']} x {t['grad_accum']} examples; test metric on {e['max_examples'] or 'all'} "
             f"{e['split']} examples (greedy).")  # fmt: skip
    lines += [setup, "", markdown_table(table, baseline, sig)]
    notes = [f"- {r['arm']}: {r['note']}" for r in table if r["note"]]
    notes.append(
        "- size: the knob solved for the budget (largest value within it), or `fixed` for methods of one size;"
        " trainable params are counted on the model and equal each run's own count (eval.json)."
    )
    notes.append("- best val loss: the lowest validation loss of each run (its best checkpoint is the one tested).")
    if any(r["forgetting_mean"] is not None for r in table):
        notes.append(
            f"- forgetting: each run's loss on {e['forgetting_samples']} sequences of {e['forgetting_tokens']} tokens"
            + (f" of `{e['forgetting_path']}`" if e["forgetting_path"] else " sampled from the base model at"
               " temperature 1 (seed " + str(e["forgetting_seed"]) + ", the same text for every run)")
            + " minus the base model's"
            + ("" if e["forgetting_path"] else ": an estimate of KL(base || tuned) per token") + "."
        )  # fmt: skip
    if baseline and baseline.get("few_shot"):
        notes.append(f"- {few_shot_name(baseline)}: the base model with {baseline['few_shot']['k']} training examples"
                     f" in context (eval.few_shot_seed={e['few_shot_seed']}; the same for every test item).")
    if "rss" in kinds:
        notes.append(
            "- peak mem: the training process's peak resident memory (VmHWM) during the run"
            " (in-process runs include the sweep process itself); on a GPU, peak allocated CUDA memory."
        )
    notes.append(
        "- tokens/s: median over steps of the tokens a step processes (padding included) per second;"
        " wall: seconds per run, evaluation included."
    )
    if sig:
        notes.append(
            f"- 95% CI: percentile interval of {sig['resamples']} bootstrap draws of the test examples and the seeds"
            f" (seed {sig['seed']}; the same draws for every arm); — where a seed did not finish."
        )
    lines += ["Notes:", *notes, ""]
    if sig:
        lines += [
            "Differences (A - B; the interval from the same bootstrap draws; p: two-sided paired swap test, each"
            f" example's answers swapped between A and B, {sig['permutations']} random swaps or all of them;"
            f" ✓: Holm-adjusted p < {sig['alpha']} over the {len(sig['pairs'])} comparisons. The test holds the"
            " trained runs fixed (the test-set noise); the interval also resamples the seeds):",
            "", differences_table(sig),
        ]  # fmt: skip
    if trial_rows:
        first = trial_rows[0]
        title = (
            f"Learning-rate trials (seed {first['seed']}, {first['steps'] or '?'} steps; lowest validation loss wins):"
        )
        lines += [title, "", "| arm | lr | best val loss | status |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {r['arm']} | {r['lr']:g} | {fmt(r['best_val_loss'])} | {r['status']} |" for r in trial_rows]
        lines.append("")
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(lines)
