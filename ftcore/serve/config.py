"""ServeConfig: the server's settings (scripts/serve.py's flags take their defaults from here)."""

from dataclasses import dataclass

from ftcore.errors import FtcoreError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 exposes the server (then set an API key)
    port: int = 8000
    api_key: str = ""  # "" = no auth; else every /v1 request needs `Authorization: Bearer <key>`
    max_batch: int = 8  # requests per decode batch; 1 = no batching
    max_queue: int = 64  # requests waiting beyond it are refused (429)
    batch_wait_ms: float = 2.0  # the worker waits this long for requests sent together before a batch
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128  # max_tokens when a request sets none
    max_prompt_tokens: int = 2048  # longer prompts are refused (also: prompt + max_tokens within the context)
    drift_window: int = 256  # served prompts per model the drift scores are computed over
    drift_every: int = 64  # recompute the drift scores after this many new prompts of a model
    graceful_shutdown_s: float = 30.0  # after SIGTERM, in-flight requests get this long to finish

    def __post_init__(self):
        for key in ("max_batch", "max_queue", "max_tokens_limit", "default_max_tokens", "max_prompt_tokens",
                    "drift_window", "drift_every"):  # fmt: skip
            if getattr(self, key) < 1:
                raise FtcoreError(f"--{key.replace('_', '-')}={getattr(self, key)}: expected >= 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise FtcoreError(f"--default-max-tokens={self.default_max_tokens}: expected <= --max-tokens-limit="
                              f"{self.max_tokens_limit}")  # fmt: skip
        if not 0 <= self.port < 65536:
            raise FtcoreError(f"--port={self.port}: expected 0-65535")
        if self.batch_wait_ms < 0:
            raise FtcoreError(f"--batch-wait-ms={self.batch_wait_ms}: expected >= 0")
