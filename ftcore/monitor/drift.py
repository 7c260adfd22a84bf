"""Drift of prompts against the training prompts: three scores, each 0 for the same distribution.

    ref = DriftReference.build(train_token_ids, train_embeddings)      # saved with the run (drift_reference.json)
    scores = ref.scores(token_ids, embeddings)                          # {"length_psi", "token_js", "embedding_shift"}

- length_psi: the population stability index of prompt lengths, over the reference's deciles (10 bins, edges
  from the reference; empty bins smoothed by `eps`): sum (q - p) ln(q / p). Common reading: < 0.1 stable,
  0.1-0.25 moderate, > 0.25 a real shift; but n prompts of the same distribution average about 9 / n (the
  bins' chi-square noise), so score windows of a few hundred prompts.
- token_js: the Jensen-Shannon divergence (base 2, in [0, 1]) between the token frequency distributions (every
  token id either side saw; the reference keeps its counts).
- embedding_shift: the distance between the mean prompt embeddings (e.g. the base model's last hidden state,
  mean over a prompt's tokens), in units of the reference's per-prompt spread: ||mu - mu_ref|| / sqrt(mean
  squared distance of a reference prompt from mu_ref). Noise of n prompts alone gives about 1 / sqrt(n).
"""

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ftcore.errors import FtcoreError

SCORES = ("length_psi", "token_js", "embedding_shift")


def psi(ref_fractions: np.ndarray, fractions: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two distributions over the same bins."""
    p = np.maximum(np.asarray(ref_fractions, float), eps)
    q = np.maximum(np.asarray(fractions, float), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = equal, 1 = disjoint) of two (unnormalized) distributions."""
    p, q = np.asarray(p, float) / np.sum(p), np.asarray(q, float) / np.sum(q)
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return max(0.0, (kl(p, m) + kl(q, m)) / 2)


@dataclass
class DriftReference:
    """What drift is measured against: the training prompts' length deciles, top tokens and mean embedding."""

    length_edges: list[float]  # 9 inner decile edges
    length_fractions: list[float]  # the reference's share in each of the 10 bins
    token_counts: dict[str, int]  # token id (as text: JSON keys) -> count over the reference prompts
    embedding_mean: list[float] | None  # [D]
    embedding_spread: float | None  # root mean squared distance of a reference prompt from the mean
    prompts: int

    @classmethod
    def build(cls, token_ids: list[list[int]], embeddings: np.ndarray | None = None) -> "DriftReference":
        if not token_ids:
            raise FtcoreError("drift: no reference prompts")
        lengths = np.array([len(t) for t in token_ids], float)
        edges = np.unique(np.quantile(lengths, np.linspace(0.1, 0.9, 9)))
        counts = Counter(str(t) for ids in token_ids for t in ids)
        mean = spread = None
        if embeddings is not None:
            emb = np.asarray(embeddings, float)  # [n, D]
            mean_vec = emb.mean(0)
            mean, spread = mean_vec.tolist(), float(np.sqrt(np.mean(np.sum((emb - mean_vec) ** 2, axis=1))))
        return cls(edges.tolist(), length_bins(lengths, edges).tolist(), dict(counts), mean, spread, len(token_ids))

    def scores(self, token_ids: list[list[int]], embeddings: np.ndarray | None = None) -> dict[str, float]:
        """The three drift scores of these prompts (embedding_shift only with embeddings and a reference mean)."""
        if not token_ids:
            raise FtcoreError("drift: no prompts to score")
        lengths = np.array([len(t) for t in token_ids], float)
        out = {"length_psi": psi(self.length_fractions, length_bins(lengths, np.array(self.length_edges)))}
        counts = Counter(str(t) for ids in token_ids for t in ids)
        ids = sorted(set(self.token_counts) | set(counts))
        out["token_js"] = js_divergence([self.token_counts.get(t, 0) for t in ids], [counts.get(t, 0) for t in ids])
        if embeddings is not None and self.embedding_mean is not None:
            shift = np.linalg.norm(np.asarray(embeddings, float).mean(0) - np.asarray(self.embedding_mean))
            out["embedding_shift"] = float(shift / self.embedding_spread) if self.embedding_spread else math.inf
        return out

    def save(self, path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "DriftReference":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise FtcoreError(f"{path}: not a drift reference ({e})") from None


def length_bins(lengths: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of lengths in each bin: (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    idx = np.searchsorted(edges, lengths, side="left")
    return np.bincount(idx, minlength=len(edges) + 1) / len(lengths)
