"""The decode worker: one thread takes queued jobs in batches and decodes them, one engine's batch at a time.

A batch starts with the oldest waiting job plus, in arrival order, up to max_batch - 1 more for the same engine
(the base and every routed adapter share one engine; a prefix/prompt adapter or a whole model has its own).
Continuous batching (decode.py): between decode steps, waiting jobs for the batch's engine join it while it has
room, and finished rows leave; the batch ends when its last row does, and the oldest waiting job starts the
next one. Jobs join only while the oldest waiting job is the running engine's, so other engines do not starve.
Prompt tuning and LongRoPE batches run as formed (batch.run_batch). max_batch=1 turns batching off. The queue
is bounded: submit() refuses a job when max_queue are waiting.
"""

import collections
import logging
import threading
import time

from ftcore.serve.batch import Job, run_batch
from ftcore.serve.decode import RunningBatch, joinable

log = logging.getLogger("ftcore.serve")


class QueueFull(Exception):
    pass


class WorkerStopped(Exception):
    pass


class Scheduler:
    def __init__(self, max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.002, metrics=None,
                 after_batch=None):  # fmt: skip
        """after_batch(jobs): called in the worker after each batch (drift windows)."""
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.metrics, self.after_batch = metrics, after_batch
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self.loop, name="ftcore-decode", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, job: Job):
        if not self.thread.is_alive():
            raise WorkerStopped("the decode worker is not running")
        with self.cond:
            if sum(not j.cancelled.is_set() for j in self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(job)
            self._queue_gauge()
            self.cond.notify()

    def stop(self, timeout: float | None = None):
        """Finish every queued job, then end the worker."""
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join(timeout)

    def _queue_gauge(self):
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))

    def take(self, engine=None, limit: int | None = None, block: bool = True) -> list[Job]:
        """Waiting jobs, oldest first: for `engine` (None: the oldest job's), at most `limit` (None: the engine's
        batch size). With block=False, none unless the oldest waiting job is this engine's (no engine starves)."""
        with self.cond:
            while block and not self.waiting and self.running:
                self.cond.wait()
            if not self.waiting or (not block and self.waiting[0].served.engine is not engine):
                return []
            engine = engine or self.waiting[0].served.engine
        if block and self.batch_wait_s and self.max_batch > 1:
            time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self.cond:
            limit = min(self.max_batch, engine.max_batch or self.max_batch) if limit is None else limit
            mine = [j for j in self.waiting if j.served.engine is engine]
            gone = [j for j in mine if j.cancelled.is_set()]
            batch = [j for j in mine if not j.cancelled.is_set()][:limit]
            taken = {id(j) for j in batch + gone}
            self.waiting = collections.deque(j for j in self.waiting if id(j) not in taken)
            self._queue_gauge()
        for job in gone:  # the client left while it waited
            job.finish_reason = "cancelled"
            job.close()
        return batch

    def loop(self):
        while True:
            batch = self.take()
            if not batch:
                if not self.running and not self.waiting:
                    return
                continue
            engine = batch[0].served.engine
            try:
                if joinable(engine.model):
                    self.decode_continuously(engine, batch)
                else:
                    self.decode_as_formed(engine, batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                log.exception("a batch on %s failed", engine.name)
                for job in batch:
                    if not job.closed:
                        job.error = f"generation failed: {type(e).__name__}: {e}"
                        job.close()
            if self.after_batch is not None:
                try:
                    self.after_batch(batch)
                except Exception:
                    log.exception("after-batch hook failed")

    def decode_continuously(self, engine, batch: list[Job]):
        """Rows join between steps (up to the engine's batch size) and leave when done; `batch` collects them."""
        size = min(self.max_batch, engine.max_batch or self.max_batch)
        running = RunningBatch(engine, batch)
        while running.rows:
            if len(running.rows) < size and (more := self.take(engine, size - len(running.rows), block=False)):
                running.admit(more)
                batch += more
            rows = len(running.rows)
            finished = running.step()
            if self.metrics is not None:
                self.metrics.batch(rows, rows, running.step_s)
            for job in finished:
                job.close()

    def decode_as_formed(self, engine, batch: list[Job]):
        """Prompt tuning and LongRoPE: the batch runs to its longest row through generate() (batch.run_batch)."""
        t0 = time.perf_counter()
        tokens = run_batch(engine, batch)
        if self.metrics is not None:
            self.metrics.batch(len(batch), tokens, time.perf_counter() - t0)
        for job in batch:
            job.close()
