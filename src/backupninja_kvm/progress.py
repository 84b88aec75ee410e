"""Live feedback while images are copied and merged.

On a terminal: one status line per disk, redrawn in place (bytes, rate,
time left). Log lines printed meanwhile go above it: the status lines are
cleared, the log line written, the status lines drawn again below it (see
``report.show_live``). Without a terminal (under backupninja): a Debug line
at most every ``interval`` seconds, so that the log stays readable; the
per-domain summary line says the rest.

Time left is estimated from the rate of the last ``WINDOW`` seconds, and
only once ``MIN_SPAN`` seconds of progress have been seen: no estimate is
better than a wrong one. While the work is not done the estimate is at
least one second; ``0:00 left`` is never shown.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from backupninja_kvm import report
from backupninja_kvm.report import human_bytes, log

WINDOW = 10.0  # seconds of history for the rate behind the estimate
MIN_SPAN = 2.0  # seconds of history needed before any estimate


def _clock(duration: float) -> str:
    minutes, rest = divmod(int(round(duration)), 60)
    return f"{minutes}:{rest:02d}"


class Progress:
    """Reports the progress of one operation (copy or merge) on one disk.

    A *total* of 0 or 1 means nothing to measure: a merge job with nothing to
    copy reports an end of 0, which callers round up to 1.
    """

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.clock = clock
        self.total = max(total, 0)
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval = interval
        self.started = clock()
        self.last_report = self.started
        self.done = 0
        self.finished = False
        self.ended = 0.0
        self.board: Board | None = None
        self.samples: deque[tuple[float, int]] = deque(maxlen=256)  # (time, done)
        self.shown = False  # our line is on the terminal, unfinished

    def _sample(self, now: float) -> None:
        self.samples.append((now, self.done))
        while len(self.samples) > 1 and self.samples[0][0] < now - WINDOW:
            self.samples.popleft()

    def time_left(self, now: float) -> float | None:
        """Seconds left at the recent rate; None while that is not known."""
        if self.finished or self.done >= self.total:
            return None
        points = [(self.started, 0), *self.samples]
        recent = [point for point in points if point[0] >= now - WINDOW] or points[-1:]
        first_time, first_done = recent[0]
        span = now - first_time
        if span < MIN_SPAN or self.done <= first_done:
            return None  # too little history, or stalled
        rate = (self.done - first_done) / span
        return max(1.0, math.ceil((self.total - self.done) / rate))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        if self.finished:
            now = self.ended
        elapsed = max(now - self.started, 1e-6)
        if self.total <= 1 and self.done <= 1:
            state = "nothing to copy" if self.finished else "starting"
            return f"{self.label}: {state}, {_clock(elapsed)}"
        rate = self.done / elapsed
        complete = self.finished or self.done >= self.total
        percent = 100 if complete else min(99, int(self.done * 100 / self.total))
        text = (
            f"{self.label} {percent:3d}% {human_bytes(self.done)} of {human_bytes(self.total)}, "
            f"{human_bytes(rate)}/s"
        )
        left = self.time_left(now)
        if complete:
            text += f", in {_clock(elapsed)}"
        elif left is not None:
            text += f", {_clock(left)} left"
        else:
            text += f", {_clock(elapsed)} so far"
        return text

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        self._sample(now)
        if self.board is not None:
            self.board.redraw()
        elif self.interactive:
            self.stream.write("\r\033[K" + self.line(now))
            self.stream.flush()
            if not self.shown:
                self.shown = True
                report.show_live(self)
        elif now - self.last_report >= self.interval:
            log.debug("%s", self.line(now))
            self.last_report = now

    def finish(self) -> None:
        if self.total > 1:
            self.done = max(self.done, self.total)
        self.finished = True
        self.ended = self.clock()
        if self.board is not None:
            self.board.redraw()
        elif self.interactive:
            report.hide_live(self)
            self.shown = False
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()

    @contextmanager
    def interlude(self) -> Iterator[None]:
        """Take our unfinished line off the terminal while a log line is
        written, then draw it again below."""
        self.stream.write("\r\033[K")
        self.stream.flush()
        try:
            yield
        finally:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()


class Board:
    """Several progress lines at once (disks copied side by side), redrawn in
    place on a terminal; updates may come from several threads.

    From its first drawing until ``close()``, log lines go above it.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.progresses: list[Progress] = []
        self.drawn = 0
        self.lock = threading.RLock()
        self.active = False

    def add(self, label: str, total: int) -> Progress:
        progress = Progress(label, total, self.stream, self.interactive)
        if self.interactive:
            progress.board = self
        self.progresses.append(progress)
        return progress

    def _draw(self) -> None:
        text = f"\033[{self.drawn}F" if self.drawn else ""
        text += "".join(f"\033[K{p.line()}\n" for p in self.progresses)
        self.stream.write(text)
        self.stream.flush()
        self.drawn = len(self.progresses)

    def redraw(self) -> None:
        with self.lock:
            self._draw()
            if not self.active:
                self.active = True
                report.show_live(self)

    @contextmanager
    def interlude(self) -> Iterator[None]:
        """Clear the board while a log line is written, then draw it below."""
        with self.lock:
            if self.drawn:
                self.stream.write(f"\033[{self.drawn}F\033[J")
                self.stream.flush()
                self.drawn = 0
            try:
                yield
            finally:
                self._draw()

    def close(self) -> None:
        """Leave the last drawing in place; later log lines go below it."""
        with self.lock:
            report.hide_live(self)
            self.active = False
