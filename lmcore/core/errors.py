"""The errors a user can act on: shown as one line, never a traceback."""

from __future__ import annotations


class StageError(RuntimeError):
    """An error a user can act on (bad input, missing file): shown as one line, no traceback."""


class MayPass(StageError):
    """A failure that a second try may not meet (a download, a training process that crashed or
    was killed): the orchestrators' retries are for these. Any other :class:`StageError` is a
    problem in the user's input, which a retry would only meet again."""


class Interrupted(RuntimeError):
    """A stage stopped by a signal after saving what it needs to resume (exit status 128 + signum)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
