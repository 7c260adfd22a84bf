"""OpenAI request bodies -> validated settings, and the response bodies (chat.completion, text_completion).

Every problem is an ApiError: an HTTP status and a message naming the field (OpenAI's error object,
{"error": {"message", "type", "param", "code"}}). Supported: model, messages | prompt (text or token ids), max_tokens
(max_completion_tokens), temperature, top_p, stop, seed, stream, n=1, and ftcore's `return_token_ids`
(each choice then carries the generated token ids), stream_options.include_usage. Options ftcore cannot honour
(n > 1, logprobs, penalties, tools, a response_format other than text) are refused rather than ignored; others
(user, metadata, ...) are ignored. A temperature under GREEDY_BELOW is greedy.
"""

import random
import time
import uuid
from dataclasses import dataclass

UNSUPPORTED = {"n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "function_call": (None, "none"), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, ""), "response_format": (None, {"type": "text"})}  # fmt: skip
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
GREEDY_BELOW = 1e-4  # a temperature under this is greedy (dividing logits by it would overflow)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Settings:
    model: str
    messages: list[dict] | None  # chat: rendered with the served model's chat template
    prompt: str | list[int] | None  # completions: the text fed as is, or token ids
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    return_token_ids: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{key}': expected {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}': expected a value in [{low:g}, {high:g}], got {value!r}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}': expected true or false, got {value!r}", key)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, f"'stop': expected a non-empty string or a list of at most 4, got {stop!r}", "stop")
    return tuple(stops)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages': required (a list of {role, content} objects)", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"'messages': expected a non-empty list, got {type(messages).__name__}", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text"
                                             and isinstance(c.get("text"), str) for c in content):  # fmt: skip
            content = "".join(c["text"] for c in content)  # text parts; images and audio are not supported
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"'messages[{i}]': expected {{\"role\": one of {', '.join(ROLES)}, \"content\": a "
                                f"string or text parts}}, got {m!r}"[:300], f"messages[{i}]")  # fmt: skip
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompt(body: dict) -> str | list[int]:
    """A string, a list of one string, or (as OpenAI allows) a list of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt': required (a string or a list of token ids)", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"'prompt': expected a non-empty string, got {prompt!r}"[:300], "prompt")
    return prompt


def parse(body, chat: bool) -> Settings:
    """Validate a request body (chat: messages, else prompt)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body: expected a JSON object, got {type(body).__name__}")
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise ApiError(400, f"'{key}': not supported by this server (got {body[key]!r})", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model': expected a string, got {model!r}", "model")
    messages, prompt = (_messages(body), None) if chat else (None, _prompt(body))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 1, float("inf"), integer=True)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p': expected a value in (0, 1], got 0", "top_p")
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    if temperature > 0 and seed is None:
        seed = random.getrandbits(63)
    options = body.get("stream_options")
    valid = isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)
    if options is not None and not valid:
        raise ApiError(400, f"'stream_options': expected {{\"include_usage\": true|false}}, got {options!r}",
                       "stream_options")  # fmt: skip
    return Settings(model or "", messages, prompt, max_tokens, float(temperature), float(top_p), _stop(body), seed,
                    _flag(body, "stream"), _flag(body, "return_token_ids"),
                    bool(options and options.get("include_usage")))  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.ids),
            "total_tokens": len(job.prompt) + len(job.ids)}  # fmt: skip


def finish_reason(job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def response(job, chat: bool, rid: str, model: str, token_ids: bool) -> dict:
    if chat:
        message = {"role": "assistant", "content": job.text}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(job)}
    else:
        choice = {"index": 0, "text": job.text, "logprobs": None, "finish_reason": finish_reason(job)}
    if token_ids:
        choice["token_ids"] = list(job.ids)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(job)}  # fmt: skip


def chunk(rid: str, model: str, chat: bool, text: str | None = None, finish: str | None = None,
          first: bool = False) -> dict:  # fmt: skip
    """One server-sent event's body: a text delta, or (text None) the final chunk with finish_reason."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}  # fmt: skip
