"""SIGTERM, SIGINT and SIGHUP: stop the backup, but never in the middle of a merge.

The handlers raise ``Interrupted`` at once, unless a critical section (the
merge) is running: then the signal is remembered and raised when the
section ends, so that the VM is back on its own images before we exit.
Repeated signals are ignored.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_pending: int | None = None
_raised = False
_depth = 0


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt
    """A signal asked us to stop; ``signame`` says which."""

    def __init__(self, signum: int) -> None:
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)


def _handler(signum: int, _frame) -> None:
    global _pending, _raised
    if _pending is not None:
        return
    _pending = signum
    if _depth == 0:
        _raised = True
        raise Interrupted(signum)


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _handler)


@contextmanager
def critical() -> Iterator[None]:
    """Defer the signal handlers' Interrupted to the end of this block."""
    global _depth, _raised
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None and not _raised:
        _raised = True
        raise Interrupted(_pending)


def received() -> str | None:
    """The name of the signal received so far (acted on or not), else None.

    A critical section that ends with an error of its own does not raise
    the deferred Interrupted: the caller checks this to stop all the same.
    """
    return signal.Signals(_pending).name if _pending is not None else None


def reset() -> None:
    """Forget a pending signal (for tests)."""
    global _pending, _raised
    _pending, _raised = None, False
