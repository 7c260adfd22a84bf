"""Task answer extraction and metric choice for the demo tasks."""

import pytest

from ftcore.data.config import DataConfig
from ftcore.data.tasks import TASKS, extract_answer, extract_number, get_task, normalize_label


@pytest.mark.parametrize(
    "text, expected",
    [("42", "42"), (" 42\n", "42"), ("12 + 7 = 19 apples.", "19"), ("It costs $1,234.50.", "1234.5"),
     ("-3", "-3"), ("7.0", "7"), ("The answer is 19.", "19"), ("no idea", ""), ("#### 8 then 9", "9"),
     ("3 steps ... #### 12", "12"), ("0.25", "0.25")],
)  # fmt: skip
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_normalize_label():
    labels = TASKS["tickets"].labels
    assert normalize_label("Billing", labels) == "billing"
    assert normalize_label("  refund.\nBecause the item broke", labels) == "refund"
    assert normalize_label("This is a shipping issue", labels) == "shipping"
    assert normalize_label("billing or refund", labels) == "billing or refund"  # ambiguous: kept, scored wrong
    assert normalize_label("", labels) == ""
    assert normalize_label("Two Factor!", ["two factor", "other"]) == "two factor"


def test_get_task_defaults_and_overrides():
    task = get_task(DataConfig(task="arithmetic"))
    assert (task.kind, task.metric) == ("number", "accuracy")
    assert extract_answer(task, "So the answer is 19.") == extract_answer(task, "19") == "19"
    task = get_task(DataConfig(task="label", labels=["yes", "no"], metric="accuracy"))
    assert task.labels == ("yes", "no") and task.metric == "accuracy"
    assert extract_answer(task, "Yes!") == "yes"
    assert get_task(DataConfig(task="tickets")).metric == "f1"
    assert extract_answer(get_task(DataConfig(task="rewrite")), " a  b\n c ") == "a b c"
