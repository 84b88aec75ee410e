"""Per-domain locks, so that two actions (or an action and a manual run) never
work on the same VM at once.

A lock is an ``flock`` on ``LOCK_DIR/UUID.lock``: the kernel releases it when
its holder exits, however it exits, so a crash never leaves a stale lock.
The file names the holder for the message the next one prints.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from backupninja_kvm.errors import DomainError

LOCK_DIR = os.environ.get("BACKUPNINJA_KVM_LOCK_DIR", "/run/backupninja-kvm")


def lock_path(uuid: str) -> str:
    return os.path.join(LOCK_DIR, f"{uuid}.lock")


@contextmanager
def domain_lock(name: str, uuid: str) -> Iterator[None]:
    """Hold the lock of one domain, or raise DomainError naming its holder."""
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    path = lock_path(uuid)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise DomainError(
                f"{name}: another backup holds this domain's lock ({holder}); skipped"
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}, since {since}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def holder(uuid: str) -> str | None:
    """Who holds the domain's lock (its description), or None when it is free.

    Only looks: a shared flock taken and dropped at once, nothing written.
    """
    try:
        fd = os.open(lock_path(uuid), os.O_RDONLY)
    except OSError:
        return None  # never locked since boot
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
