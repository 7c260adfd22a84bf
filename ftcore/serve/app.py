"""The OpenAI-compatible HTTP API (Starlette, served by uvicorn): completions, chat, models, health, metrics.

    app = build_app(served, ServeConfig(), thresholds)      # served: models.load_served(...)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Requests are parsed and checked here (protocol.py), queued as Jobs and decoded by the worker thread
(scheduler.py); the handler awaits the job's events, which the worker hands over with call_soon_threadsafe.
Every error is a JSON body with a 4xx/5xx status; the server keeps serving. With an API key set, /v1/*
needs `Authorization: Bearer <key>` (401 otherwise); /health and /metrics stay open for probes and scrapers.
"""

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ftcore.errors import FtcoreError
from ftcore.serve.batch import Job
from ftcore.serve.config import ServeConfig
from ftcore.serve.drift import DriftTracker
from ftcore.serve.metrics import ServerMetrics
from ftcore.serve.protocol import ApiError, chunk, new_id, parse, response, usage
from ftcore.serve.scheduler import QueueFull, Scheduler, WorkerStopped

MAX_BODY_BYTES_PER_TOKEN = 64  # a body this many bytes per allowed prompt token is refused before parsing
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Server:
    def __init__(self, served, cfg: ServeConfig, thresholds: dict[str, float] | None = None):
        self.served, self.cfg = served, cfg
        self.metrics = ServerMetrics()
        self.drift = DriftTracker(served, cfg.drift_window, cfg.drift_every, thresholds or {}, self.metrics)
        self.scheduler = Scheduler(cfg.max_batch, cfg.max_queue, cfg.batch_wait_ms / 1000, self.metrics,
                                   self.drift.observe if self.drift.windows else None)  # fmt: skip

    def check_key(self, request: Request):
        if not self.cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (expected the header `Authorization: Bearer <key>`)",
                           kind="authentication_error")  # fmt: skip

    def make_job(self, body, chat: bool) -> tuple[Job, object]:
        s = parse(body, chat)
        served = self.served.by_name.get(s.model or self.served.base.name)
        if served is None:
            raise ApiError(404, f"'model': {s.model!r} is not served (GET /v1/models lists: "
                                f"{', '.join(sorted(self.served.by_name))})", "model", "not_found_error")  # fmt: skip
        tok = served.engine.tokenizer
        if isinstance(s.prompt, list):  # token ids
            ids = s.prompt
            vocab = served.engine.model.cfg.vocab_size
            if not all(0 <= t < vocab for t in ids):
                raise ApiError(400, f"'prompt': token ids must be in [0, {vocab})", "prompt")
        else:
            try:
                ids = tok.encode(tok.apply_chat_template(s.messages) if chat else s.prompt)
            except FtcoreError as e:  # e.g. a model without a chat template
                raise ApiError(400, str(e), "messages" if chat else "prompt") from None
            except (TypeError, ValueError) as e:  # e.g. a lone surrogate the tokenizer cannot take
                raise ApiError(400, f"the text cannot be tokenized: {e}", "messages" if chat else "prompt") from None
        cfg = self.cfg
        max_tokens = cfg.default_max_tokens if s.max_tokens is None else s.max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise ApiError(400, f"'max_tokens': {max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                           "max_tokens")  # fmt: skip
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "messages" if chat else "prompt")
        if len(ids) > cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                                f"{cfg.max_prompt_tokens}", "messages" if chat else "prompt")  # fmt: skip
        model = served.engine.model
        context = model.cfg.max_position_embeddings
        extra = getattr(model, "num_virtual_tokens", 0) + getattr(model.prefix_encoder, "num_virtual_tokens", 0)
        if len(ids) + extra + max_tokens > context:
            raise ApiError(400, f"the prompt's {len(ids)} tokens plus max_tokens={max_tokens} exceed the model's "
                                f"context of {context} tokens", "max_tokens")  # fmt: skip
        job = Job(ids, max_tokens, served, s.temperature, s.top_p, s.seed, s.stop)
        return job, s

    async def read_body(self, request: Request):
        """The JSON body, read up to the size limit (Content-Length first, then as it arrives)."""
        limit = MAX_BODY_BYTES_PER_TOKEN * self.cfg.max_prompt_tokens
        too_big = ApiError(413, f"the request body is over this server's limit of {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        raw = bytearray()
        try:
            async for part in request.stream():
                raw += part
                if len(raw) > limit:
                    raise too_big
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the body") from None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None

    async def complete(self, request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        t0, model_name = time.perf_counter(), ""
        try:
            self.check_key(request)
            job, s = self.make_job(await self.read_body(request), chat)
            model_name = job.served.name
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            wanted = ("delta", "done") if s.stream else ("done",)  # a non-streaming request waits for the end only

            def emit(kind, payload):
                if kind in wanted:
                    loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

            job.emit = emit
            try:
                self.scheduler.submit(job)
            except QueueFull as e:
                raise ApiError(429, str(e), kind="rate_limit_error") from None
            except WorkerStopped as e:
                raise ApiError(503, str(e), kind="server_error") from None
        except ApiError as e:
            self.metrics.answered(endpoint, model_name or "-", e.status, time.perf_counter() - t0)
            return error_response(e)
        self.metrics.prompt_tokens.labels(model_name).inc(len(job.prompt))
        rid = new_id("chatcmpl" if chat else "cmpl")
        if s.stream:
            return StreamingResponse(self.stream(job, events, rid, chat, endpoint, t0, s.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            while True:
                try:
                    await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)  # "done"
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # stop decoding for a client that went away
                        job.cancelled.set()
                        self.client_gone(job, endpoint, t0)
                        return Response(status_code=499)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        return self.finished(job, endpoint, t0, lambda: JSONResponse(response(job, chat, rid, model_name,
                                                                              s.return_token_ids)))  # fmt: skip

    def finished(self, job: Job, endpoint: str, t0: float, ok) -> Response:
        """Record a finished job's metrics; its response, or a 500 when its batch failed."""
        name = job.served.name
        if job.first_token_at is not None:
            self.metrics.ttft.observe(job.first_token_at - t0 if job.first_token_at > t0 else 0.0)
        self.metrics.generated_tokens.labels(name).inc(len(job.ids))
        if job.error is not None:
            self.metrics.answered(endpoint, name, 500, time.perf_counter() - t0)
            return error_response(ApiError(500, job.error, kind="server_error"))
        self.metrics.answered(endpoint, name, 200, time.perf_counter() - t0)
        return ok()

    def client_gone(self, job: Job, endpoint: str, t0: float):
        """Metrics of a request whose client disconnected (status 499, nginx's "client closed request")."""
        self.metrics.generated_tokens.labels(job.served.name).inc(len(job.ids))
        self.metrics.answered(endpoint, job.served.name, 499, time.perf_counter() - t0)

    async def stream(self, job: Job, events: asyncio.Queue, rid: str, chat: bool, endpoint: str, t0: float,
                     include_usage: bool = False):  # fmt: skip
        name = job.served.name

        def sse(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield sse(chunk(rid, name, chat, first=True))
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    yield sse(chunk(rid, name, chat, text=payload))
                    continue
                result = self.finished(job, endpoint, t0, lambda: None)
                if result is not None:  # the batch failed after the stream began: an error event, then the end
                    yield sse(json.loads(result.body))
                else:
                    yield sse(chunk(rid, name, chat, finish="length" if job.finish_reason == "length" else "stop"))
                    if include_usage:
                        yield sse({**chunk(rid, name, chat), "choices": [], "usage": usage(job)})
                yield "data: [DONE]\n\n"
                return
        finally:
            if job.finish_reason is None and job.error is None:  # the client disconnected mid-stream
                job.cancelled.set()
                self.client_gone(job, endpoint, t0)

    async def chat(self, request: Request):
        return await self.complete(request, chat=True)

    async def completions(self, request: Request):
        return await self.complete(request, chat=False)

    async def models(self, request: Request):
        try:
            self.check_key(request)
        except ApiError as e:
            self.metrics.answered("models", "-", e.status, 0.0)
            return error_response(e)
        data = [{"id": s.name, "object": "model", "created": 0, "owned_by": "ftcore", "method": s.method,
                 "root": self.served.base.name} for s in self.served.by_name.values()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request):
        alive = self.scheduler.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "worker stopped", "models": len(self.served.by_name),
                             "queue": len(self.scheduler.waiting)}, status_code=200 if alive else 503)  # fmt: skip

    async def prometheus(self, request: Request):
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    async def not_found(self, request: Request, exc):
        status = getattr(exc, "status_code", 404)
        message = "not found" if status == 404 else "method not allowed"
        return error_response(ApiError(status, f"{request.method} {request.url.path}: {message}"))


def build_app(served, cfg: ServeConfig, thresholds: dict[str, float] | None = None) -> Starlette:
    server = Server(served, cfg, thresholds)

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.stop)  # queued jobs finish first

    routes = [Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]), Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.prometheus, methods=["GET"])]  # fmt: skip
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: server.not_found,
                                                                         405: server.not_found})  # fmt: skip
    app.state.server = server
    return app
