"""Evaluation: metrics (perplexity, exact match, classification report, BLEU, ROUGE)."""

from ftcore.eval.metrics import (
    bleu,
    classification_report,
    exact_match,
    perplexity,
    perplexity_from_losses,
    rouge,
)

__all__ = ["bleu", "classification_report", "exact_match", "perplexity", "perplexity_from_losses", "rouge"]
