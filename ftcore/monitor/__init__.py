"""After training: drift of served or fresh prompts against the training prompts (drift.py)."""
