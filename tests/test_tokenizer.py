"""Tokenizer: config handling on a tiny byte-level BPE dir, errors, and parity with transformers'
AutoTokenizer (encode, decode, chat templates) on the tiny dir and on the imported SmolLM2."""

import json

import pytest

from ftcore.errors import FtcoreError
from ftcore.formats.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Exercises what transformers' environment adds: trim/lstrip blocks, tojson without HTML escaping,
# loop controls, raise_exception, the special-token variables and extra kwargs.
RICH = """{{ bos_token }}
{%- if tools %}
    {{- 'Tools: ' + tools | tojson(indent=2) + '\n' }}
{%- endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'assistant' and m['content'] == 'skip me' %}{% continue %}{% endif %}
    <|im_start|>{{ m['role'] }}
    {{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def make_dir(path, config=None, generation_config=None, special_tokens_map=None, jinja=None):
    """A tiny byte-level BPE tokenizer dir: 3 special tokens, the 256 byte symbols and a few merges."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + symbols + ["Ġt", "he", "Ġthe"])}
    tok = RawTokenizer(models.BPE(vocab, [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, **(config or {})}
    for name, obj in (("tokenizer_config.json", config), ("generation_config.json", generation_config),
                      ("special_tokens_map.json", special_tokens_map)):
        if obj is not None:
            (path / name).write_text(json.dumps({k: v for k, v in obj.items() if v is not None}))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


def test_special_tokens_in_string_and_dict_forms(tmp_path):
    tok = Tokenizer.from_dir(make_dir(tmp_path, {"bos_token": {"content": "<|im_start|>", "lstrip": False},
                                                 "pad_token": {"content": "<|endoftext|>"}}))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.vocab_size == 3 + 256 + 3 and tok.stop_ids == {2}


def test_fallbacks_pad_to_eos_and_special_tokens_map(tmp_path):
    tok = Tokenizer.from_dir(make_dir(tmp_path, {"eos_token": None}, special_tokens_map={"eos_token": "<|im_end|>"},
                                      generation_config={"eos_token_id": [2, 0], "bos_token_id": 1}))
    assert tok.eos_id == 2 and tok.pad_id == 2 and tok.stop_ids == {0, 2}


def test_encode_decode_and_add_bos(tmp_path):
    tok = Tokenizer.from_dir(make_dir(tmp_path / "a"))
    ids = tok.encode(" the<|im_end|>")
    assert ids == [tok.tok.token_to_id("Ġthe"), 2]  # special-token strings map to their ids; no BOS by default
    assert tok.encode("x", add_bos=True)[0] == 1
    assert tok.decode(ids) == " the" and tok.decode(ids, skip_special_tokens=False) == " the<|im_end|>"
    bos_tok = Tokenizer.from_dir(make_dir(tmp_path / "b", {"add_bos_token": True}))
    assert bos_tok.encode("x")[0] == 1 and bos_tok.encode("x", add_bos=False)[0] != 1
    no_bos = Tokenizer.from_dir(make_dir(tmp_path / "c", {"bos_token": None}))
    with pytest.raises(FtcoreError, match="no bos_token"):
        no_bos.encode("x", add_bos=True)


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(FtcoreError, match="tokenizer.json not found") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FtcoreError, match="cannot read tokenizer") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)
    d = make_dir(tmp_path / "ok")
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(FtcoreError, match=r"tokenizer_config.json:1: invalid JSON: Expecting"):
        Tokenizer.from_dir(d)


