"""Serving: an OpenAI-compatible HTTP API over one base model and its adapters (app.py), with batching across
adapters (routing.py, scheduler.py), Prometheus metrics and drift scores of the served prompts (drift.py)."""
