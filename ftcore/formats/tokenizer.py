"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template of an HF model dir.

Reads tokenizer.json, tokenizer_config.json, and (if present) special_tokens_map.json,
chat_template.jinja and generation_config.json. Chat templates are rendered with jinja2 exactly
as transformers does (sandboxed, trim_blocks/lstrip_blocks, `raise_exception`, `tojson`), so a
prompt formatted here tokenizes to the same ids the model saw in training.
"""

import json
import shutil
from datetime import datetime
from pathlib import Path

from ftcore.errors import FtcoreError
from ftcore.schema import check_types
from ftcore.textfile import read_json_object, read_utf8

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
CONFIG_TYPES = {**dict.fromkeys(_SPECIAL, str | dict | None), "add_bos_token": bool | None,
                "chat_template": str | list[dict] | None}  # tokenizer_config.json, special_tokens_map.json
GENERATION_TYPES = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), int | list[int] | None)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return read_json_object(path)


def _content(value):
    """A special token given as "<s>" or as {"content": "<s>", ...} -> "<s>" (None stays None)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    """Compile a chat template in transformers' jinja environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class Tokenizer:
    """Encode/decode text and format chats for one model directory."""

    def __init__(self, tok, config: dict, generation_config: dict | None = None, path: Path | None = None,
                 chat_template: str | None = None):
        self.tok, self.config, self.path = tok, config, path
        self.generation_config = generation_config or {}
        self.special_tokens = {k: _content(config.get(k)) for k in _SPECIAL if _content(config.get(k)) is not None}
        self.add_bos = bool(config.get("add_bos_token", False))
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        self.chat_template = template
        self._compiled = None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        import tokenizers

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FtcoreError(f"{tj}: tokenizer.json not found (expected an HF tokenizer directory)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise FtcoreError(f"{tj}: cannot read tokenizer ({str(e).splitlines()[0] if str(e) else e!r})") from None
        config = _read_json(path / "tokenizer_config.json")
        check_types(config, CONFIG_TYPES, path / "tokenizer_config.json")
        special = _read_json(path / "special_tokens_map.json")
        check_types(special, CONFIG_TYPES, path / "special_tokens_map.json")
        for key, value in special.items():
            config.setdefault(key, value)  # tokenizer_config.json wins, as in transformers
        for key in _SPECIAL:
            if not isinstance(_content(config.get(key)), str | None):
                raise FtcoreError(f"{path}: {key}={config[key]!r}: expected a token string or {{'content': ...}}")
        generation = _read_json(path / "generation_config.json")
        check_types(generation, GENERATION_TYPES, path / "generation_config.json")
        jinja = path / "chat_template.jinja"
        template = read_utf8(jinja) if jinja.is_file() else None
        return cls(tok, config, generation, path, template)

    def _id(self, key: str) -> int | None:
        token = self.special_tokens.get(f"{key}_token")
        if token is not None and self.tok.token_to_id(token) is not None:
            return self.tok.token_to_id(token)
        fallback = self.generation_config.get(f"{key}_token_id")
        if isinstance(fallback, list):  # generation_config.json may list several (the first is the token)
            return fallback[0] if fallback else None
        return fallback

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos")

    @property
    def pad_id(self) -> int | None:
        """The pad token, or eos when the model has none (padding is masked out anyway)."""
        pad = self._id("pad")
        return self.eos_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end generation: eos plus generation_config.json's eos_token_id(s)."""
        extra = self.generation_config.get("eos_token_id")
        ids = {self.eos_id, *(extra if isinstance(extra, list) else [extra])}
        return {int(i) for i in ids if i is not None}

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids. BOS per config by default."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise FtcoreError(f"{self.path}: add_bos requested but the tokenizer has no bos_token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template to a prompt string."""
        import jinja2

        if not self.chat_template:
            raise FtcoreError(f"{self.path}: the tokenizer has no chat_template "
                              "(tokenizer_config.json or chat_template.jinja); format prompts yourself")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise FtcoreError(f"{self.path}: chat template failed: {e}") from None

    def save(self, out_dir) -> Path:
        """Copy the tokenizer files into `out_dir` (next to saved weights or adapters)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path is None:
            raise FtcoreError("Tokenizer.save: this tokenizer was not loaded from a directory")
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file() and (self.path / name).resolve() != (out_dir / name).resolve():
                shutil.copyfile(self.path / name, out_dir / name)
        return out_dir
