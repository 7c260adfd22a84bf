"""After training: drift of served or fresh prompts against the training prompts (drift.py, reference.py, the
thresholds in config.py) and a run's check on fresh labeled data with its history (check.py, plot.py)."""
