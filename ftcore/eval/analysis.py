"""Error analysis for report.md: the metric per group (data.group_field), a confusion matrix for label tasks, and
the failures (eval.report_failures of them, with prompt, reference and output).

    text = analysis_markdown("f1", samples, failures=10)

A failure is a wrong answer for accuracy, exact match and F1 (the first ones, in test order), and for ROUGE and
BLEU the lowest per-example ROUGE-L (the worst ones).
"""

from collections import Counter
from types import SimpleNamespace

from ftcore.eval.evaluate import headline, score
from ftcore.eval.metrics import normalize_text
from ftcore.eval.rouge import rouge_pair

EXACT = ("accuracy", "exact_match", "f1")


def analysis_markdown(metric: str, samples: list[dict], failures: int = 10) -> str:
    parts = []
    if any(s.get("group") is not None for s in samples):
        parts.append(by_group(metric, samples))
    if metric == "f1":
        parts.append(confusion(samples))
    if failures:
        parts.append(failure_list(metric, samples, failures))
    return "\n".join(parts)


def by_group(metric: str, samples: list[dict]) -> str:
    """The headline metric over each group's examples, largest group first."""
    task = SimpleNamespace(metric=metric)
    groups = {}
    for s in samples:
        groups.setdefault(str(s.get("group")), []).append(s)
    lines = ["## By group", "", f"| group | n | {metric} |", "| --- | ---: | ---: |"]
    for name, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        value = headline(task, score(task, [r["prediction"] for r in rows], [r["reference"] for r in rows]))
        lines.append(f"| {cell(name)} | {len(rows)} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def confusion(samples: list[dict]) -> str:
    """Counts of (reference, prediction): rows are the references, columns the predictions ("" = no label)."""
    pairs = Counter((s["reference"], s["prediction"]) for s in samples)
    classes = sorted({c for pair in pairs for c in pair})
    name = lambda c: cell(c) if c else "(none)"  # noqa: E731
    lines = ["## Confusion matrix (rows: reference, columns: prediction)", "",
             "| | " + " | ".join(map(name, classes)) + " |", "| --- |" + " ---: |" * len(classes)]  # fmt: skip
    for ref in classes:
        lines.append(f"| **{name(ref)}** | " + " | ".join(str(pairs[(ref, p)]) for p in classes) + " |")
    return "\n".join(lines) + "\n"


def is_wrong(metric: str, s: dict) -> bool:
    if metric == "exact_match":
        return normalize_text(s["prediction"]) != normalize_text(s["reference"])
    return s["prediction"] != s["reference"]


def failure_list(metric: str, samples: list[dict], n: int) -> str:
    if metric in EXACT:
        picked = [s for s in samples if is_wrong(metric, s)][:n]
        title = f"## First failures ({len(picked)} of {sum(is_wrong(metric, s) for s in samples)} wrong)"
    else:
        scored = sorted(samples, key=lambda s: rouge_pair(s["prediction"], s["reference"], True)["rougeL"])
        picked = scored[:n]
        title = f"## Worst {len(picked)} by ROUGE-L"
    lines = [title, "", "| where | prompt | reference | output |", "| --- | --- | --- | --- |"]
    for s in picked:
        lines.append(f"| {cell(s.get('where') or '')} | {cell(s.get('prompt') or '')} | {cell(s['reference'])} "
                     f"| {cell(s['output'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def cell(text: str, limit: int = 160) -> str:
    """Text fit for one markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
