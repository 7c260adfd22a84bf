"""Read JSONL, JSON and CSV files into examples: {"messages": [{"role", "content"}, ...], "where": "file:line"}.

Three record shapes, detected from the first record (or set by data.schema); data.fields maps our
names to the file's keys (e.g. {"prompt": "question", "completion": "answer"}):

    pair         {"prompt": ..., "completion": ..., "system"?: ...}              -> user, assistant
    instruction  {"instruction": ..., "input"?: ..., "output": ..., "system"?}   -> user, assistant
    chat         {"messages": [{"role": ..., "content": ...}, ...]}             (ShareGPT from/value too)

An instruction record's user message is the instruction, then a blank line and the input if any.
Files are UTF-8 (a BOM is allowed); other encodings and JSON's non-standard NaN/Infinity literals fail
naming the file and line.
"""

import csv
import io
import json
import re
from pathlib import Path

from ftcore.errors import FtcoreError
from ftcore.textfile import read_utf8

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}  # fmt: skip


def load_examples(path: Path, fmt: str = "auto", schema: str = "auto", fields: dict | None = None,
                  group_field: str = "") -> list[dict]:  # fmt: skip
    """Read a file and turn each record into an example (the whole file must have one shape); group_field: each
    example's "group" is that key's value (as text)."""
    records = read_records(path, fmt)
    if not records:
        raise FtcoreError(f"{path}: no records found (the file is empty)")
    fields = dict(fields or {})
    if "messages" not in fields and "messages" not in records[0][1] and "conversations" in records[0][1]:
        fields["messages"] = "conversations"  # ShareGPT
    if schema == "auto":
        schema = detect_schema(records[0][1], fields, f"{path}:{records[0][0]}")
    examples = [to_example(rec, schema, fields, f"{path}:{line}") for line, rec in records]
    if group_field:
        for (line, rec), ex in zip(records, examples):
            if group_field not in rec:
                raise FtcoreError(f"{path}:{line}: no field {group_field!r} (data.group_field); available keys: "
                                  f"{', '.join(map(str, rec))}")  # fmt: skip
            ex["group"] = str(rec[group_field])
    return examples


