"""Cleaning: each step does its job, can be switched off, and is counted in the report."""

import json

import pytest
from test_data_common import FakeTokenizer, write_jsonl

from ftcore.data.clean import clean_examples, collapse_whitespace, normalize_unicode, strip_html
from ftcore.data.config import CleanConfig, DataConfig
from ftcore.data.pipeline import build_datasets
from ftcore.errors import FtcoreError


def ex(user, answer, system=None):
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "where": "f:1"}


def test_strip_html_tags_entities_comments_scripts():
    assert strip_html("<p>Hello&nbsp;<b>world</b> &amp; co</p>") == "\nHello\xa0world & co\n"
    assert strip_html("a<br/>b<!-- hidden --><script>var x = 1;</script><style>p{}</style>") == "a\nb"
    assert strip_html("3 < 5 and 7 > 2, x<y") == "3 < 5 and 7 > 2, x<y"  # not tags
    assert strip_html("&lt;b&gt; is a tag") == "<b> is a tag"  # escaped markup stays as text


def test_nfkc_and_whitespace():
    assert normalize_unicode("ﬁle ½ Ｆｕｌｌ\u00a0x") == "file 1⁄2 Full x"
    assert collapse_whitespace("  a \t b  \r\n\n\n\n c  \n d ") == "a b\n\nc\nd"


def test_report_counts_each_step():
    examples = [
        ex("<i>Hi</i>", "ok"),  # html
        ex("Ｈｉ", "ok"),  # nfkc -> "Hi": then a duplicate of the first
        ex("Hi  there", "ok"),  # whitespace
        ex("   ", "ok"),  # empty after cleaning
        ex("q", ""),  # empty answer
        ex("fine", "ok", system=""),  # empty system message: dropped, example kept
        ex("long " * 20, "ok"),  # over max_chars
    ]
    kept, report = clean_examples(examples, CleanConfig(max_chars=50))
    assert report == {
        "input": 7, "strip_html_changed": 1, "normalize_unicode_changed": 1, "collapse_whitespace_changed": 3,
        "removed_empty": 2, "removed_over_max_chars": 1, "removed_duplicates": 1, "output": 3,
    }  # fmt: skip
    assert [k["messages"][0]["content"] for k in kept] == ["Hi", "Hi there", "fine"]
    assert examples[0]["messages"][0]["content"] == "<i>Hi</i>"  # inputs are not modified


def test_switches_turn_steps_off():
    examples = [ex("<i>Hi</i>", "ok"), ex("<i>Hi</i>", "ok"), ex("", "x")]
    off = CleanConfig(strip_html=False, normalize_unicode=False, collapse_whitespace=False, dedup=False,
                      drop_empty=False)  # fmt: skip
    kept, report = clean_examples(examples, off)
    assert report == {"input": 3, "output": 3} and kept == examples


def test_dataset_emptied_by_cleaning_is_an_error_showing_the_report(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "<br>", "completion": "x"}, {"prompt": " ", "completion": "y"}])
    with pytest.raises(FtcoreError) as e:
        build_datasets(DataConfig(path=str(p), cache_dir=""), FakeTokenizer())
    msg = str(e.value)
    assert msg.startswith(f"{p}: no examples left after cleaning; report: ") and "\n" not in msg
    report = json.loads(msg.split("report: ", 1)[1])
    assert report["input"] == 2 and report["removed_empty"] == 2 and report["output"] == 0
