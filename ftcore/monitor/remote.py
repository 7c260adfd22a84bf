"""A served model as a generate() function: scripts/monitor.py --url scores an adapter through scripts/serve.py.

    gen = served_generate("http://127.0.0.1:8000", "math", api_key="")
    new_ids = gen(None, [prompt_ids, ...], max_new_tokens, stop_ids=..., pad_id=...)   # like generate()

Each prompt goes as its token ids to POST /v1/completions (greedy, `return_token_ids`), several at once so the
server can batch them; the answer is the generated token ids, as generate() returns them (the server stops at
the model's stop tokens). Standard library HTTP only.
"""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ftcore.errors import FtcoreError


def post_json(url: str, body: dict, api_key: str = "", timeout: float = 600) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise FtcoreError(f"{url}: HTTP {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FtcoreError(f"{url}: cannot reach the server ({getattr(e, 'reason', e)})") from None


def served_generate(base_url: str, model: str, api_key: str = "", concurrency: int = 8):
    """generate()'s signature over the server's /v1/completions (the model argument is ignored)."""
    url = base_url.rstrip("/") + "/v1/completions"

    def one(prompt: list[int], max_new_tokens: int) -> list[int]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0,
                "return_token_ids": True}  # fmt: skip
        return post_json(url, body, api_key)["choices"][0]["token_ids"]

    def gen(_model, prompts: list[list[int]], max_new_tokens: int, **_ignored) -> list[list[int]]:
        with ThreadPoolExecutor(min(concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: one(p, max_new_tokens), prompts))

    return gen
