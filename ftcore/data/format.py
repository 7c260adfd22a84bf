"""Templates and tokenization with label masks (-100 where no loss is taken).

A conversation is rendered as text segments, each tokenized on its own and concatenated, so an
answer's tokens are exactly what generation produces after the prompt's tokens:

    [prompt ............][answer 0 + end][between ......][answer 1 + end][tail]
     labels -100          labels = ids     -100             labels = ids    -100   (loss_on=assistant)

Templates (the user segment ends with the lead-in, so a prompt needs no separate generation prompt):
    plain        "{system}\n\n{user}\n{answer}<eos>\n{user}\n{answer}<eos>"
    instruction  "{system}\n\n### Instruction:\n{user}\n\n### Response:\n{answer}<eos>\n\n### Instruction: ..."
    chat         the tokenizer's chat template; segments come from rendering prefixes of the
                 conversation: render(m[:i], add_generation_prompt=True) is the text before assistant
                 turn i, render(m[:i+1]) the text through its end-of-turn token (learned: the model
                 must learn to stop). Whitespace after that token is not learned.
"""

from ftcore.errors import FtcoreError

IGNORE = -100
EOS = object()  # placeholder segment for the tokenizer's eos id (plain and instruction templates)


def encode_example(messages: list[dict], template: str, tokenizer, loss_on: str = "assistant",
                   where: str = "") -> dict:  # fmt: skip
    """{"input_ids": [...], "labels": [...]} with labels = input_ids on loss tokens, -100 elsewhere."""
    if loss_on == "all" and template == "chat":  # one piece: works for any chat template
        ids = _encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False), tokenizer, True)
        return {"input_ids": ids, "labels": list(ids)}
    segs = segments(messages, template, tokenizer, where=where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, labels = [], []
    for text, turn in segs:
        piece = _encode(text, tokenizer, first=not ids)
        learn = loss_on == "all" or (turn is not None and (loss_on == "assistant" or turn == last))
        ids += piece
        labels += piece if learn else [IGNORE] * len(piece)
    return {"input_ids": ids, "labels": labels}


def add_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Prepend data.system_prompt to a conversation that has no system message of its own."""
    if not system_prompt or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation before its last assistant message, that message's text): a test example."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def encode_prompt(messages: list[dict], template: str, tokenizer) -> list[int]:
    """Token ids to generate the next assistant message from (same tokens as in training)."""
    ids = []
    for text, _ in segments(messages, template, tokenizer, add_generation_prompt=True):
        ids += _encode(text, tokenizer, first=not ids)
    return ids


def segments(messages: list[dict], template: str, tokenizer, add_generation_prompt: bool = False,
             where: str = "") -> list[tuple]:  # fmt: skip
    """[(text or EOS, assistant message index or None)], adjacent prompt text merged into one segment."""
    if template == "chat":
        segs = _chat_segments(messages, tokenizer, add_generation_prompt, where)
    else:
        segs = _text_segments(messages, template)
    merged = []
    for text, turn in segs:
        if text is EOS or not text:
            if text is EOS:
                merged.append((text, turn))
            continue
        if merged and turn is None and merged[-1][1] is None and merged[-1][0] is not EOS:
            merged[-1] = (merged[-1][0] + text, None)
        else:
            merged.append((text, turn))
    return merged


def _text_segments(messages, template):
    user_fmt = "{}\n" if template == "plain" else "### Instruction:\n{}\n\n### Response:\n"
    between = "\n" if template == "plain" else "\n\n"
    segs, after_answer = [], False
    for i, m in enumerate(messages):
        if m["role"] == "system":
            segs.append((m["content"] + "\n\n", None))
        elif m["role"] == "user":
            segs.append(((between if after_answer else "") + user_fmt.format(m["content"]), None))
        else:
            segs += [(m["content"], i), (EOS, i)]
        after_answer = m["role"] == "assistant"
    return segs


def _chat_segments(messages, tokenizer, add_generation_prompt, where):
    render = tokenizer.apply_chat_template
    segs, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1], add_generation_prompt=False)
        _check_prefix(done, before, where, i)
        _check_prefix(before, through, where, i)
        answer = through[len(before) :]
        kept = answer.rstrip()
        segs += [(before[len(done) :], None), (kept, i), (answer[len(kept) :], None)]
        done = through
    full = render(messages, add_generation_prompt=add_generation_prompt)
    _check_prefix(done, full, where, len(messages))
    segs.append((full[len(done) :], None))
    return segs


def _check_prefix(prefix: str, text: str, where: str, turn: int):
    if not text.startswith(prefix):
        raise FtcoreError(
            f"{where or 'chat template'}: rendering the conversation up to message {turn} does not extend "
            f"the rendering of the earlier messages, so assistant turns cannot be masked; use loss_on=all "
            f"or template=plain|instruction"
        )


def _encode(text, tokenizer, first: bool) -> list[int]:
    """Token ids of one segment; only the first gets the tokenizer's BOS (unless the text holds it)."""
    if text is EOS:
        if tokenizer.eos_id is None:
            raise FtcoreError("the tokenizer has no eos token; the plain and instruction templates need one")
        return [tokenizer.eos_id]
    add_bos = False
    if first:  # None: the tokenizer's own default; False where a chat template already wrote BOS
        bos = tokenizer.bos_id
        bos_text = tokenizer.decode([bos], skip_special_tokens=False) if bos is not None else ""
        add_bos = False if bos_text and text.startswith(bos_text) else None
    return list(tokenizer.encode(text, add_bos=add_bos))
