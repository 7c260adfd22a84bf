"""The server's Prometheus metrics (prometheus-client), in a registry of their own, served at GET /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ftcore_requests", "HTTP requests answered", ["endpoint", "model", "code"], registry=r)
        self.errors = Counter("ftcore_errors", "Requests answered with an error, by HTTP status", ["code"],
                              registry=r)  # fmt: skip
        self.latency = Histogram("ftcore_request_latency_seconds", "Request latency, arrival to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("ftcore_time_to_first_token_seconds", "Arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("ftcore_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("ftcore_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.tokens_per_s = Gauge("ftcore_tokens_per_second", "Generated tokens per second in the last decode step",
                                  registry=r)  # fmt: skip
        self.batch_size = Histogram("ftcore_batch_size", "Rows (requests) per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.queue_depth = Gauge("ftcore_queue_depth", "Requests waiting for a batch", registry=r)
        self.drift = Gauge("ftcore_drift_score", "Drift of served prompts against the training prompts",
                           ["model", "score"], registry=r)  # fmt: skip
        self.drift_alerts = Counter("ftcore_drift_alerts", "Drift scores found over their threshold",
                                    ["model", "score"], registry=r)  # fmt: skip

    def batch(self, size: int, tokens: int, seconds: float):
        self.batch_size.observe(size)
        if seconds > 0:
            self.tokens_per_s.set(tokens / seconds)

    def answered(self, endpoint: str, model: str, code: int, seconds: float):
        self.requests.labels(endpoint, model, str(code)).inc()
        if code >= 400:
            self.errors.labels(str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
