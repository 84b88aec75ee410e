"""Per-domain figures for Prometheus' node exporter (textfile collector).

When backupninja's ``reportprom`` is set, the handler passes its
``prom_textfile_dir``; we write ``backupninja_kvm.prom`` there, beside
backupninja's own ``backupninja.prom``, atomically. A domain's last success
time is carried over from the previous file when this run did not succeed.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

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


_SUCCESS_LINE = re.compile(
    r'^backupninja_kvm_last_success_timestamp_seconds\{domain="((?:[^"\\]|\\.)*)"\} (\S+)$'
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def previous_successes(path: str) -> dict[str, float]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        if match := _SUCCESS_LINE.match(line):
            found[_unescape(match.group(1))] = float(match.group(2))
    return found


def render(figures: list[DomainFigures], successes: dict[str, float]) -> str:
    values: dict[str, dict[str, float]] = {name: {} for name, _ in METRICS}
    for figure in figures:
        values["status"][figure.domain] = figure.status
        values["bytes_copied"][figure.domain] = figure.bytes_copied
        values["overlay_seconds"][figure.domain] = round(figure.overlay_seconds, 3)
        values["duration_seconds"][figure.domain] = round(figure.duration_seconds, 3)
        values["quiesced"][figure.domain] = int(figure.quiesced)
    values["last_success_timestamp_seconds"] = dict(successes)
    out = []
    for name, help_text in METRICS:
        metric = f"backupninja_kvm_{name}"
        out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for domain in sorted(values[name]):
            value = values[name][domain]
            shown = f"{value:.3f}" if isinstance(value, float) and value % 1 else f"{value:.0f}"
            out.append(f'{metric}{{domain="{_escape(domain)}"}} {shown}')
    return "\n".join(out) + "\n"


def write(directory: str, figures: list[DomainFigures], now: float | None = None) -> str:
    """Write the figures of this run; returns the file's path."""
    path = os.path.join(directory, FILE_NAME)
    successes = previous_successes(path)
    now = time.time() if now is None else now
    for figure in figures:
        if figure.status == OK:
            successes[figure.domain] = now
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(render(figures, successes))
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
    return path
