"""The one dict -> dataclass builder, and the value-check helpers every config's __post_init__ uses.

`build` checks types: unknown keys fail naming the full dotted key and the allowed ones; wrong value
types fail naming the key, the value and the expected type. Nested dataclass fields recurse. Values may
be plain dicts/lists or OmegaConf containers (any Mapping / Sequence). Values (ranges, choices) are the
dataclasses' own job, in __post_init__, with one message style:

    data.template='alpaca': expected one of plain, instruction, chat
"""

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence

from ftcore.errors import FtcoreError


def build(cls, values: Mapping | None, prefix: str = ""):
    """cls(**values) with dotted-key errors for unknown keys and wrong types; missing keys take their defaults."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise FtcoreError(f"{prefix}{unknown[0]}: unknown key; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: convert(v, hints[name], f"{prefix}{name}") for name, v in values.items()}
    return cls(**kwargs)  # __post_init__ checks the values


def convert(value, hint, key: str):
    """Check/convert one value against a type hint: int, float, str, bool, list[X], tuple, dict[K, V], X | None,
    a dataclass, Any."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for opt in (a for a in args if a is not type(None)):
            try:
                return convert(value, opt, key)
            except FtcoreError as e:
                errors.append(str(e))
        inner = [e for e in errors if not e.startswith(f"{key}=")]  # the value's shape fit, an item did not
        if inner:
            raise FtcoreError(inner[0])
        raise FtcoreError(f"{key}={value!r}: expected {' or '.join(_name(a) for a in args)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise FtcoreError(f"{key}={value!r}: expected a mapping")
        return build(hint, value, key + ".")
    base = origin or hint
    if base is typing.Any:
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise FtcoreError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if base is str and isinstance(value, str):
        return value
    if base in (list, tuple) and isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        item = args[0] if args else typing.Any  # list[X] and tuple[X, ...]
        return base(convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if base is dict and isinstance(value, Mapping):
        kt, vt = args or (typing.Any, typing.Any)
        return {convert(k, kt, key): convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if base not in (bool, int, float, str, list, tuple, dict):
        return value  # a hint the builder does not check
    raise FtcoreError(f"{key}={value!r}: expected {_name(base)}")


def check_types(values: Mapping, hints: dict, where) -> None:
    """The keys of a JSON file we read (config.json, adapter_config.json) checked against their types:
    `<file>: hidden_size='64': expected int`. Absent keys are not checked (their readers default them)."""
    for key, hint in hints.items():
        if key in values:
            convert(values[key], hint, f"{where}: {key}")


def _name(t) -> str:
    if t is type(None):
        return "null"
    return getattr(typing.get_origin(t) or t, "__name__", str(t))


def declared(cls) -> dict:
    """The declared field defaults of a dataclass tree as plain dicts and lists, before __post_init__ runs.

    Fields whose default None means "derived in __post_init__" stay None, so a config that sets the
    deciding field (e.g. data.path) later still gets the derived values (the Hydra base of scripts/).
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = declared(hints[f.name])
            continue
        value = f.default_factory() if f.default is dataclasses.MISSING else copy.deepcopy(f.default)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def invalid(key: str, value, expected: str) -> FtcoreError:
    """The one error style for a bad value: `key=value: expected ...`."""
    return FtcoreError(f"{key}={value!r}: expected {expected}")


def one_of(key: str, value, allowed):
    """Raise unless value is one of allowed: `data.template='alpaca': expected one of plain, instruction, chat`."""
    if value not in allowed:
        raise invalid(key, value, "one of " + ", ".join(repr(a) if a == "" else str(a) for a in allowed))
