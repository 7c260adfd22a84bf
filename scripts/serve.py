"""Serve a base model and adapters over an OpenAI-compatible HTTP API (the `serve` extra: pip install -e ".[serve]").

    python scripts/serve.py --model PATH --adapter NAME=DIR [--adapter ...] [--comparison DIR] --port 8000

Each request picks a model by its `model` field: the base (--name, default the model directory's name) or an
adapter's NAME. POST /v1/chat/completions and /v1/completions, GET /v1/models, /health, /metrics (Prometheus).
Binds 127.0.0.1 unless --host says otherwise; --api-key (or FTCORE_API_KEY) requires `Authorization: Bearer`.
SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, exit.
"""

import argparse
import dataclasses
import logging
import os
import socket
import sys

import torch

from ftcore.cli import DEMO_MODEL, run_cli
from ftcore.dtypes import DTYPES
from ftcore.errors import FtcoreError
from ftcore.monitor.config import DriftThresholds
from ftcore.serve.config import ServeConfig
from ftcore.serve.models import comparison_adapters, load_served

SERVE_DTYPES = {**DTYPES, "float64": torch.float64}  # float64: exact comparisons in tests


def parse_args():
    d = ServeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help=f"base model: dir, .gguf, pkg:// or hub id ({DEMO_MODEL})")
    p.add_argument("--name", default="", help="the base model's name in requests (default: its directory's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter (a run's final/, PEFT format) or a whole fine-tuned model; repeatable")
    p.add_argument("--comparison", action="append", default=[], metavar="DIR",
                   help="every final/ of a scripts/compare.py directory, named <arm>-seed<k>; repeatable")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 = a free port (printed at start)")
    p.add_argument("--api-key", default=os.environ.get("FTCORE_API_KEY", d.api_key),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $FTCORE_API_KEY, else none)")
    for field in dataclasses.fields(ServeConfig):
        if field.name in ("host", "port", "api_key"):
            continue
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    p.add_argument("--drift-threshold", action="append", default=[], metavar="SCORE=VALUE",
                   help="override a drift threshold (length_psi, token_js, embedding_shift; ftcore/monitor/config.py)")
    p.add_argument("--dtype", choices=sorted(SERVE_DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args()


def named_pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise FtcoreError(f"{flag} {item!r}: expected NAME=VALUE")
        if name in out:
            raise FtcoreError(f"{flag} {item!r}: the name {name!r} is given twice")
        out[name] = value
    return out


def thresholds(items: list[str]) -> dict[str, float]:
    """DriftThresholds' defaults with --drift-threshold NAME=VALUE overrides."""
    return DriftThresholds.parse(",".join(items)).as_dict()


def main():
    args = parse_args()
    import uvicorn

    from ftcore.serve.app import build_app

    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    limits = thresholds(args.drift_threshold)
    adapters = named_pairs(args.adapter, "--adapter")
    for comparison in args.comparison:
        for name, where in comparison_adapters(comparison).items():
            if name in adapters:
                raise FtcoreError(f"--comparison {comparison}: the name {name!r} is already taken")
            adapters[name] = where
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    served = load_served(args.model, adapters, SERVE_DTYPES[args.dtype], args.device, args.name)
    app = build_app(served, cfg, limits)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise FtcoreError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror})") from None
    host, port = sock.getsockname()[:2]
    names = ", ".join(f"{s.name} ({s.method})" for s in served.by_name.values())
    print(f"ftcore serve: http://{host}:{port} serving {names}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=
                                           cfg.graceful_shutdown_s))  # fmt: skip
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
