"""Messages for backupninja's report.

backupninja counts the lines its handlers print by their prefix (``Info:``,
``Warning:``, ``Error:``, ``Fatal:``), so every message goes through Python
logging with a formatter that writes exactly those prefixes, one line each.

Levels, as the nightly report reads them:

- Debug: details for ``backupninja --debug``.
- Info: one line per step, and one summary line per domain.
- Warning: the backup is valid but something was degraded or repaired.
- Error: this domain failed, but it runs on its own images again.
- Fatal (``logging.CRITICAL``): bad configuration, no hypervisor, or a VM
  left running on an overlay.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from typing import Protocol

log = logging.getLogger("backupninja_kvm")

PREFIXES = {
    logging.DEBUG: "Debug",
    logging.INFO: "Info",
    logging.WARNING: "Warning",
    logging.ERROR: "Error",
    logging.CRITICAL: "Fatal",
}


class PrefixFormatter(logging.Formatter):
    """Formats a record as ``Prefix: message``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = PREFIXES.get(record.levelno, "Info")
        text = record.getMessage().replace("\n", " ")
        return f"{prefix}: {text}"


class LiveDisplay(Protocol):
    """Status lines redrawn in place on a terminal (progress.Board, Progress)."""

    def interlude(self) -> AbstractContextManager[None]:
        """Take the lines off the screen for the block, draw them again after."""
        ...


_live: list[LiveDisplay] = []  # the display on the terminal now, at most one


def show_live(display: LiveDisplay) -> None:
    """While *display* is on the terminal, log lines go above it."""
    _live[:] = [display]


def hide_live(display: LiveDisplay) -> None:
    if display in _live:
        _live.clear()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class CountingHandler(logging.StreamHandler):
    """A stream handler that remembers the worst level it has written.

    On a terminal, a record written while status lines are drawn (progress)
    goes above them: without that, the next redraw would overwrite it, or be
    drawn over the wrong lines.
    """

    def __init__(self, stream=None) -> None:
        super().__init__(stream if stream is not None else sys.stdout)
        self.counts: dict[int, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelno] = self.counts.get(record.levelno, 0) + 1
        live = _live[:1]
        if live and _is_terminal(self.stream):
            with live[0].interlude():
                super().emit(record)
                self.flush()
        else:
            super().emit(record)
            self.flush()

    def count(self, level: int) -> int:
        return sum(n for lvl, n in self.counts.items() if lvl >= level)


def setup(stream=None, debug: bool = True) -> CountingHandler:
    """Route the package's log records to *stream* with backupninja prefixes."""
    handler = CountingHandler(stream)
    handler.setFormatter(PrefixFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    return handler


def human_bytes(count: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes as the report shows them."""
    if abs(count) < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if abs(round(count, 1)) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def seconds(duration: float) -> str:
    """A duration for the report: ``0.04 s``, ``12.3 s``, ``4 min 05 s``."""
    if round(duration, 2) < 1:
        return f"{duration:.2f} s"
    if round(duration, 1) < 60:
        return f"{duration:.1f} s"
    minutes, rest = divmod(int(round(duration)), 60)
    return f"{minutes} min {rest:02d} s"
