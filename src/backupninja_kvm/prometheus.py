"""Per-domain figures for Prometheus' node exporter (textfile collector).

When backupninja's ``reportprom`` is set, the handler passes its
``prom_textfile_dir``; we write ``backupninja_kvm.prom`` there, beside
backupninja's own ``backupninja.prom``, atomically. The file holds every
domain's series across actions: each run replaces the series of its own
domains and keeps the others' (an earlier action's failure stays visible);
a domain's last success time is carried over when this run did not succeed.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass

from backupninja_kvm.report import log

FILE_NAME = "backupninja_kvm.prom"

OK, ERROR, FATAL = 0, 1, 2

METRICS = [
    ("last_success_timestamp_seconds", "Time of the last successful backup of the domain"),
    ("status", "Result of the last backup: 0 success, 1 error, 2 fatal (left on an overlay)"),
    ("bytes_copied", "Bytes of image data copied by the last backup"),
    ("overlay_seconds", "Seconds the domain ran on overlays during the last backup"),
    ("duration_seconds", "Seconds the last backup of the domain took"),
    ("quiesced", "1 when the last backup froze the guest's filesystems, 0 crash-consistent"),
]


@dataclass(frozen=True)
class DomainFigures:
    domain: str
    status: int
    bytes_copied: int = 0
    overlay_seconds: float = 0.0
    duration_seconds: float = 0.0
    quiesced: bool = False


_SERIES_LINE = re.compile(r'^backupninja_kvm_([a-z_]+)\{domain="((?:[^"\\]|\\.)*)"\} (\S+)$')
# The previous file is read through O_NOFOLLOW and O_NONBLOCK (no planted link
# or FIFO) and only this far.
_READ_LIMIT = 16 * 1024 * 1024


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def previous_series(path: str) -> dict[str, dict[str, float]]:
    """metric name (without the prefix) -> domain -> value, from an earlier file."""
    found: dict[str, dict[str, float]] = {name: {} for name, _ in METRICS}
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return found
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return found
        text = handle.read(_READ_LIMIT).decode("utf-8", errors="replace")
    for line in text.splitlines():
        match = _SERIES_LINE.match(line)
        if match and match.group(1) in found:
            try:
                found[match.group(1)][_unescape(match.group(2))] = float(match.group(3))
            except ValueError:
                continue
    return found


def merge(
    previous: dict[str, dict[str, float]], figures: list[DomainFigures], now: float
) -> dict[str, dict[str, float]]:
    """The series of this run's domains replace theirs; every other domain's
    series (an earlier action's, a failure included) stay as they were."""
    values = {name: dict(previous.get(name, {})) for name, _ in METRICS}
    for figure in figures:
        values["status"][figure.domain] = figure.status
        values["bytes_copied"][figure.domain] = figure.bytes_copied
        values["overlay_seconds"][figure.domain] = round(figure.overlay_seconds, 3)
        values["duration_seconds"][figure.domain] = round(figure.duration_seconds, 3)
        values["quiesced"][figure.domain] = int(figure.quiesced)
        if figure.status == OK:
            values["last_success_timestamp_seconds"][figure.domain] = now
    return values


def render_series(values: dict[str, dict[str, float]]) -> str:
    out = []
    for name, help_text in METRICS:
        metric = f"backupninja_kvm_{name}"
        out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for domain in sorted(values.get(name, {})):
            value = values[name][domain]
            shown = f"{value:.3f}" if isinstance(value, float) and value % 1 else f"{value:.0f}"
            out.append(f'{metric}{{domain="{_escape(domain)}"}} {shown}')
    return "\n".join(out) + "\n"


def directory_warnings(directory: str) -> list[str]:
    """Why *directory* lets any user tamper with the figures ([] if not).

    Writing is safe anyway (mkstemp, rename); but such a user can replace
    or remove the file, and so hide a failure from the alerts.
    """
    try:
        info = os.stat(directory)
    except OSError:
        return []
    # Owned by another user alone is fine: Debian makes the node exporter's
    # textfile directory its own user's, and mkstemp keeps root's writes safe.
    warnings = []
    open_to = info.st_mode & (stat.S_IWOTH | (stat.S_IWGRP if info.st_gid != 0 else 0))
    if open_to and not info.st_mode & stat.S_ISVTX:
        warnings.append(
            f"{directory} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}), "
            f"who can replace or remove the figures written there: chmod go-w {directory}"
        )
    return warnings


def write(directory: str, figures: list[DomainFigures], now: float | None = None) -> str:
    """Merge the figures of this run into the file; returns the file's path.

    The new file is made with mkstemp in *directory* (a fresh name, O_EXCL,
    mode 0600: no planted link or file is ever followed or reused), made
    0644 on its descriptor, synced, then renamed over the old one.
    """
    path = os.path.join(directory, FILE_NAME)
    for warning in directory_warnings(directory):
        log.warning("Prometheus textfile directory: %s", warning)
    now = time.time() if now is None else now
    values = merge(previous_series(path), figures, now)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(render_series(values))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path
