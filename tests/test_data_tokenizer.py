"""The data pipeline with the real tokenizer (the imported SmolLM2's): skipped where it is not available."""

import pytest

from ftcore.data import DataConfig, build_datasets, encode_example, encode_prompt, split_prompt
from ftcore.data.format import IGNORE

tokenizer_module = pytest.importorskip("ftcore.formats.tokenizer")


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return tokenizer_module.Tokenizer.from_dir(smollm2_dir)


def test_chat_segments_tokenize_like_the_whole_text(smol_tok):
    tok = smol_tok
    msgs = [{"role": "user", "content": "Tom has 3 apples and gets 4 more. How many?"},
            {"role": "assistant", "content": "7"}, {"role": "user", "content": "And 2 more?"},
            {"role": "assistant", "content": "9"}]  # fmt: skip
    enc = encode_example(msgs, "chat", tok)
    assert enc["input_ids"] == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    learned = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tok.decode(learned, skip_special_tokens=False) == "7<|im_end|>9<|im_end|>"
    prompt, reference = split_prompt(msgs)
    assert encode_prompt(prompt, "chat", tok) == tok.encode(tok.apply_chat_template(prompt))
    assert reference == "9"


def test_demo_arithmetic_with_smollm2(smol_tok, tmp_path):
    cfg = DataConfig(path="arithmetic", cache_dir=str(tmp_path), system_prompt="Reply with the number only.",
                     max_length=256)  # fmt: skip
    splits, report = build_datasets(cfg, smol_tok)
    assert report["tokenize"]["train"]["removed_over_max_length"] == 0
    assert report["tokenize"]["train"]["max_tokens"] < 80  # short prompts for a CPU demo
    ex = splits["train"][0]
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert smol_tok.decode(learned, skip_special_tokens=False) == ex["messages"][-1]["content"] + "<|im_end|>"
    again, report2 = build_datasets(cfg, smol_tok)
    assert report2["cache"]["hit"] and again == splits
