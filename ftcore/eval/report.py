"""Write an evaluation: eval.json (scores), report.md (baseline vs fine-tuned), predictions.jsonl (samples).

`finetuned` and `baseline` are results of evaluate_task (optionally with "perplexity"/"loss" added);
eval.json keeps the scores under "finetuned" and "baseline", plus whatever `extra` holds.
"""

import json
from pathlib import Path


def scores_of(result: dict) -> dict:
    extra = {k: result[k] for k in ("perplexity", "loss", "tokens") if k in result}
    return {**result["scores"], **extra}


def write_eval(out_dir, split: str, finetuned: dict, baseline: dict | None = None, extra: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    report = {"task": finetuned["task"], "metric": finetuned["metric"], "split": split, "n": finetuned["n"],
              "finetuned": scores_of(finetuned), **(extra or {})}  # fmt: skip
    if baseline is not None:
        report["baseline"] = scores_of(baseline)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out_dir / "predictions.jsonl", "w") as f:
        for s in finetuned["samples"]:
            f.write(json.dumps(s) + "\n")
    (out_dir / "report.md").write_text(markdown_table(split, finetuned, baseline))
    before = f"{baseline['score']:.4f} -> " if baseline else ""
    print(f"{split} {finetuned['metric']}: {before}{finetuned['score']:.4f} (baseline -> fine-tuned, n={finetuned['n']})")
    return report


def markdown_table(split: str, finetuned: dict, baseline: dict | None) -> str:
    rows = ([("baseline", baseline)] if baseline else []) + [("fine-tuned", finetuned)]
    ppl = "perplexity" in finetuned
    head = f"| model | {finetuned['metric']} ({split}, n={finetuned['n']}) |" + (" perplexity |" if ppl else "")
    lines = [head, "| --- | --- |" + (" --- |" if ppl else "")]
    for name, r in rows:
        lines.append(f"| {name} | {r['score']:.4f} |" + (f" {r['perplexity']:.3f} |" if ppl else ""))
    return "\n".join(lines) + "\n"
