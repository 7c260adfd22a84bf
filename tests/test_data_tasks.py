"""Task answer extraction and metric choice for the demo tasks."""

from fractions import Fraction

import pytest

from ftcore.data.config import DataConfig
from ftcore.data.tasks import TASKS, canonical_number, extract_answer, extract_number, get_task, normalize_label
from ftcore.eval.evaluate import score


@pytest.mark.parametrize(
    "text, expected",
    [("42", "42"), (" 42\n", "42"), ("12 + 7 = 19 apples.", "19"), ("It costs $1,234.50.", "1234.5"),
     ("-3", "-3"), ("7.0", "7"), ("The answer is 19.", "19"), ("no idea", ""), ("#### 8 then 9", "9"),
     ("3 steps ... #### 12", "12"), ("0.25", "0.25")],
)  # fmt: skip
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("-1/113", "-1/113"), ("So x = -1/113.", "-1/113"), ("\u22121/113", "-1/113"), ("-2/226", "-1/113"),
     (r"\boxed{-\frac{1}{113}}", "-1/113"), (r"$\frac{-1}{113}$", "-1/113"), ("1/3", "1/3"), ("-7/2", "-3.5"),
     ("3.50", "3.5"), ("1,234", "1234"), ("1,000,000", "1000000"), ("$1,234.50", "1234.5"), (r"1{,}234", "1234"),
     ("1e-3", "0.001"), ("2.5E+4", "25000"), (r"2.5 \times 10^{4}", "25000"), ("6.02×10^23", "6020" + "0" * 20),
     ("+7", "7"), ("-0.0", "0"), ("-$5", "-5"), ("50%", "50"), ("x = -1", "-1"), ("answer:-3", "-3"),
     (r"\boxed{12}, not 13", "12"), ("#### 1,234 (then 5)", "5"), (r"\dfrac34", "0.75")],
)  # fmt: skip
def test_extract_number_reads_signed_fractions_decimals_and_exponents(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("2024-05-01", "1"), ("3-5", "5"), ("(3)-5", "5"), ("x-1", "1"), ("1, 2, 3", "3"), ("1,2345", "2345"),
     ("1,23", "23"), ("It is 19.", "19"), ("v1.2.3", "1.2"), ("no idea", ""), ("", ""), ("-", ""), ("1/0", ""),
     ("1e99999", ""), (r"\boxed{\text{(A)}} 7", ""), ("9" * 5000, "")],
)  # fmt: skip
def test_extract_number_refuses_what_is_not_that_number(text, expected):
    """A date or range gives no negative number, lists are not thousands, a sentence's period is no decimal point."""
    assert extract_number(text) == expected


def test_equal_values_extract_equal():
    forms = ["0.5", ".5", "1/2", "2/4", r"\frac{1}{2}", r"\dfrac12", "5e-1", "0.50", r"\boxed{\frac{2}{4}}"]
    assert {extract_number(f) for f in forms} == {"0.5"}
    assert {extract_number(f) for f in ["-1/113", "−1/113", r"-\frac{1}{113}", "-3/339"]} == {"-1/113"}
    assert len({extract_number(f) for f in ["1/3", "0.333", "0.3333333333"]}) == 3  # no rounding


def test_accuracy_compares_values():
    task = TASKS["number"]
    preds = [extract_answer(task, t) for t in ["So it is 1/2.", r"\boxed{-\frac{1}{113}}", "113", "1e3"]]
    refs = [extract_answer(task, r) for r in ["#### 0.5", "-1/113", "-1/113", "1,000"]]
    assert preds == ["0.5", "-1/113", "113", "1000"] and score(task, preds, refs) == {"accuracy": 0.75}


@pytest.mark.parametrize("value", [Fraction(7, 2), Fraction(-1, 113), Fraction(1, 1024), Fraction(-3, 40),
                                   Fraction(10**30, 7), Fraction(-5), Fraction(0)])  # fmt: skip
def test_canonical_number_is_exact(value):
    text = canonical_number(value)
    assert Fraction(text) == value and extract_number(text) == text


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