def read_records(path: Path, fmt: str = "auto") -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSONL, JSON (a list of objects) or CSV file."""
    path = Path(path)
    if fmt == "auto":
        fmt = SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise FtcoreError(f"{path}: cannot tell the format from the suffix; set data.format to jsonl, json or csv")
    text = read_utf8(path)
    if fmt == "jsonl":
        return _read_jsonl(path, io.StringIO(text, newline=""))
    if fmt == "csv":
        return _read_csv(path, io.StringIO(text, newline=""))
    return _read_json(path, text)


class NonFiniteNumber(ValueError):
    pass


def _no_constant(name: str):
    raise NonFiniteNumber(name)


def loads(text: str):
    """json.loads without NaN/Infinity (not JSON; a record holding one would train on the text "NaN")."""
    return json.loads(text, parse_constant=_no_constant)


def _read_jsonl(path, f) -> list[tuple[int, dict]]:
    records = []
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            rec = loads(line)
        except NonFiniteNumber as e:
            raise FtcoreError(f"{path}:{line_no}: {e} is not a JSON number; expected finite numbers or text") from None
        except json.JSONDecodeError as e:
            raise FtcoreError(f"{path}:{line_no}: malformed JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise FtcoreError(f"{path}:{line_no}: expected a JSON object per line, got {type(rec).__name__}")
        records.append((line_no, rec))
    return records


def _read_json(path, text: str) -> list[tuple[int, dict]]:
    try:
        data = loads(text)
    except NonFiniteNumber as e:
        raise FtcoreError(f"{path}: {e} is not a JSON number; expected finite numbers or text") from None
    except json.JSONDecodeError as e:
        raise FtcoreError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict):  # {"data": [...]}: one list inside an object
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise FtcoreError(f"{path}: expected a list of records or an object holding one list; keys: {', '.join(data)}")
        data, lines = data[lists[0]], None
    elif isinstance(data, list):
        lines = _array_lines(text)
    else:
        raise FtcoreError(f"{path}: expected a list of records, got {type(data).__name__}")
    records = []
    for i, rec in enumerate(data):
        line = lines[i] if lines else f"record {i}"
        if not isinstance(rec, dict):
            raise FtcoreError(f"{path}:{line}: expected a JSON object per record, got {type(rec).__name__}")
        records.append((line, rec))
    return records


def _array_lines(text: str) -> list[int]:
    """Line number where each element of a top-level JSON array starts (for error messages)."""
    decoder, sep = json.JSONDecoder(), re.compile(r"[\s,]*")
    i, line, last, lines = text.index("[") + 1, 1, 0, []
    while True:
        i = sep.match(text, i).end()
        if text[i] == "]":
            return lines
        line, last = line + text.count("\n", last, i), i
        lines.append(line)
        _, i = decoder.raw_decode(text, i)


def _read_csv(path, f) -> list[tuple[int, dict]]:
    reader = csv.DictReader(f, strict=True)
    records, start = [], 2
    try:
        for row in reader:
            if None in row or None in row.values():
                more = "more" if None in row else "fewer"
                raise FtcoreError(
                    f"{path}:{start}: row has {more} fields than the header's {len(reader.fieldnames)} "
                    f"({', '.join(reader.fieldnames)})"
                )
            records.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise FtcoreError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return records


def detect_schema(record: dict, fields: dict, where: str) -> str:
    has = lambda name: fields.get(name, name) in record
    if has("messages"):
        return "chat"
    if has("instruction") and has("output"):
        return "instruction"
    if has("prompt") and has("completion"):
        return "pair"
    raise FtcoreError(
        f"{where}: cannot tell the record type: expected 'messages', 'instruction'+'output' or "
        f"'prompt'+'completion' (available keys: {', '.join(record)}); map them with data.fields"
    )


def to_example(record: dict, schema: str, fields: dict, where: str) -> dict:
    """One record -> {"messages": [...], "where": where}."""
    key = lambda name: fields.get(name, name)

    def get(name, required=True):
        if key(name) not in record:
            if not required:
                return ""
            # a new key of the data.fields mapping needs Hydra's `+`; an existing one is overridden without it
            hint = f"+data.fields.{name}=<key>" if name not in fields else f"data.fields.{name} (now {fields[name]!r})"
            raise FtcoreError(
                f"{where}: missing field {key(name)!r} for {schema} records (available keys: "
                f"{', '.join(map(str, record))}); set {hint}"
            )
        return record[key(name)]

    if schema == "chat":
        raw = get("messages")
        if isinstance(raw, str):  # e.g. a CSV column holding JSON
            try:
                raw = loads(raw)
            except ValueError:  # malformed, or NaN/Infinity
                raise FtcoreError(f"{where}: field {key('messages')!r} is a string that is not a JSON list") from None
        if not isinstance(raw, list) or not raw:
            raise FtcoreError(f"{where}: field {key('messages')!r}: expected a non-empty list of messages")
        messages = [_message(m, where, i) for i, m in enumerate(raw)]
        if not any(m["role"] == "assistant" for m in messages):
            raise FtcoreError(f"{where}: the conversation has no assistant message (nothing to learn)")
    else:
        if schema == "pair":
            user, answer = _text(get("prompt"), where, key("prompt")), _text(get("completion"), where, key("completion"))
        else:
            user = _text(get("instruction"), where, key("instruction"))
            extra = _text(get("input", required=False), where, key("input"))
            user = f"{user}\n\n{extra}" if extra.strip() else user
            answer = _text(get("output"), where, key("output"))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        system = _text(get("system", required=False), where, key("system"))
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "where": where}


def _message(m, where: str, i: int) -> dict:
    if not isinstance(m, dict):
        raise FtcoreError(f"{where}: message {i}: expected an object with role and content, got {type(m).__name__}")
    role = m.get("role", m.get("from"))
    if not isinstance(role, str) or role not in ROLES:
        raise FtcoreError(
            f"{where}: message {i}: role {role!r}: expected one of {', '.join(ROLES)} "
            f"(available keys: {', '.join(map(str, m))})"
        )
    content = m.get("content", m.get("value", ""))
    return {"role": ROLES[role], "content": _text(content, where, f"message {i} content")}


def _text(value, where: str, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool)):
        return value if isinstance(value, str) else json.dumps(value)
    raise FtcoreError(f"{where}: field {name!r}: expected text, got {type(value).__name__}")
