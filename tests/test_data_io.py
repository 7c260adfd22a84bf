"""Reading: JSONL/JSON/CSV, the three record shapes, field mapping, and errors naming file and line."""

import json

import pytest

from ftcore.data.io import load_examples, read_records
from ftcore.errors import FtcoreError


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_jsonl_pairs_skip_blank_lines_and_coerce_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "1+1?", "completion": 2}\n\n{"prompt": "2+2?", "completion": "4", "system": "Be brief."}\n')
    exs = load_examples(p)
    assert exs[0] == {"messages": msgs(("user", "1+1?"), ("assistant", "2")), "where": f"{p}:1"}
    assert exs[1]["messages"] == msgs(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))
    assert exs[1]["where"] == f"{p}:3"


def test_instruction_records_join_instruction_and_input(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"instruction": "Translate.", "input": "hola", "output": "hello"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]  # fmt: skip
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    exs = load_examples(p)
    assert exs[0]["messages"] == msgs(("user", "Translate.\n\nhola"), ("assistant", "hello"))
    assert exs[1]["messages"][0] == {"role": "user", "content": "Say hi."}


def test_chat_messages_and_sharegpt(tmp_path):
    p = tmp_path / "d.json"
    convs = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    p.write_text(json.dumps(convs, indent=2))
    assert load_examples(p)[0]["messages"] == msgs(("user", "hi"), ("assistant", "hello"))


def test_field_mapping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q?", "answer": "a"}\n')
    exs = load_examples(p, fields={"prompt": "question", "completion": "answer"})
    assert exs[0]["messages"] == msgs(("user", "q?"), ("assistant", "a"))


def test_json_array_and_wrapped_list_report_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c", "completion": "d"}\n]\n')
    assert [line for line, _ in read_records(p)] == [2, 4]
    p.write_text(json.dumps({"data": [{"prompt": "a", "completion": "b"}]}))
    assert read_records(p) == [("record 0", {"prompt": "a", "completion": "b"})]


def test_csv_with_quotes_newlines_and_json_messages(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\n"multi\nline, with comma",yes\nsecond,no\n')
    exs = load_examples(p)
    assert exs[0]["messages"][0]["content"] == "multi\nline, with comma" and exs[0]["where"] == f"{p}:2"
    assert exs[1]["where"] == f"{p}:4"
    p.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n')
    assert load_examples(p)[0]["messages"] == msgs(("user", "hi"), ("assistant", "yo"))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(FtcoreError, match=rf"^{p}:2: malformed JSON line: Expecting value \(column \d+\)$"):
        load_examples(p)
    p.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(FtcoreError, match=rf"^{p}:2: expected a JSON object per line, got list$"):
        load_examples(p)


def test_malformed_json_and_csv_name_the_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}\n]')
    with pytest.raises(FtcoreError, match=rf"^{p}:3: malformed JSON: Expecting ','"):
        load_examples(p)
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(FtcoreError, match=rf"^{p}:3: row has more fields than the header's 2 \(prompt, completion\)$"):
        load_examples(p)


def test_missing_field_lists_available_keys(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "answer": "d", "id": 7}\n')
    with pytest.raises(FtcoreError) as e:
        load_examples(p)
    assert str(e.value) == (
        f"{p}:2: missing field 'completion' for pair records (available keys: prompt, answer, id); "
        "set +data.fields.completion=<key>"
    )


def test_unknown_shape_lists_available_keys(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(FtcoreError, match=r"d.jsonl:1: cannot tell the record type.*available keys: question, answer"):
        load_examples(p)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "narrator", "content": "x"}]}, "message 0: role 'narrator': expected one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "the conversation has no assistant message"),
        ({"messages": "not json"}, "field 'messages' is a string that is not a JSON list"),
        ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}, "expected text"),
    ],
)
def test_bad_chat_records(tmp_path, record, message):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(record) + "\n")
    with pytest.raises(FtcoreError, match=rf"^{p}:1: .*{message}"):
        load_examples(p)


def test_unknown_suffix_and_empty_file(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(FtcoreError, match="cannot tell the format from the suffix; set data.format"):
        load_examples(p)
    p = tmp_path / "d.jsonl"
    p.write_text("\n")
    with pytest.raises(FtcoreError, match="no records found"):
        load_examples(p)
