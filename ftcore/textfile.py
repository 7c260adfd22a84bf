"""Text and JSON files read with one-line errors: UTF-8 expected (a BOM allowed), the file and line named."""

import json
from pathlib import Path

from ftcore.errors import FtcoreError


def read_utf8(path) -> str:
    """The file's text; not UTF-8 fails naming the line and the byte (UTF-16 named as such)."""
    data = Path(path).read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise FtcoreError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); expected UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise FtcoreError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8; "
                          "expected UTF-8 text (re-save the file as UTF-8)") from None


def read_json_object(path) -> dict:
    """A JSON file holding one object (config.json, adapter_config.json, tokenizer_config.json)."""
    try:
        value = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise FtcoreError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(value, dict):
        raise FtcoreError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
