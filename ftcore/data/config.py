"""DataConfig: every data setting as one typed, validated dataclass.

A wrong value fails with the key's name and what was expected, e.g.
`data.template='alpaca': expected one of plain, instruction, chat`.

The demo names (arithmetic, tickets, rewrite) are presets: a field left None (not set) takes the
demo's own setting for a demo path (its schema, system prompt, lengths, task) and a generic one for any
other file, so DataConfig(path="my.jsonl") gets no demo prompt; metric and labels left None are the
task's. After construction every field holds its concrete value (NOTE: so dataclasses.replace(cfg,
path=...) keeps the values filled in for the old path).
"""

from dataclasses import dataclass, field
from pathlib import Path

from ftcore.data.tasks import TASKS
from ftcore.errors import FtcoreError
from ftcore.schema import invalid, one_of

DEMO_DIR = Path(__file__).parent / "demo"
REPO_ROOT = Path(__file__).resolve().parents[2]

FORMATS = ("auto", "jsonl", "json", "csv")
SCHEMAS = ("auto", "pair", "instruction", "chat")
FIELD_NAMES = ("prompt", "completion", "instruction", "input", "output", "messages", "system")
TEMPLATES = ("plain", "instruction", "chat")
LOSS_ON = ("assistant", "response", "all")
SPLIT_BY = ("example", "prompt")
SPLIT_NAMES = ("train", "validation", "test")
METRICS = ("", "accuracy", "f1", "rouge", "bleu", "exact_match")
AUGMENTS = ("none", "backtranslate", "paraphrase")


@dataclass(frozen=True)
class Demo:
    """A demo data set: its packaged file and the settings it is trained and scored with."""

    file: str
    schema: str
    system_prompt: str
    task: str  # also its name in ftcore.data.tasks.TASKS (metric, labels)
    max_length: int = 256  # also seq_len

    def settings(self) -> dict:
        return {"schema": self.schema, "system_prompt": self.system_prompt, "max_length": self.max_length,
                "seq_len": self.max_length, "task": self.task}  # fmt: skip


DEMOS = {
    "arithmetic": Demo("arithmetic.jsonl", "pair", "Solve the problem. Reply with the number only.", "arithmetic"),
    "tickets": Demo("tickets.jsonl", "instruction", "Reply with the label only.", "tickets"),
    "rewrite": Demo("rewrite.jsonl", "chat", "", "rewrite", max_length=384),
}
# what a field left None becomes for a file that is not a demo
GENERIC = {"schema": "auto", "system_prompt": "", "max_length": 1024, "seq_len": 1024, "task": "text"}


@dataclass
class CleanConfig:
    """Each cleaning step is a switch; the run's report counts what each one changed or removed."""

    strip_html: bool = True  # drop HTML tags and comments, then unescape entities (&amp; -> &)
    normalize_unicode: bool = True  # Unicode NFKC
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space; 3+ newlines -> 2; strip ends
    dedup: bool = True  # drop exact duplicates (all messages equal after cleaning), keep the first
    drop_empty: bool = True  # drop examples with an empty user or assistant message
    max_chars: int = 0  # drop examples longer than this many characters in total (0 = no limit)

    def __post_init__(self):
        if self.max_chars < 0:
            raise invalid("data.clean.max_chars", self.max_chars, ">= 0 (0 = no limit)")


