"""User-facing errors: one clear line naming the file, key or tensor and what was expected."""


class FtcoreError(Exception):
    """Bad input from the user (a file, a config value, a checkpoint).

    CLIs catch this, print `error: <message>` on one line and exit non-zero without a traceback.
    """


class NonFiniteLoss(FtcoreError):
    """A training step's loss was NaN or infinite (usually a learning rate too high); CLIs exit with 3."""

    exit_code = 3

    def __init__(self, loss: float, step: int | None = None):
        self.loss, self.step = loss, step
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"non-finite loss {loss}{where}; lower optim.lr, use train.precision=fp32, "
                         f"or set train.on_nonfinite=skip")  # fmt: skip

    def at_step(self, step: int) -> "NonFiniteLoss":
        return NonFiniteLoss(self.loss, step)
