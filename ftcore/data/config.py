"""DataConfig: every data setting as one typed, validated dataclass (conf/data/*.yaml mirrors it).

A wrong key or value fails with the key's name and what was expected, e.g.
`data.template='alpaca': expected one of plain, instruction, chat`.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ftcore.data.tasks import TASKS
from ftcore.errors import FtcoreError
from ftcore.schema import build

DEMO_DIR = Path(__file__).parent / "demo"
DEMOS = {"arithmetic": "arithmetic.jsonl", "tickets": "tickets.jsonl", "rewrite": "rewrite.jsonl"}
REPO_ROOT = Path(__file__).resolve().parents[2]

FORMATS = ("auto", "jsonl", "json", "csv")
SCHEMAS = ("auto", "pair", "instruction", "chat")
FIELD_NAMES = ("prompt", "completion", "instruction", "input", "output", "messages", "system")
TEMPLATES = ("plain", "instruction", "chat")
LOSS_ON = ("assistant", "response", "all")
SPLIT_BY = ("example", "prompt")
SPLIT_NAMES = ("train", "validation", "test")
METRICS = ("", "accuracy", "f1", "rouge", "bleu", "exact_match")


@dataclass
class CleanConfig:
    """Each cleaning step is a switch; the run's report counts what each one changed or removed."""

    strip_html: bool = True  # drop HTML tags and comments, then unescape entities (&amp; -> &)
    normalize_unicode: bool = True  # Unicode NFKC
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space; 3+ newlines -> 2; strip ends
    dedup: bool = True  # drop exact duplicates (all messages equal after cleaning), keep the first
    drop_empty: bool = True  # drop examples with an empty user or assistant message
    max_chars: int = 0  # drop examples longer than this many characters in total (0 = no limit)


@dataclass
class DataConfig:
    # --- source ---------------------------------------------------------------------------
    path: str = "arithmetic"  # a .jsonl/.json/.csv file, or a demo name: arithmetic, tickets, rewrite
    format: str = "auto"  # auto (from the suffix) | jsonl | json | csv
    val_path: str = ""  # optional separate validation file (then not split off `path`)
    test_path: str = ""  # optional separate test file
    schema: str = "auto"  # auto | pair (prompt/completion) | instruction (instruction/input/output) | chat
    fields: dict = field(default_factory=dict)  # our name -> the file's key, e.g. {prompt: question}
    system_prompt: str = ""  # prepended as a system message to records that have none
    # --- cleaning -------------------------------------------------------------------------
    clean: CleanConfig = field(default_factory=CleanConfig)
    # --- formatting -----------------------------------------------------------------------
    template: str = "chat"  # plain | instruction (Alpaca-style) | chat (the tokenizer's chat template)
    loss_on: str = "assistant"  # assistant (every assistant turn) | response (last turn only) | all
    max_length: int = 1024  # drop tokenized examples longer than this
    # --- split ----------------------------------------------------------------------------
    split: list = field(default_factory=lambda: [0.70, 0.15, 0.15])  # train, validation, test
    split_by: str = "example"  # hash the whole example, or only its prompt (same prompt -> same split)
    seed: int = 0  # split and sampler seed
    # --- batching -------------------------------------------------------------------------
    packing: bool = False  # pack documents into rows of seq_len (attention never crosses documents)
    seq_len: int = 1024  # packed row length; also the fixed length when static_shape
    bucketing: bool = True  # padding mode: batch examples of similar length together
    static_shape: bool = False  # every batch is [batch_size, seq_len] (CUDA graphs)
    cache_dir: str = "~/.cache/ftcore/data"  # tokenized-data cache; "" disables
    # --- task (evaluation) -----------------------------------------------------------------
    task: str = "text"  # answer extraction: arithmetic | tickets | rewrite | number | label | text
    metric: str = ""  # accuracy | f1 | rouge | bleu | exact_match; "" = the task's default
    labels: list = field(default_factory=list)  # class names for task=label

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "data") -> "DataConfig":
        """Build from YAML values (dicts or OmegaConf containers); unknown keys fail naming the allowed ones."""
        return build(cls, d, f"{where}.").validate(where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, where: str = "data") -> "DataConfig":
        _check_types(self, where)
        _check_types(self.clean, f"{where}.clean")
        _one_of(where, "format", self.format, FORMATS)
        _one_of(where, "schema", self.schema, SCHEMAS)
        _one_of(where, "template", self.template, TEMPLATES)
        _one_of(where, "loss_on", self.loss_on, LOSS_ON)
        _one_of(where, "split_by", self.split_by, SPLIT_BY)
        _one_of(where, "metric", self.metric, METRICS)
        for key, value in self.fields.items():
            if key not in FIELD_NAMES:
                raise FtcoreError(f"{where}.fields.{key}: unknown name; allowed: {', '.join(FIELD_NAMES)}")
            if not isinstance(value, str) or not value:
                raise FtcoreError(f"{where}.fields.{key}={value!r}: expected the file's field name (a string)")
        if not self.path:
            raise FtcoreError(f"{where}.path is empty: expected a data file or a demo name ({', '.join(DEMOS)})")
        if len(self.split) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in self.split):
            raise FtcoreError(f"{where}.split={self.split!r}: expected three fractions >= 0 (train, validation, test)")
        if abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0:
            raise FtcoreError(f"{where}.split={self.split!r}: expected fractions summing to 1 with train > 0")
        for key in ("max_length", "seq_len"):
            if getattr(self, key) < 1:
                raise FtcoreError(f"{where}.{key}={getattr(self, key)}: expected a positive number of tokens")
        if self.clean.max_chars < 0:
            raise FtcoreError(f"{where}.clean.max_chars={self.clean.max_chars}: expected >= 0 (0 = no limit)")
        if (self.packing or self.static_shape) and self.max_length > self.seq_len:
            mode = "packing" if self.packing else "static_shape"
            raise FtcoreError(
                f"{where}.max_length={self.max_length} > {where}.seq_len={self.seq_len}: "
                f"with {mode} every example must fit in one row; lower max_length or raise seq_len"
            )
        _one_of(where, "task", self.task, tuple(TASKS))
        return self


def resolve_path(path: str, key: str = "data.path") -> Path:
    """A demo name -> its packaged file; a relative path is tried from the cwd, then from the repo root."""
    if path in DEMOS:
        return DEMO_DIR / DEMOS[path]
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p  # NOTE: lets conf/data/*.yaml name the committed demo files from any cwd
    if not p.is_file():
        raise FtcoreError(f"{key}={path!r}: no such file (expected a .jsonl/.json/.csv file or one of {', '.join(DEMOS)})")
    return p


def _check_types(obj, where: str):
    for f in dataclasses.fields(obj):
        value, default = getattr(obj, f.name), f.default
        if default is dataclasses.MISSING:
            default = f.default_factory()
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if expected is list and isinstance(value, Sequence) and not isinstance(value, str):
            setattr(obj, f.name, list(value))
            continue
        if expected is dict and isinstance(value, Mapping):
            setattr(obj, f.name, dict(value))
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise FtcoreError(f"{where}.{f.name}={value!r}: expected {expected.__name__}")


def _one_of(where: str, key: str, value, allowed: tuple):
    if value not in allowed:
        shown = ", ".join(a if a else "''" for a in allowed)
        raise FtcoreError(f"{where}.{key}={value!r}: expected one of {shown}")
