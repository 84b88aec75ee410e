"""Live feedback while images are copied and merged.

On a terminal: one status line per disk, redrawn in place (bytes, rate,
time left). Without one (under backupninja): a Debug line at most every
``interval`` seconds, so that the log stays readable; the per-domain summary
line says the rest.
"""

from __future__ import annotations

import sys
import threading
import time
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
        self.board: Board | None = None

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
        if self.board is not None:
            self.board.redraw()
        elif self.interactive:
            self.stream.write("\r\033[K" + self.line(now))
            self.stream.flush()
        elif now - self.last_report >= self.interval:
            log.debug("%s", self.line(now))
            self.last_report = now

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        if self.board is not None:
            self.board.redraw()
        elif self.interactive:
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()


class Board:
    """Several progress lines at once (disks copied side by side), redrawn in
    place on a terminal; updates may come from several threads."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.progresses: list[Progress] = []
        self.drawn = 0
        self.lock = threading.Lock()

    def add(self, label: str, total: int) -> Progress:
        progress = Progress(label, total, self.stream, self.interactive)
        if self.interactive:
            progress.board = self
        self.progresses.append(progress)
        return progress

    def redraw(self) -> None:
        with self.lock:
            text = f"\033[{self.drawn}F" if self.drawn else ""
            text += "".join(f"\033[K{p.line()}\n" for p in self.progresses)
            self.stream.write(text)
            self.stream.flush()
            self.drawn = len(self.progresses)
