"""Write an evaluation: eval.json (scores), report.md (baseline vs fine-tuned), predictions.jsonl (samples).

`finetuned`, `baseline` and `few_shot` are results of evaluate_task (optionally with "perplexity"/"loss"
added; few_shot with "k" and "shots"); eval.json keeps the scores under "finetuned", "baseline" and "few_shot",
the forgetting report (forgetting.py) under "forgetting", plus whatever `extra` holds.
"""

import json
from pathlib import Path

from ftcore.eval.analysis import analysis_markdown


def scores_of(result: dict) -> dict:
    extra = {k: result[k] for k in ("perplexity", "loss", "tokens") if k in result}
    return {**result["scores"], **extra}


def write_eval(out_dir, split: str, finetuned: dict, baseline: dict | None = None, extra: dict | None = None,
               few_shot: dict | None = None, forgetting: dict | None = None, failures: int = 10) -> dict:  # fmt: skip
    out_dir = Path(out_dir)
    report = {"task": finetuned["task"], "metric": finetuned["metric"], "split": split, "n": finetuned["n"],
              "finetuned": scores_of(finetuned), **(extra or {})}  # fmt: skip
    if baseline is not None:
        report["baseline"] = scores_of(baseline)
    if few_shot is not None:
        report["few_shot"] = {**scores_of(few_shot), "k": few_shot["k"], "shots": few_shot["shots"]}
    if forgetting is not None:
        report["forgetting"] = forgetting
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out_dir / "predictions.jsonl", "w") as f:
        for s in finetuned["samples"]:
            f.write(json.dumps(s) + "\n")
    md = markdown_table(split, finetuned, baseline, few_shot) + forgetting_text(forgetting)
    md += "\n" + analysis_markdown(finetuned["metric"], finetuned["samples"], failures)
    (out_dir / "report.md").write_text(md)
    before = f"{baseline['score']:.4f} -> " if baseline else ""
    print(f"{split} {finetuned['metric']}: {before}{finetuned['score']:.4f} (baseline -> fine-tuned, n={finetuned['n']})")
    return report


def markdown_table(split: str, finetuned: dict, baseline: dict | None, few_shot: dict | None = None) -> str:
    rows = ([("baseline", baseline)] if baseline else []) + ([(f"baseline, {few_shot['k']}-shot", few_shot)]
                                                             if few_shot else []) + [("fine-tuned", finetuned)]
    ppl = "perplexity" in finetuned
    head = f"| model | {finetuned['metric']} ({split}, n={finetuned['n']}) |" + (" perplexity |" if ppl else "")
    lines = [head, "| --- | --- |" + (" --- |" if ppl else "")]
    for name, r in rows:
        value = f" {r['perplexity']:.3f} |" if ppl and "perplexity" in r else " — |" if ppl else ""
        lines.append(f"| {name} | {r['score']:.4f} |" + value)
    return "\n".join(lines) + "\n"


def forgetting_text(forgetting: dict | None) -> str:
    if forgetting is None:
        return ""
    f = forgetting
    what = "text sampled from the base model" if f["source"] == "sampled" else f"`{f['source']}`"
    return (f"\nForgetting: loss on {f['sequences']} sequences ({f['tokens']} tokens) of {what}: "
            f"{f['base_loss']:.4f} (base) -> {f['tuned_loss']:.4f} (fine-tuned), {f['increase']:+.4f} nats/token "
            f"({f['estimates']}).\n")
