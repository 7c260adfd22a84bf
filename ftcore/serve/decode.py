"""Continuous batching: a batch of requests decodes one token per step, and new requests join between steps.

    batch = RunningBatch(engine, jobs)       # prefill: the rows left-padded to the longest prompt
    while batch.rows:
        batch.admit(more_jobs)               # each new row prefilled alone, its keys/values put beside the others'
        finished = batch.step()              # one token for every row; finished rows leave the batch

The rows share one KV cache [rows, n_kv, width, hd], left-padded: a row's padding columns are masked, and its
positions count its own tokens only, so a row computes what it would alone (generate()'s left padding). A row
whose prompt is longer than the batch's width widens the batch: every other row gets more padding on the
left. Finished rows are dropped from the cache, and columns that are padding in every row left are trimmed.
Prompt tuning (soft tokens at the start of the cache) and LongRoPE (the factors switch per batch, and a row that
crosses the original context re-prefills) are not `joinable`: their batches run as formed, through generate()
(batch.run_batch).
"""

import time

import torch

from ftcore.model import KVCache
from ftcore.model.generate import sample_next
from ftcore.serve.batch import Job

GROW = 64  # cache columns added at a time when the rows need more room


def joinable(model) -> bool:
    """Whether rows may join this model's running batch."""
    return not getattr(model, "num_virtual_tokens", 0) and model.inv_freq_long is None


