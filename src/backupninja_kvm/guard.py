"""The guard: a frozen VM never waits for a thaw that is not coming.

``stage = freeze`` starts it (``backupninja-kvm guard VIEW``, a hidden
command) in a session of its own, with nothing of backupninja's open (its
output pipe, the action's lock on fd 200) except the domains' locks, which
it holds from then on. It waits for the first of:

- the thaw connecting to its socket: it hands the locks over (SCM_RIGHTS)
  and exits, the thaw does the work;
- backupninja's end (a pidfd on the run that owns the freeze): a Halt, a
  kill, a later action file with bad permissions, the thaw left unrun;
- the deadline, ``max_frozen`` after the freeze began;
- SIGTERM.

In the last three cases it thaws the domains itself, logs every line to
backupninja's log file in backupninja's own format, and leaves its lines in
the ride record for the thaw of the same run or the next ``.kvm`` action to
relay in the report. A guard killed with SIGKILL leaves the record: every
``.kvm`` action repairs it first (``stages.sweep``).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from dataclasses import replace

from backupninja_kvm import lock, ride
from backupninja_kvm import thaw as thaws
from backupninja_kvm.errors import HypervisorError
from backupninja_kvm.report import PREFIXES, log, seconds

_stop = False
# Seconds a reader may still hold a view file before it is detached: at the
# deadline, max_frozen has been given already.
READER_GRACE = 10


def _on_term(_signum, _frame) -> None:
    global _stop
    _stop = True


class LogfileHandler(logging.Handler):
    """Lines as backupninja's logmsg writes them (``Dec 02 01:00:00 Warning: ...``),
    kept for the ride record as well."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        level = PREFIXES.get(record.levelno, "Info")
        text = record.getMessage().replace("\n", " ")
        if record.levelno >= logging.INFO:
            self.lines.append((level, text))
        if not self.path:
            return
        stamp = time.strftime("%b %d %H:%M:%S")
        try:
            # backupninja writes only to a log file that exists and is writable
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            os.write(fd, f"{stamp} {level}: {text}\n".encode())
        finally:
            os.close(fd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _wait_exit(pid: int) -> None:
    fd = _pidfd(pid)
    if fd is None:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def main(view: str, locks: dict[str, int], ready_fd: int, freeze_pid: int) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = ride.socket_path(view)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(4)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    _wait_exit(freeze_pid)  # the freeze writes the record last
    record = ride.read(view)
    frozen = {d.uuid for d in record.domains} if record is not None else set()
    for uuid in [u for u in locks if u not in frozen]:  # the freeze failed for these
        os.close(locks.pop(uuid))
    if record is None or not record.domains:
        listener.close()
        os.unlink(path)
        return 0
    for fd in locks.values():
        lock.describe(
            fd,
            f"guard of the freeze by {record.action} (backupninja {record.owner}), until "
            f"{record.thaw_action} takes over",
        )
    owner = _pidfd(record.owner.pid) if record.owner.alive() else None
    why = ""
    try:
        while not why:
            left = record.deadline - time.time()
            if _stop:
                why = "the guard was stopped (SIGTERM)"
                break
            if left <= 0:
                why = (
                    f"max_frozen passed ({seconds(record.deadline - record.started)} after the "
                    f"freeze) before {record.thaw_action} ran"
                )
                break
            watched = [listener] + ([owner] if owner is not None else [])
            if owner is None and not record.owner.alive():
                why = f"backupninja ({record.owner}) ended without running {record.thaw_action}"
                break
            try:
                readable, _, _ = select.select(watched, [], [], min(left, 1.0))
            except InterruptedError:
                continue
            if listener in readable:
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(30)
                    try:
                        if _peer_is_root(connection) and ride.hand_over(connection, locks):
                            listener.close()
                            os.unlink(path)
                            return 0
                    except OSError:
                        pass
            if owner is not None and owner in readable:
                why = (
                    f"backupninja ({record.owner}) ended without running {record.thaw_action} "
                    "(a Halt, a kill, or a later action file with bad permissions)"
                )
    finally:
        if owner is not None:
            os.close(owner)
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return _thaw_alone(view, locks, why)


def _peer_is_root(connection: socket.socket) -> bool:
    import struct

    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid == 0


def _thaw_alone(view: str, locks: dict[str, int], why: str) -> int:
    from backupninja_kvm.hypervisor import Hypervisor

    record = ride.read(view)
    if record is None:
        return 0
    handler = LogfileHandler(record.logfile)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    torn = "max_frozen" in why
    log.log(
        logging.ERROR if torn else logging.WARNING,
        "guard %s: %s; merging %s back now%s",
        os.getpid(),
        why,
        ", ".join(d.name for d in record.domains),
        ": a ship action still reading the view makes a torn copy" if torn else "",
    )
    fatal = False
    try:
        hypervisor = Hypervisor(record.uri)
    except HypervisorError as error:
        log.critical(
            "guard: %s; %s are still frozen: run `backupninja-kvm recover`",
            error,
            ", ".join(d.name for d in record.domains),
        )
        fatal = True
    else:
        try:
            _errors, fatal = thaws.thaw_ride(
                hypervisor,
                record,
                thaws.options_of(record),
                wait=READER_GRACE,
                why=" by the guard",
            )
        finally:
            hypervisor.close()
    ride.write(replace(record, state=ride.THAWED, report=tuple(handler.lines)))
    for uuid, fd in locks.items():
        lock.release(fd, uuid)
    return 2 if fatal else 0
