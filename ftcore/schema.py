"""Build typed, validated dataclasses from plain dicts (what Hydra/YAML gives us).

Unknown keys fail naming the full dotted key and the allowed ones; wrong value types fail
naming the key, the value and the expected type. Nested dataclass fields recurse. Values may
be plain dicts/lists or OmegaConf containers (any Mapping / Sequence).
"""

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence

from ftcore.errors import FtcoreError


def build(cls, values: dict | None, prefix: str = ""):
    """cls(**values) with dotted-key errors for unknown keys and wrong types."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise FtcoreError(f"{prefix}{unknown[0]}: unknown key; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: convert(v, hints[name], f"{prefix}{name}") for name, v in values.items()}
    return cls(**kwargs)  # __post_init__ validates values and names its keys


def convert(value, hint, key: str):
    """Check/convert one value against a type hint (int, float, str, bool, list, dict, X | None, dataclass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return convert(value, opt, key)
            except FtcoreError as e:
                errors.append(str(e))
        raise FtcoreError(errors[0])
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise FtcoreError(f"{key}={value!r}: expected a mapping")
        return build(hint, value, key + ".")
    base = origin or hint
    if base is typing.Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif base in (list, tuple):
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            return base(value)
    elif base is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise FtcoreError(f"{key}={value!r}: expected {getattr(base, '__name__', base)}")


def to_dict(obj) -> dict:
    """A dataclass tree as plain dicts (for saving the resolved config and W&B)."""
    return dataclasses.asdict(obj)
