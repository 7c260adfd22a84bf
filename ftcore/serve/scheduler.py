"""The decode worker: one thread takes queued jobs in batches and runs them (batch.py), one batch at a time.

A batch is the oldest waiting job plus, in arrival order, up to max_batch - 1 more jobs for the same engine
(the base and every routed adapter share one engine; a prefix/prompt adapter or a whole model has its own).
Jobs that arrive while a batch decodes wait for the next one (static batching: a batch runs to its longest
row). max_batch=1 turns batching off. The queue is bounded: submit() refuses a job when max_queue are waiting.
"""

import collections
import logging
import threading
import time

from ftcore.serve.batch import Job, run_batch

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

    def take_batch(self) -> list[Job] | None:
        with self.cond:
            while not self.waiting and self.running:
                self.cond.wait()
            if not self.waiting:
                return None
        if self.batch_wait_s and self.max_batch > 1:
            time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self.cond:
            engine = self.waiting[0].served.engine
            batch = [j for j in self.waiting if j.served.engine is engine and not j.cancelled.is_set()]
            batch = batch[: min(self.max_batch, engine.max_batch or self.max_batch)]
            taken = {id(j) for j in batch}
            gone = [j for j in self.waiting if j.served.engine is engine and j.cancelled.is_set()]
            taken |= {id(j) for j in gone}
            self.waiting = collections.deque(j for j in self.waiting if id(j) not in taken)
            self._queue_gauge()
        for job in gone:  # the client left while it waited
            job.finish_reason = "cancelled"
            job.send("done", job)
        return batch

    def loop(self):
        while (batch := self.take_batch()) is not None:
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                tokens = run_batch(batch[0].served.engine, batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.error = f"generation failed: {type(e).__name__}: {e}"
                tokens = 0
            if self.metrics is not None:
                self.metrics.batch(len(batch), tokens, time.perf_counter() - t0)
            for job in batch:
                job.send("done", job)
            if self.after_batch is not None:
                try:
                    self.after_batch(batch)
                except Exception:
                    log.exception("after-batch hook failed")
