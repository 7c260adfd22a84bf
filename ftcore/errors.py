"""User-facing errors: one clear line naming the file, key or tensor and what was expected."""


class FtcoreError(Exception):
    """Bad input from the user (a file, a config value, a checkpoint).

    CLIs catch this, print `error: <message>` on one line and exit non-zero without a traceback.
    """
