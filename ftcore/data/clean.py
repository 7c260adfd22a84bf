"""Cleaning: switchable steps over every message's text, each counted in a report saved with the run.

    strip_html -> normalize_unicode -> collapse_whitespace   (counts: examples changed)
    drop_empty -> max_chars -> dedup                          (counts: examples removed)
"""

import html
import json
import re
import unicodedata

from ftcore.data.config import CleanConfig

# Tags look like <p>, </div>, <br/>, <a href="...">: a letter right after '<', so "3 < 5 and 7 > 2" survives.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_BLOCK_TAG = re.compile(r"</?(?:p|div|br|li|ul|ol|tr|h[1-6]|blockquote|pre|table)\b[^<>]*>", re.IGNORECASE)
_DROPPED = re.compile(r"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_NEWLINES = re.compile(r"\n{3,}")


def strip_html(text: str) -> str:
    """Drop comments, scripts/styles and tags (block tags become newlines), then unescape entities."""
    text = _DROPPED.sub("", text)
    text = _BLOCK_TAG.sub("\n", text)
    return html.unescape(_TAG.sub("", text))


def normalize_unicode(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def collapse_whitespace(text: str) -> str:
    """Runs of spaces/tabs -> one space, no spaces around newlines, at most one blank line, strip ends."""
    text = _SPACES.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r" ?\n ?", "\n", text)
    return _NEWLINES.sub("\n\n", text).strip()


TEXT_STEPS = (("strip_html", strip_html), ("normalize_unicode", normalize_unicode),
              ("collapse_whitespace", collapse_whitespace))  # fmt: skip


def content_key(messages: list[dict]) -> str:
    """Canonical text of a conversation (for duplicates and the split hash)."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))


def clean_examples(examples: list[dict], cfg: CleanConfig) -> tuple[list[dict], dict]:
    """Apply the enabled steps in order; return the kept examples and a report of what each step did."""
    report = {"input": len(examples)}
    for name, fn in TEXT_STEPS:
        if not getattr(cfg, name):
            continue
        cleaned = [{**ex, "messages": [{**m, "content": fn(m["content"])} for m in ex["messages"]]} for ex in examples]
        report[f"{name}_changed"] = sum(a["messages"] != b["messages"] for a, b in zip(cleaned, examples))
        examples = cleaned
    if cfg.drop_empty:
        kept = [ex for ex in examples if all(m["content"].strip() or m["role"] == "system" for m in ex["messages"])]
        report["removed_empty"] = len(examples) - len(kept)
        # an empty system message carries nothing: drop it, keep the example
        examples = [{**ex, "messages": [m for m in ex["messages"] if m["content"].strip()]} for ex in kept]
    if cfg.max_chars:
        kept = [ex for ex in examples if sum(len(m["content"]) for m in ex["messages"]) <= cfg.max_chars]
        report["removed_over_max_chars"], examples = len(examples) - len(kept), kept
    if cfg.dedup:
        seen, kept = set(), []
        for ex in examples:
            key = content_key(ex["messages"])
            if key not in seen:
                seen.add(key)
                kept.append(ex)
        report["removed_duplicates"], examples = len(examples) - len(kept), kept
    report["output"] = len(examples)
    return examples, report