class RunningBatch:
    def __init__(self, engine, jobs: list[Job]):
        assert joinable(engine.model), "prompt tuning and LongRoPE batches run through batch.run_batch"
        self.engine, self.model, self.tok = engine, engine.model, engine.tokenizer
        self.device = self.model.inv_freq.device
        self.stop_ids = self.tok.stop_ids
        self.rows: list[Job] = []
        self.gens: dict[int, torch.Generator] = {}  # id(job) -> its sampling generator
        self.cache = self.mask = self.positions = self.logits = None
        self.steps = 0
        self._prefill(jobs)

    # -- the cache as a batch of rows -------------------------------------------------------------------------

    def _route(self, jobs: list[Job]):
        if self.engine.routing is not None:
            self.engine.routing.select([j.served.adapter for j in jobs], self.device)

    def _forward(self, jobs, tokens, mask, positions, cache) -> torch.Tensor:
        self._route(jobs)
        try:
            return self.model(tokens, attention_mask=mask, position_ids=positions, kv_cache=cache)[:, -1]
        finally:
            if self.engine.routing is not None:
                self.engine.routing.clear()

    def _prefill(self, jobs: list[Job]):
        """The first rows: left-padded to the longest prompt, one forward (as generate() starts)."""
        width = max(len(j.prompt) for j in jobs)
        tokens, mask = self._left_padded([j.prompt for j in jobs], width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        room = width + max(j.max_tokens for j in jobs)
        cache = KVCache(self.model.cfg, len(jobs), room)
        self.logits = self._forward(jobs, tokens, mask, positions, cache)
        self.cache, self.mask, self.positions, self.rows = cache, mask, positions, list(jobs)
        for job in jobs:
            self._seed(job)

    def _left_padded(self, prompts: list[list[int]], width: int):
        tokens = torch.full((len(prompts), width), self.tok.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) :] = torch.tensor(p, device=self.device)
            mask[i, width - len(p) :] = 1
        return tokens, mask

    def _seed(self, job: Job):
        if job.temperature > 0:
            self.gens[id(job)] = torch.Generator(device=self.device).manual_seed(job.seed)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def _pad_left(self, n: int):
        """n more padding columns on the left of every row (a longer prompt joins)."""
        B = len(self.rows)
        self.mask = torch.cat([self.mask.new_zeros(B, n), self.mask], dim=1)
        self.positions = torch.cat([self.positions.new_zeros(B, n), self.positions], dim=1)
        self._resize(self.width, shift=n)

    def _resize(self, room: int, shift: int = 0, rows=None, drop: int = 0):
        """A new cache with `room` columns: rows kept (`rows`, an index tensor), `drop` leftmost columns dropped,
        the kept columns moved `shift` to the right."""
        old = self.cache
        B = len(rows) if rows is not None else old.shape[0]
        new = KVCache(self.model.cfg, B, room)
        filled = old.length
        for layer in range(len(old.k)):
            for src, dst in ((old.k, new.k), (old.v, new.v)):
                t = src[layer] if rows is None else src[layer].index_select(0, rows)
                d = t.new_zeros((B, *t.shape[1:2], room, t.shape[3]))
                d[:, :, shift : shift + filled - drop] = t[:, :, drop:filled]
                dst[layer] = d
        new.length = filled - drop + shift
        self.cache = new

    def _ensure_room(self, need: int):
        if need > self.cache.shape[2]:
            self._resize(need + GROW)

    # -- joining, stepping, leaving ---------------------------------------------------------------------------

    def admit(self, jobs: list[Job]):
        """Prefill each job alone and add it as a row, its keys and values right-aligned to the batch's width."""
        for job in jobs:
            n = len(job.prompt)
            if n > self.width:
                self._pad_left(n - self.width)
            # alone, unpadded (left padding changes nothing: the row's keys are the same), then right-aligned
            tokens = torch.tensor([job.prompt], device=self.device)
            alone = KVCache(self.model.cfg, 1, n)
            logits = self._forward([job], tokens, torch.ones_like(tokens), None, alone)
            self._ensure_room(self.width + job.max_tokens)
            self.cache.shape = (self.cache.shape[0] + 1, *self.cache.shape[1:])
            for layer in range(len(alone.k)):
                for own, batch in ((alone.k, self.cache.k), (alone.v, self.cache.v)):
                    row = batch[layer].new_zeros((1, *batch[layer].shape[1:]))
                    row[:, :, self.width - n : self.width] = own[layer]
                    batch[layer] = torch.cat([batch[layer], row], dim=0)
            mask = self.mask.new_zeros(1, self.width)
            mask[:, self.width - n :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self.mask = torch.cat([self.mask, mask], dim=0)
            self.positions = torch.cat([self.positions, positions], dim=0)
            self.logits = torch.cat([self.logits, logits], dim=0)
            self.rows.append(job)
            self._seed(job)

    def pick(self) -> list[int]:
        out = self.logits.argmax(-1)
        for i, job in enumerate(self.rows):
            if job.temperature > 0:
                out[i] = sample_next(self.logits[i : i + 1], job.temperature, job.top_p, self.gens[id(job)])[0]
        return out.tolist()

    def step(self) -> list[Job]:
        """One token for every row; returns the rows that finished (they have left the batch)."""
        t0 = time.perf_counter()
        nxt = self.pick()
        done = []
        for job, token in zip(self.rows, nxt):
            if token in self.stop_ids:
                job.finish("stop")
            elif job.add_token(token, self.tok):
                pass  # finished: stop string, max_tokens or cancelled
            if job.finish_reason is not None:
                done.append(job)
        keep = [i for i, job in enumerate(self.rows) if job.finish_reason is None]
        self.steps += 1
        self.step_s = time.perf_counter() - t0
        if not keep:
            self.rows = []
            return done
        if len(keep) < len(self.rows):
            self._leave(keep)
        tokens = torch.tensor([nxt[i] for i in keep], device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        self._ensure_room(self.cache.length + 1)
        self.logits = self._forward(self.rows, tokens, self.mask, self.positions[:, -1:], self.cache)
        self.step_s = time.perf_counter() - t0
        return done

    def _leave(self, keep: list[int]):
        """Drop the finished rows, and the columns that are padding in every row that is left."""
        rows = torch.tensor(keep, device=self.device)
        self.mask, self.positions = self.mask.index_select(0, rows), self.positions.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)
        for job in [j for i, j in enumerate(self.rows) if i not in set(keep)]:
            self.gens.pop(id(job), None)
        self.rows = [self.rows[i] for i in keep]
        drop = int(self.mask.any(0).nonzero()[0])  # columns on the left that are padding in every row left
        self.mask, self.positions = self.mask[:, drop:], self.positions[:, drop:]
        self._resize(self.cache.shape[2] - drop, rows=rows, drop=drop)
