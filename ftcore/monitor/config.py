"""Drift thresholds: the values above which a drift score warns (the server) or fails a check (monitor.py)."""

from dataclasses import dataclass


@dataclass
class DriftThresholds:
    length_psi: float = 0.25  # PSI's common "real shift" line (noise of n prompts: about 9 / n)
    token_js: float = 0.1  # bits
    embedding_shift: float = 0.5  # in reference spreads (noise of n prompts: about 1 / sqrt(n))
