"""Live feedback while images are copied and merged.

On a terminal: one status line per disk, redrawn in place (bytes, rate,
time left). Without one (under backupninja): a Debug line at most every
``interval`` seconds, so that the log stays readable; the per-domain summary
line says the rest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from backupninja_kvm.report import human_bytes, log


def _clock(duration: float) -> str:
    minutes, rest = divmod(int(round(duration)), 60)
    return f"{minutes}:{rest:02d}"


class Progress:
    """Reports the progress of one operation (copy or merge) on one disk."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = 10.0,
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval = interval
        self.started = time.monotonic()
        self.last_report = self.started
        self.done = 0

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        percent = min(100, int(self.done * 100 / self.total))
        text = (
            f"{self.label} {percent:3d}% {human_bytes(self.done)} of {human_bytes(self.total)}, "
            f"{human_bytes(rate)}/s"
        )
        if self.done < self.total and rate > 0:
            text += f", {_clock((self.total - self.done) / rate)} left"
        else:
            text += f", {_clock(elapsed)}"
        return text

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.interactive:
            self.stream.write("\r\033[K" + self.line(now))
            self.stream.flush()
        elif now - self.last_report >= self.interval:
            log.debug("%s", self.line(now))
            self.last_report = now

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        if self.interactive:
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()


ProgressFactory = Callable[[str, int], Progress]


def make_progress(label: str, total: int) -> Progress:
    return Progress(label, total)
