"""A request as a Job, and one batch of jobs run as formed through ftcore's generate() (run_batch: prompt tuning
and LongRoPE, whose rows cannot join a running batch; decode.py batches the others continuously).

Each Job is one request. Its tokens are decoded to text after every step and handed to `job.emit` as text
deltas (what a streaming client gets); text that might be the start of a stop string is held back until it
is not, so the streamed text always equals the final one. A row ends at a stop token (not part of the
text), at a stop string (cut before it), at its own max_tokens, or when its client went away.
Greedy rows take the argmax; a sampled row draws from its own generator seeded with the request's seed, so it
equals generate(model, [prompt], seed=seed, temperature=t, top_p=p) run alone.
"""

import threading
import time
from dataclasses import dataclass, field

import torch

from ftcore.model.generate import generate, sample_next


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    served: object  # models.Served
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    emit: object = None  # emit(kind, payload) from the worker thread: ("delta", str) then ("done", Job)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already emitted
    finish_reason: str | None = None
    error: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    closed: bool = False  # "done" was sent

    def send(self, kind: str, payload):
        if self.emit is not None:
            self.emit(kind, payload)

    def close(self):
        """Tell the handler the job is over (finished, failed or cancelled); once."""
        if not self.closed:
            self.closed = True
            self.send("done", self)

    def add_token(self, token: int, tokenizer) -> bool:
        """Append one generated token; True when the row is finished (stop string, max_tokens, cancelled)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.append(token)
        text = tokenizer.decode(self.ids)
        hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text = text[:hit]
            return self.finish("stop")
        self.text = text
        if len(self.ids) >= self.max_tokens:
            return self.finish("length")
        if self.cancelled.is_set():
            return self.finish("cancelled")
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(text) - hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for the rest
            safe -= 1
        if safe > self.sent:
            self.send("delta", text[self.sent : safe])
            self.sent = safe
        return False

    def finish(self, reason: str) -> bool:
        self.finish_reason = reason
        if len(self.text) > self.sent:
            self.send("delta", self.text[self.sent :])
            self.sent = len(self.text)
        return True


def pick_rows(jobs: list[Job], device):
    """logits [B, V] -> next ids [B]: argmax for greedy rows, each sampled row from its own generator."""
    gens = {i: torch.Generator(device=device).manual_seed(j.seed) for i, j in enumerate(jobs)
            if j.temperature > 0}  # fmt: skip

    def pick(logits: torch.Tensor) -> torch.Tensor:
        out = logits.argmax(-1)
        for i, gen in gens.items():
            out[i] = sample_next(logits[i : i + 1], jobs[i].temperature, jobs[i].top_p, gen)[0]
        return out

    return pick


def run_batch(engine, jobs: list[Job]) -> int:
    """Decode every job to its end in one batch; finish_reason set on each. Returns the tokens generated."""
    tok, model = engine.tokenizer, engine.model
    device = model.inv_freq.device
    stop_ids = tok.stop_ids

    def on_step(nxt: torch.Tensor, finished: torch.Tensor) -> list[bool]:
        cut = [False] * len(jobs)
        for i, (token, done) in enumerate(zip(nxt.tolist(), finished.tolist())):
            job = jobs[i]
            if done or job.finish_reason is not None:
                cut[i] = True
            elif token in stop_ids:
                cut[i] = job.finish("stop")
            else:
                cut[i] = job.add_token(token, tok)
        return cut

    if engine.routing is not None:
        engine.routing.select([j.served.adapter for j in jobs], device)
    try:
        generate(model, [j.prompt for j in jobs], max(j.max_tokens for j in jobs), stop_ids=stop_ids,
                 pad_id=tok.pad_id, pick=pick_rows(jobs, device), on_step=on_step)  # fmt: skip
    finally:
        if engine.routing is not None:
            engine.routing.clear()
    for job in jobs:
        if job.finish_reason is None:
            job.finish("length")
    return sum(len(j.ids) for j in jobs)
