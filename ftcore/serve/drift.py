"""Drift of served prompts: per model, a sliding window of its prompts scored against its training run's reference.

A model served from a run's final/ has that run's drift_reference.json (the base model has none). After
every `every` new prompts of a model (and once its window holds at least `every`), the worker scores the
window (ftcore/monitor/drift.py: length PSI, token JS, embedding shift with the base model's embeddings, as
the reference was built), sets the ftcore_drift_score gauges and logs a warning for each score over its
threshold. Embeddings are computed once per prompt, on the base model, between batches.
"""

import collections
import logging

import numpy as np

from ftcore.monitor.drift import DriftReference
from ftcore.monitor.reference import prompt_embeddings

log = logging.getLogger("ftcore.serve")


class DriftWindow:
    def __init__(self, reference: DriftReference, size: int):
        self.reference = reference
        self.prompts: collections.deque[list[int]] = collections.deque(maxlen=size)
        self.embeddings: collections.deque[np.ndarray | None] = collections.deque(maxlen=size)
        self.new = 0
        self.scores: dict[str, float] = {}


class DriftTracker:
    def __init__(self, served, window: int, every: int, thresholds: dict[str, float], metrics=None):
        """served: models.ServedModels; thresholds: score name -> the value above which it warns."""
        self.base_engine, self.every, self.thresholds, self.metrics = served.base.engine, every, thresholds, metrics
        self.windows = {name: DriftWindow(DriftReference.load(s.drift_reference), window)
                        for name, s in served.by_name.items() if s.drift_reference is not None}  # fmt: skip

    def observe(self, jobs):
        """After a batch (worker thread): add its prompts; rescore the windows that are due."""
        for job in jobs:
            w = self.windows.get(job.served.name)
            if w is not None:
                w.prompts.append(list(job.prompt))
                w.embeddings.append(None)
                w.new += 1
        for name, w in self.windows.items():
            if w.new >= self.every and len(w.prompts) >= self.every:
                self.score(name, w)

    def score(self, name: str, w: DriftWindow) -> dict[str, float]:
        todo = [i for i, e in enumerate(w.embeddings) if e is None]
        if todo and w.reference.embedding_mean is not None:
            engine = self.base_engine
            device = engine.model.inv_freq.device
            emb = prompt_embeddings(engine.model, [w.prompts[i] for i in todo], engine.tokenizer.pad_id, device)
            for i, e in zip(todo, emb):
                w.embeddings[i] = e
        embeddings = np.stack(list(w.embeddings)) if w.reference.embedding_mean is not None else None
        w.scores, w.new = w.reference.scores(list(w.prompts), embeddings), 0
        for score, value in w.scores.items():
            if self.metrics is not None:
                self.metrics.drift.labels(name, score).set(value)
            limit = self.thresholds.get(score)
            if limit is not None and value > limit:
                log.warning("drift: model %s: %s = %.3f over its threshold %.3f (last %d prompts)", name, score,
                            value, limit, len(w.prompts))  # fmt: skip
                if self.metrics is not None:
                    self.metrics.drift_alerts.labels(name, score).inc()
        return w.scores
