"""Check a finished run on fresh labeled data: `python scripts/monitor.py outputs/<run> --data fresh.jsonl`.

Scores the run's model on the whole file (in the run's data format) with the run's task metric, compares it with
the run's stored test score (eval.json) and its base model's, and scores the fresh prompts' drift against the
training prompts (drift_reference.json). Appends one JSON line to the history (default <run>/monitor.jsonl) and
plots it next to it (monitor.png; needs matplotlib). Exits 1 when the score is more than --max-drop below the
stored test score (or, with --fail-on-drift, when a drift score is over its threshold), 0 otherwise, 2 on a user
error, 3 on an unexpected one: fit for cron or CI.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

from ftcore.cli import run_cli
from ftcore.errors import FtcoreError
from ftcore.monitor.check import MonitorConfig, append_history, drift_notes, read_history, run_check, summary
from ftcore.monitor.config import DriftThresholds
from ftcore.monitor.plot import plot_history

INTERNAL_ERROR = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished training run (config.json, final/, eval.json, drift_reference.json)")
    p.add_argument("--data", required=True, help="the fresh labeled file, in the run's data format")
    p.add_argument("--history", default="", help="the history to append to (default: RUN_DIR/monitor.jsonl)")
    p.add_argument("--max-drop", type=float, default=MonitorConfig.max_drop,
                   help="fail when the score is more than this (absolute) below the stored test score "
                        "(default: 5%% of the metric's scale, 0.05 or 5 BLEU points)")  # fmt: skip
    p.add_argument("--limit", type=int, default=0, help="score the first N examples of the file (0 = all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--drift-thresholds", default="", metavar="NAME=VALUE,...",
                   help="override drift thresholds (defaults: "
                        + ",".join(f"{k}={v}" for k, v in DriftThresholds().as_dict().items()) + ")")  # fmt: skip
    p.add_argument("--no-drift", action="store_true", help="skip the drift scores (a run without drift_reference.json)")
    p.add_argument("--fail-on-drift", action="store_true", help="also exit 1 when a drift score is over its threshold")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot of the history")
    p.add_argument("--score-base", action="store_true", help="also score the base model on the fresh file: is the "
                   "data harder, or did the model get worse?")
    p.add_argument("--url", default="", help="score the model a scripts/serve.py server serves (e.g. "
                   "http://127.0.0.1:8000) instead of loading final/; with --served-model")
    p.add_argument("--served-model", default="", help="the model's name on that server (its --adapter NAME)")
    p.add_argument("--api-key", default=os.environ.get("FTCORE_API_KEY", ""), help="the server's key "
                   "(default: $FTCORE_API_KEY)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = MonitorConfig(run_dir=args.run_dir, data=args.data, max_drop=args.max_drop, limit=args.limit,
                        device=args.device, drift=not args.no_drift,
                        thresholds=DriftThresholds.parse(args.drift_thresholds), url=args.url,
                        served_model=args.served_model, api_key=args.api_key, score_base=args.score_base)  # fmt: skip
    record = run_check(cfg)
    history = Path(args.history) if args.history else Path(args.run_dir) / "monitor.jsonl"
    append_history(history, record)
    print(summary(record))
    if record["drift"] is not None:
        for note in drift_notes(record["n"], cfg.thresholds):
            print(f"note: {note}", file=sys.stderr)
    written = f"appended to {history}"
    try:
        if not args.no_plot and (png := plot_history(read_history(history), history.with_suffix(".png"))):
            written += f", plot {png}"
    except Exception as e:  # the check itself is done and recorded: a plot failure must not change the verdict
        print(f"note: the plot failed ({type(e).__name__}: {e})", file=sys.stderr)
    print(written)
    failed = not record["passed"] or (args.fail_on_drift and record["drift_over"])
    return 1 if failed else 0


def checked_main(argv=None) -> int:
    """main(); an unexpected error exits INTERNAL_ERROR (3) with its traceback, so cron or CI can tell a crash
    from a regression (1) and a user error (2)."""
    try:
        return main(argv)
    except (FtcoreError, SystemExit, KeyboardInterrupt):
        raise
    except Exception:
        traceback.print_exc()
        print("error: the check failed unexpectedly (exit 3): see the traceback above", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    run_cli(checked_main)
