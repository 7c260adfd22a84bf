"""Shared helpers for the data tests: a byte-level fake tokenizer with a ChatML-like template.

Imported by the other tests/test_data_*.py files (`from test_data_common import FakeTokenizer`), so the
data tests do not depend on ftcore.formats.tokenizer; the checks below pin the fake's own behaviour.
"""

import json
import re

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


class FakeTokenizer:
    """ids 0-255 are UTF-8 bytes; 256+ are the special tokens, recognised in text as in HF tokenizers."""

    def __init__(self, add_bos: bool = True, template: str = "chatml"):
        self.special = {s: 256 + i for i, s in enumerate(SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 256 + len(SPECIALS)
        self.stop_ids = [258, 260]
        self.default_add_bos, self.template = add_bos, template
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def encode(self, text: str, add_bos=None) -> list[int]:
        ids = [self.bos_id] if (self.default_add_bos if add_bos is None else add_bos) else []
        for part in self._split.split(text):
            ids += [self.special[part]] if part in self.special else list(part.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(SPECIALS[i - 256])
        return "".join(out) + buf.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.template == "llama3":  # writes BOS itself, like Llama 3's template
            text = "<s>" + "".join(f"<|im_start|>{m['role']}\n\n{m['content']}<|im_end|>" for m in messages)
            return text + ("<|im_start|>assistant\n\n" if add_generation_prompt else "")
        if self.template == "last_differs":  # renders the final message differently: no prefix property
            body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages[:-1])
            last = messages[-1] if messages else None
            return body + (f"[{last['role']}] {last['content']}" if last else "")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pairs(n: int, prefix: str = "q"):
    return [{"prompt": f"{prefix} {i}: what is {i} + {i}?", "completion": str(2 * i)} for i in range(n)]


def test_fake_tokenizer_round_trip_and_specials():
    tok = FakeTokenizer()
    ids = tok.encode("<|im_start|>user\nhé<|im_end|>")
    assert ids[0] == tok.bos_id and ids[1] == 259 and ids[-1] == 260
    assert tok.decode(ids) == "user\nhé"
    assert tok.decode(ids, skip_special_tokens=False) == "<s><|im_start|>user\nhé<|im_end|>"
    assert tok.encode("ab", add_bos=False) == [97, 98]


def test_fake_chat_template_extends_prefixes():
    tok = FakeTokenizer()
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).startswith(
        tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    )
