"""report.md's error analysis: per-group metric, confusion matrix, failures; data.group_field through the pipeline."""

import json

import pytest
from test_train import data_cache, tiny_dir, tiny_run  # noqa: F401  (fixtures)

from ftcore.data.io import load_examples
from ftcore.errors import FtcoreError
from ftcore.eval.analysis import analysis_markdown, cell
from ftcore.eval.metrics import classification_report


def sample(pred, ref, group=None, prompt="q", where="f:1"):
    s = {"where": where, "prompt": prompt, "output": f"The answer is {pred}", "prediction": pred, "reference": ref}
    return {**s, "group": group} if group is not None else s


def test_groups_confusion_and_first_failures_for_a_label_task():
    samples = [sample("a", "a", "x"), sample("b", "a", "x", where="f:2"), sample("b", "b", "y"),
               sample("", "b", "y", prompt="a | pipe\nand a newline", where="f:4"), sample("a", "a", "y")]  # fmt: skip
    md = analysis_markdown("f1", samples, failures=1)
    y = [s for s in samples if s["group"] == "y"]
    f1_y = classification_report([s["prediction"] for s in y], [s["reference"] for s in y])["f1_macro"]
    assert f"| y | 3 | {f1_y:.4f} |" in md and "| x | 2 |" in md
    assert md.index("| y | 3 |") < md.index("| x | 2 |")  # largest group first
    assert "| | (none) | a | b |" in md
    assert "| **a** | 0 | 2 | 1 |" in md and "| **b** | 1 | 0 | 1 |" in md  # rows: reference
    assert "## First failures (1 of 2 wrong)" in md and "| f:2 |" in md and "f:4" not in md
    assert cell("a | pipe\nand a newline") == "a \\| pipe and a newline" and cell("x" * 200).endswith("…")


def test_text_tasks_list_the_worst_by_rouge_and_no_groups_without_a_field():
    samples = [sample("the cat sat", "the cat sat"), sample("dog", "the cat sat", where="f:2"),
               sample("the cat", "the cat sat", where="f:3")]  # fmt: skip
    md = analysis_markdown("rouge", samples, failures=2)
    assert "## By group" not in md and "Confusion" not in md
    assert "## Worst 2 by ROUGE-L" in md and md.index("| f:2 |") < md.index("| f:3 |") and "| f:1 |" not in md
    assert analysis_markdown("accuracy", samples, failures=0) == ""


def test_group_field_reads_each_records_value_or_fails_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "topic": 3}) + "\n"
                    + json.dumps({"prompt": "q", "completion": "d", "topic": "geo"}) + "\n")  # fmt: skip
    assert [ex["group"] for ex in load_examples(path, group_field="topic")] == ["3", "geo"]
    assert "group" not in load_examples(path)[0]
    with pytest.raises(FtcoreError, match=r"d.jsonl:1: no field 'kind' \(data.group_field\); available keys: prompt"):
        load_examples(path, group_field="kind")


def test_a_run_reports_the_metric_by_group(tiny_dir, data_cache, tmp_path):  # noqa: F811
    from ftcore.config import run_config
    from ftcore.train import train

    path = tmp_path / "sums.jsonl"
    rows = [{"prompt": f"What is {a} plus {a + 1}?", "completion": str(2 * a + 1), "kind": "odd" if a % 2 else "even"}
            for a in range(80)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_run(tiny_dir, data_cache, tmp_path / "run", train__max_steps=2, train__eval_every=0,
                   data__path=str(path), data__task="number", data__group_field="kind", eval__report_failures=3)
    train(run_config(cfg))
    report = (tmp_path / "run" / "report.md").read_text()
    samples = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    n = {g: sum(s["group"] == g for s in samples) for g in ("odd", "even")}
    assert n["odd"] + n["even"] == len(samples) == 8 and all(s["where"].startswith(str(path)) for s in samples)
    assert "## By group" in report and all(f"| {g} | {k} |" in report for g, k in n.items() if k)
    assert "## First failures" in report
