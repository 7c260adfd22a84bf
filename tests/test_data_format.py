"""Templates and label masks: loss on responses / assistant turns / everything; prompts match training."""

import pytest
from test_data_common import FakeTokenizer

from ftcore.data.format import IGNORE, encode_example, encode_prompt, segments, split_prompt
from ftcore.errors import FtcoreError

TOK = FakeTokenizer()
SINGLE = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "5"},
]


def learned(enc, tok=TOK):
    """The labeled spans, decoded with special tokens."""
    spans, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return spans + ([tok.decode(cur, skip_special_tokens=False)] if cur else [])


def full_text(enc):
    return TOK.decode(enc["input_ids"], skip_special_tokens=False)


def test_chat_single_turn_learns_answer_and_end_of_turn_only():
    enc = encode_example(SINGLE, "chat", TOK)
    assert full_text(enc) == "<s><|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert learned(enc) == ["5<|im_end|>"]
    assert len(enc["input_ids"]) == len(enc["labels"])


def test_chat_multi_turn_assistant_response_all():
    assert learned(encode_example(MULTI, "chat", TOK, "assistant")) == ["Hello<|im_end|>", "5<|im_end|>"]
    assert learned(encode_example(MULTI, "chat", TOK, "response")) == ["5<|im_end|>"]
    enc = encode_example(MULTI, "chat", TOK, "all")
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"] == encode_example(MULTI, "chat", TOK, "assistant")["input_ids"]


def test_plain_and_instruction_templates_append_eos_to_answers():
    enc = encode_example(MULTI, "plain", TOK)
    assert full_text(enc) == "<s>Be brief.\n\nHi\nHello</s>\n2+3?\n5</s>"
    assert learned(enc) == ["Hello</s>", "5</s>"]
    enc = encode_example(SINGLE, "instruction", TOK)
    assert full_text(enc) == "<s>### Instruction:\n2+3?\n\n### Response:\n5</s>"
    assert learned(enc) == ["5</s>"]


@pytest.mark.parametrize("template", ["plain", "instruction", "chat"])
def test_prompt_tokens_equal_the_training_prefix(template):
    prompt, reference = split_prompt(MULTI)
    assert reference == "5" and prompt == MULTI[:-1]
    ids = encode_prompt(prompt, template, TOK)
    enc = encode_example(MULTI, template, TOK, "response")
    first_learned = next(i for i, lab in enumerate(enc["labels"]) if lab != IGNORE)
    assert ids == enc["input_ids"][:first_learned]


def test_bos_not_doubled_when_the_template_writes_it():
    tok = FakeTokenizer(template="llama3")
    enc = encode_example(SINGLE, "chat", tok)
    assert enc["input_ids"][:2] == [tok.bos_id, 259] and enc["input_ids"].count(tok.bos_id) == 1
    tok = FakeTokenizer(add_bos=False)  # a tokenizer that adds no BOS gets none
    assert encode_example(SINGLE, "plain", tok)["input_ids"][0] == ord("2")


def test_template_without_prefix_property_fails_clearly_unless_loss_on_all():
    tok = FakeTokenizer(template="last_differs")
    with pytest.raises(FtcoreError, match=r"^d.jsonl:3: rendering the conversation up to message \d+ does not extend"):
        encode_example(SINGLE, "chat", tok, where="d.jsonl:3")
    enc = encode_example(SINGLE, "chat", tok, "all")
    assert full_text(enc).endswith("[assistant] 5")


def test_segments_merge_prompt_text():
    segs = segments(SINGLE, "chat", TOK)
    assert [turn for _, turn in segs] == [None, 1, None]