@dataclass
class DataConfig:
    # None below: the demo's setting for a demo path, else GENERIC's (metric, labels: the task's)
    # --- source ---------------------------------------------------------------------------
    path: str = "arithmetic"  # a .jsonl/.json/.csv file, or a demo name: arithmetic, tickets, rewrite
    format: str = "auto"  # auto (from the suffix) | jsonl | json | csv
    val_path: str = ""  # optional separate validation file (then not split off `path`)
    test_path: str = ""  # optional separate test file
    schema: str | None = None  # auto | pair (prompt/completion) | instruction (instruction/input/output) | chat
    fields: dict[str, str] = field(default_factory=dict)  # our name -> the file's key, e.g. {prompt: question}
    system_prompt: str | None = None  # prepended as a system message to records that have none ("" = none)
    # --- cleaning -------------------------------------------------------------------------
    clean: CleanConfig = field(default_factory=CleanConfig)
    # --- formatting -----------------------------------------------------------------------
    template: str = "chat"  # plain | instruction (Alpaca-style) | chat (the tokenizer's chat template)
    loss_on: str = "assistant"  # assistant (every assistant turn) | response (last turn only) | all
    max_length: int | None = None  # drop tokenized examples longer than this (generic: 1024)
    # --- split ----------------------------------------------------------------------------
    split: list[float] = field(default_factory=lambda: [0.70, 0.15, 0.15])  # train, validation, test
    split_by: str = "example"  # hash the whole example, or only its prompt (same prompt -> same split)
    seed: int = 0  # split and sampler seed (also which training examples augment_fraction picks)
    # --- augmentation (training split only; ftcore/data/augment.py) ----------------------
    augment: str = "none"  # none | backtranslate (prompt -> augment_pivot -> back) | paraphrase
    augment_model: str = ""  # the model that rewrites ("" = the run's model.path)
    augment_pivot: str = "French"  # backtranslate: the language translated through
    augment_source: str = "English"  # backtranslate: the data's language (translated back into)
    augment_fraction: float = 1.0  # share of the training examples rewritten (picked by a hash seeded by seed)
    augment_length_ratio: float = 2.0  # drop a rewrite outside [1/r, r] times the prompt's length in characters
    augment_keep_numbers: bool = True  # drop a rewrite whose numbers (digit runs) differ from the prompt's
    augment_max_new_tokens: int = 256  # the most tokens one generation may write (fewer for short prompts)
    augment_batch_size: int = 16  # prompts per generate call
    # --- batching -------------------------------------------------------------------------
    packing: bool = False  # pack documents into rows of seq_len (attention never crosses documents)
    seq_len: int | None = None  # packed row length; also the fixed length when static_shape (generic: 1024)
    bucketing: bool = True  # padding mode: batch examples of similar length together
    static_shape: bool = False  # every batch is [batch_size, seq_len] (CUDA graphs)
    cache_dir: str = "~/.cache/ftcore/data"  # tokenized-data cache; "" disables
    # --- task (evaluation) -----------------------------------------------------------------
    task: str | None = None  # answer extraction: arithmetic | tickets | rewrite | number | label | text
    metric: str | None = None  # accuracy | f1 | rouge | bleu | exact_match; "" also means the task's
    labels: list[str] | None = None  # class names (task=label; tickets has its own)
    group_field: str = ""  # a record key whose value groups the test examples in report.md (e.g. a category)

    def __post_init__(self):
        demo = DEMOS.get(self.path)
        for key, value in (demo.settings() if demo else GENERIC).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        one_of("data.task", self.task, tuple(TASKS))
        if self.metric is None:
            self.metric = TASKS[self.task].metric
        if self.labels is None:
            self.labels = list(TASKS[self.task].labels)
        one_of("data.format", self.format, FORMATS)
        one_of("data.schema", self.schema, SCHEMAS)
        one_of("data.template", self.template, TEMPLATES)
        one_of("data.loss_on", self.loss_on, LOSS_ON)
        one_of("data.split_by", self.split_by, SPLIT_BY)
        one_of("data.metric", self.metric, METRICS)
        self._check_augment()
        for key, value in self.fields.items():
            if key not in FIELD_NAMES:
                raise FtcoreError(f"data.fields.{key}: unknown name; allowed: {', '.join(FIELD_NAMES)}")
            if not value:
                raise invalid(f"data.fields.{key}", value, "the file's field name")
        if not self.path:
            raise invalid("data.path", self.path, f"a data file or a demo name ({', '.join(DEMOS)})")
        if len(self.split) != 3 or any(f < 0 for f in self.split):
            raise invalid("data.split", self.split, "three fractions >= 0 (train, validation, test)")
        if abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0:
            raise invalid("data.split", self.split, "fractions summing to 1 with train > 0")
        for key in ("max_length", "seq_len"):
            if getattr(self, key) < 1:
                raise invalid(f"data.{key}", getattr(self, key), "a positive number of tokens")
        if (self.packing or self.static_shape) and self.max_length > self.seq_len:
            mode = "packing" if self.packing else "static_shape"
            raise FtcoreError(
                f"data.max_length={self.max_length} > data.seq_len={self.seq_len}: "
                f"with {mode} every example must fit in one row; lower max_length or raise seq_len"
            )

    def _check_augment(self):
        one_of("data.augment", self.augment, AUGMENTS)
        if not 0 < self.augment_fraction <= 1:
            raise invalid("data.augment_fraction", self.augment_fraction, "a fraction in (0, 1]")
        if self.augment_length_ratio < 1:
            raise invalid("data.augment_length_ratio", self.augment_length_ratio, "a ratio >= 1")
        for key in ("augment_max_new_tokens", "augment_batch_size"):
            if getattr(self, key) < 1:
                raise invalid(f"data.{key}", getattr(self, key), "a positive number")
        for key in ("augment_pivot", "augment_source"):
            if not getattr(self, key).strip():
                raise invalid(f"data.{key}", getattr(self, key), "a language name, e.g. French")
        same = self.augment_pivot.strip().lower() == self.augment_source.strip().lower()
        if self.augment == "backtranslate" and same:
            raise invalid("data.augment_pivot", self.augment_pivot, "a language other than data.augment_source")


def resolve_path(path: str, key: str = "data.path") -> Path:
    """A demo name -> its packaged file; a relative path is tried from the cwd, then from the repo root."""
    if path in DEMOS:
        return DEMO_DIR / DEMOS[path].file
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p  # NOTE: a repo-relative path (ftcore/data/demo/arithmetic.jsonl) resolves from any cwd
    if not p.is_file():
        raise FtcoreError(f"{key}={path!r}: no such file (expected a .jsonl/.json/.csv file or one of {', '.join(DEMOS)})")
    return p