def test_chat_template_errors_and_sources(tmp_path):
    with pytest.raises(FtcoreError, match="no chat_template"):
        Tokenizer.from_dir(make_dir(tmp_path / "none")).apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer.from_dir(make_dir(tmp_path / "rich", {"chat_template": RICH}))
    with pytest.raises(FtcoreError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    jinja = Tokenizer.from_dir(make_dir(tmp_path / "jinja", {"chat_template": RICH}, jinja="J{{ messages | length }}"))
    assert jinja.apply_chat_template([{"role": "user", "content": "hi"}]) == "J1"  # the .jinja file wins
    listed = Tokenizer.from_dir(make_dir(tmp_path / "list", {"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert listed.apply_chat_template([]) == "D"


def test_save_copies_tokenizer_files(tmp_path):
    src = make_dir(tmp_path / "src", {"chat_template": CHATML}, special_tokens_map={"pad_token": "<|endoftext|>"},
                   jinja=CHATML)
    out = Tokenizer.from_dir(src).save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"])
    again = Tokenizer.from_dir(out)
    assert again.encode("the <|im_start|>") == Tokenizer.from_dir(src).encode("the <|im_start|>")
    assert again.pad_id == 0


CONVERSATION = [
    {"role": "system", "content": "You are terse. Use <b>tags</b> & \"quotes\"."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "assistant", "content": "skip me"},
    {"role": "user", "content": "And naïve café in 日本語? 😀", "name": None},
]


def test_rich_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = make_dir(tmp_path, {"chat_template": RICH})
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    tools = [{"name": "add", "description": "a <+> b & ü", "parameters": {"a": "int"}}]
    for gen in (True, False):
        for kwargs in ({}, {"tools": tools}):
            want = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen, **kwargs)
            assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=gen, **kwargs) == want



# Templates in the turn formats of the newer families, written here with the jinja their tokenizer_config.json
# templates use (namespaces, reversed slices, string methods, `is string`, kwargs such as enable_thinking).
FAMILY_TEMPLATES = {
    # Qwen3: ChatML; an assistant turn's reasoning split off at </think> and kept only after the last user query
    "qwen3": """{%- set ns = namespace(searching=true, last_user=messages|length - 1) %}
{%- for m in messages[::-1] %}
    {%- if ns.searching and m.role == 'user' %}
        {%- set ns.searching = false %}{% set ns.last_user = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for m in messages %}
    {%- set content = m.content if m.content is string else '' %}
    {%- if m.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}
            {{- content + '<|im_end|>\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{% endif %}
{%- endif %}""",
    # Gemma 2/3: <start_of_turn>, the system turn folded into the first user turn, roles must alternate
    "gemma": """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}""",
    # Phi-3: <|role|> ... <|end|>
    "phi3": """{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"""
            """{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}{% endif %}"""
            """{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}""",
}  # fmt: skip
FAMILY_CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello"}],
]  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_family_style_templates_match_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    d = make_dir(tmp_path, {"chat_template": FAMILY_TEMPLATES[family]})
    ours, hf = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    for messages in FAMILY_CONVERSATIONS:
        for gen in (True, False):
            for kwargs in ({}, {"enable_thinking": False}):
                want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
                assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs) == want
    if family == "gemma":  # the template's own error, in one line naming the file
        with pytest.raises(FtcoreError, match="chat template failed: Conversation roles must alternate"):
            ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    if family == "qwen3":  # both branches ran: reasoning after the last query kept, before it dropped
        assert "<think>\ngreet\n</think>\n\nHello" in ours.apply_chat_template(FAMILY_CONVERSATIONS[1])
        assert "add them" not in ours.apply_chat_template(FAMILY_CONVERSATIONS[0])

# ---------------------------------------------------------------- the imported SmolLM2 tokenizer

TEXTS = [
    "Hello, world!", "   three leading spaces", " one leading space",
    "naïve café — 日本語, Ελληνικά 😀👍🏽",
    "def f(x):\n    return x**2  # square\n\n\tprint(f(3))", "3.14159 and 2024-01-01 and 1,000,000 and 12345678",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "trailing spaces   \n\n", "",
    "<|endoftext|><repo_name>x<file_sep>", "I'm sure you'll see it's DON'T",
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    return Tokenizer.from_dir(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_encode_decode_match_transformers(smol):
    ours, hf = smol
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 49152)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|im_start|>") == [1]
    assert ours.encode("2024") == [ours.tok.token_to_id(c) for c in "2024"]  # smollm pre-tokenizer: one per digit


def test_smollm2_chat_template_matches_transformers(smol):
    ours, hf = smol
    conversations = [
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Arr, hello."}, {"role": "user", "content": "Where is the treasure?"}],
        [{"role": "user", "content": "What is the capital of France?"}],  # the template adds a default system turn
    ]
    for messages in conversations:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
    prompt = ours.apply_chat_template(conversations[1])
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and "SmolLM" in prompt
