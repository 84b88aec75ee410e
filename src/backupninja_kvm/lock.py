"""Per-domain locks, so that two actions (or an action and a manual run) never
work on the same VM at once.

A lock is an ``flock`` on ``LOCK_DIR/UUID.lock``: the kernel releases it when
its holder exits, however it exits, so a crash never leaves a stale lock.
The file names the holder for the message the next one prints.

The holder removes the file on release, while it still holds the lock, so
that the folder does not keep one file per domain ever backed up. Someone
who opened the file just before may then lock an inode that no longer has
that name: after taking the lock we check that the path still names the
locked inode, and start again on the new file otherwise.
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


def _still_named(fd: int, path: str) -> bool:
    """True when *path* is the file open as *fd* (not removed or replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _acquire(name: str, path: str) -> int:
    """Open and flock *path*; returns the descriptor. Raises DomainError
    naming the holder when another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise DomainError(
                f"{name}: cannot open the lock file {path}: {error.strerror}; skipped"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DomainError(
                f"{name}: another backup holds this domain's lock ({holder}); skipped"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _still_named(fd, path):
            return fd
        os.close(fd)  # its holder removed it as we opened it: take the new file


@contextmanager
def domain_lock(name: str, uuid: str) -> Iterator[None]:
    """Hold the lock of one domain, or raise DomainError naming its holder."""
    fd = acquire(name, uuid)
    try:
        yield
    finally:
        release(fd, uuid)


def acquire(name: str, uuid: str) -> int:
    """Take the lock of one domain and return its descriptor (for
    ``release``), or raise DomainError naming its holder. stage = freeze
    hands the descriptors on to its guard, and the guard to the thaw: a
    flock belongs to the open file, so it moves with the descriptor."""
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    fd = _acquire(name, lock_path(uuid))
    try:
        describe(fd, " ".join(sys.argv))
    except BaseException:
        os.close(fd)
        raise
    return fd


def describe(fd: int, what: str) -> None:
    """Say in the lock file who holds it now (what ``holder`` shows)."""
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {what}, since {since}\n".encode(), 0)


def release(fd: int, uuid: str) -> None:
    """Give up a lock taken with ``acquire`` (or handed over)."""
    path = lock_path(uuid)
    try:
        if _still_named(fd, path):
            os.unlink(path)  # still holding the lock: see the module's docstring
    except OSError:
        pass
    os.close(fd)  # releases the flock


def holder(uuid: str) -> str | None:
    """Who holds the lock of one domain ("pid N: ..., since ..."), None when
    nobody does.

    Read from /proc/locks, without taking the lock: even a shared flock for a
    moment would make a backup starting then skip the domain.
    """
    path = lock_path(uuid)
    try:
        status = os.stat(path)
        with open("/proc/locks") as handle:
            table = handle.read()
    except OSError:
        return None
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            try:
                with open(path) as handle:
                    text = handle.read().strip()
            except OSError:
                text = ""
            return text or f"pid {fields[4]}"
    return None
