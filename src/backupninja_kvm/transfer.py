"""Copying frozen images to the destination.

For a local destination we copy only the allocated extents of the image
(``SEEK_DATA``/``SEEK_HOLE``) with ``copy_file_range``, so the kernel moves
the bytes and holes stay holes; measured faster than rsync for local copies.
A block device (an LVM volume, a partition) shows all of itself as data to
``SEEK_DATA``: it is read in chunks, and every all-zero block becomes a hole
of the raw image file.

A remote destination is reached with ssh; every ssh and rsync of a run to
one host shares one connection (ControlMaster), closed at the end of the run.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backupninja_kvm.errors import TransferError

CHUNK = 64 * 1024 * 1024
DEVICE_CHUNK = 4 * 1024 * 1024  # read from a device at a time
ZERO_BLOCK = 64 * 1024  # the smallest hole made in a device's copy
_ZEROS = bytes(DEVICE_CHUNK)


def is_block_device(path: str) -> bool:
    """True when *path* is (or links to) a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_size(path: str) -> int:
    """Size in bytes of a block device (``fstat`` says 0 for one)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, prefix: str) -> None:
    """Make *path* hold *data*, whole or not at all: written to a new private
    file (mkstemp in the same folder, named *prefix*..., never through a
    link), synced, then renamed over *path*; the temporary file is removed
    on any failure. Raises OSError."""
    fd, temporary = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent of an open file, holes skipped."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def _copy_range(
    source: int, target: int, offset: int, length: int, copied: Callable[[int], None]
) -> None:
    done = 0
    while done < length:
        step = min(CHUNK, length - done)
        try:
            count = os.copy_file_range(source, target, step, offset + done, offset + done)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            count = _copy_with_buffer(source, target, offset + done, step)
        if count == 0:  # the source shrank under us
            raise OSError(errno.EIO, "source file ended early")
        done += count
        copied(count)


def _copy_device(
    source: int, target: int, size: int, progress: Callable[[int], None] | None
) -> int:
    """Copy a block device's *size* bytes into the new file *target*, an
    all-zero ZERO_BLOCK left as a hole (the file is truncated to *size*
    afterwards). Reports the bytes read to *progress*; returns the bytes
    written."""
    written = 0
    offset = 0
    while offset < size:
        data = os.pread(source, min(DEVICE_CHUNK, size - offset), offset)
        if not data:
            raise OSError(errno.EIO, "device ended early")
        if data != _ZEROS[: len(data)]:
            start = None  # of the run of non-zero blocks being gathered
            for position in range(0, len(data) + ZERO_BLOCK, ZERO_BLOCK):
                block = data[position : position + ZERO_BLOCK]
                zero = not block or block == _ZEROS[: len(block)]
                if not zero and start is None:
                    start = position
                elif zero and start is not None:
                    written += _write_all(target, data[start:position], offset + start)
                    start = None
        offset += len(data)
        if progress:
            progress(offset)
    return written


def _write_all(target: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(target, view[done:], offset + done)
    return done


def _copy_with_buffer(source: int, target: int, offset: int, length: int) -> int:
    data = os.pread(source, length, offset)
    return os.pwrite(target, data, offset) if data else 0


def copy_sparse(
    source_path: str, target_path: str, progress: Callable[[int], None] | None = None
) -> int:
    """Copy *source_path* to a new file *target_path*, keeping holes.

    Returns the number of bytes of data copied. Raises TransferError naming
    both files; a partly written target is removed.
    """
    try:
        source = os.open(source_path, os.O_RDONLY)
    except OSError as error:
        raise TransferError(f"cannot read {source_path}: {error.strerror}") from None
    try:
        try:
            target = os.open(target_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise TransferError(f"cannot create {target_path}: {error.strerror}") from None
        copied = 0

        def count(step: int) -> None:
            nonlocal copied
            copied += step
            if progress:
                progress(copied)

        try:
            if stat.S_ISBLK(os.fstat(source).st_mode):
                size = os.lseek(source, 0, os.SEEK_END)
                copied = _copy_device(source, target, size, progress)
            else:
                size = os.fstat(source).st_size
                for offset, length in data_extents(source, size):
                    _copy_range(source, target, offset, length, count)
            os.ftruncate(target, size)
        except OSError as error:
            os.close(target)
            target = -1
            _remove_quietly(target_path)
            raise TransferError(
                f"copy of {source_path} to {target_path} failed: {error.strerror}"
            ) from None
        finally:
            if target >= 0:
                os.close(target)
        return copied
    finally:
        os.close(source)


def sync_file(path: str) -> None:
    """Flush a written file to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def data_bytes(path: str) -> int:
    """Bytes of data (holes left out) in a file; a block device's size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return sum(length for _, length in data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


CONTROL_PERSIST = 60  # seconds an idle shared ssh connection stays open
MAX_CONTROL_DIR = 107 - 17 - 1 - 40
# A destination that stops answering must not keep a VM on its overlay for
# ever: ssh gives up after SERVER_ALIVE_INTERVAL * SERVER_ALIVE_COUNT seconds
# without an answer, rsync after RSYNC_TIMEOUT seconds without any I/O.
SERVER_ALIVE_INTERVAL = 15
SERVER_ALIVE_COUNT = 4
RSYNC_TIMEOUT = 600

# The shared ssh connections of this run: their sockets live in a private
# folder (mkdtemp: mode 0700, a name nobody can take first), made on first
# use and removed, with the connections, by close_connections().
_control_dir: str | None = None
_connections: set[tuple[str, ...]] = set()  # ssh argv + destination of each


def _control_path() -> str:
    global _control_dir
    if _control_dir is None:
        _control_dir = tempfile.mkdtemp(prefix="bnkvm-ssh-")
        # A socket path has at most 107 bytes, and ssh binds "PATH.XXXXXXXXXXXXXXXX"
        # (17 more) before renaming it to PATH: the folder, "/" and %C's 40
        # characters must fit in 107 - 17.
        if len(_control_dir) > MAX_CONTROL_DIR:
            os.rmdir(_control_dir)
            _control_dir = tempfile.mkdtemp(prefix="bnkvm-ssh-", dir="/tmp")
        atexit.register(close_connections)
    return os.path.join(_control_dir, "%C")  # %C: a hash of host, port and user


def close_connections() -> None:
    """Close this run's shared ssh connections (``ssh -O exit``) and remove
    their folder. Idempotent; also runs at exit. A run killed with SIGKILL
    leaves its connections, which close after CONTROL_PERSIST idle seconds."""
    global _control_dir
    for argv in sorted(_connections):
        try:
            subprocess.run(
                [*argv[:-1], "-O", "exit", argv[-1]],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass  # the connection closes by itself once idle
    _connections.clear()
    if _control_dir is not None:
        shutil.rmtree(_control_dir, ignore_errors=True)
        _control_dir = None


@dataclass(frozen=True)
class Remote:
    """A destination host reached with ssh; files go there with rsync.

    Commands run on the remote host as ``sh -c SCRIPT sh ARG...``, quoted
    with shlex, so paths never meet a shell unquoted.
    """

    host: str
    user: str = "root"
    port: int = 22
    options: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}"

    def _ssh(self) -> list[str]:
        """ssh's argv up to the destination. The user's options come before
        ours but after BatchMode: for ssh the first value of an option wins,
        so sshoptions may change the timeout or turn connection sharing off
        (``-o ControlMaster=no``), but never ask for a password."""
        argv = [
            "ssh",
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            *self.options,
            "-o",
            "ConnectTimeout=15",
            "-o",
            f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
            "-o",
            f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={_control_path()}",
            "-o",
            f"ControlPersist={CONTROL_PERSIST}",
        ]
        _connections.add((*argv, self.label))
        return argv

    def run(self, script: str, *args: str, stdin: str | None = None) -> str:
        """Run a POSIX shell *script* on the host with positional *args*.

        Raises TransferError with ssh's or the script's message.
        """
        command = shlex.join(["sh", "-c", script, "sh", *args])
        result = subprocess.run(
            [*self._ssh(), self.label, command],
            input=stdin,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TransferError(
                f"{self.label}: {_last_line(result.stderr) or f'exit status {result.returncode}'}",
                result.returncode,
            )
        return result.stdout

    def send(self, source: str, target: str, basis: str | None = None) -> RsyncStats:
        """Copy one local file to *target* on the host with rsync, holes kept.

        With *basis* (a folder on the host, relative to the target's), rsync
        sends only what differs from the file of the same name there (delta
        transfer); without, the whole file. The quick check (size and time)
        is never trusted: a frozen image may match the previous one in both.
        """
        delta = [f"--copy-dest={basis}", "--no-whole-file"] if basis else ["--whole-file"]
        # A block device is sent as its contents (a raw image file there).
        devices = ["--copy-devices"] if is_block_device(source) else []
        result = subprocess.run(
            [
                "rsync",
                *devices,
                "--sparse",
                "--times",
                "--ignore-times",
                "--chmod=F600",
                "--stats",
                f"--timeout={RSYNC_TIMEOUT}",
                *delta,
                "-e",
                shlex.join(self._ssh()),
                source,
                f"{self.label}:{target}",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TransferError(
                f"rsync of {source} to {self.label}:{target} failed "
                f"(exit status {result.returncode}): {_last_line(result.stderr)}",
                result.returncode,
            )
        return RsyncStats.parse(result.stdout)

    def fetch(self, source: str, target: str) -> None:
        """Copy the file *source* on the host to the new local file *target*
        with rsync, holes kept. Raises TransferError."""
        result = subprocess.run(
            [
                "rsync",
                "--sparse",
                "--chmod=F600",
                f"--timeout={RSYNC_TIMEOUT}",
                "-e",
                shlex.join(self._ssh()),
                f"{self.label}:{source}",
                target,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TransferError(
                f"rsync of {self.label}:{source} to {target} failed "
                f"(exit status {result.returncode}): {_last_line(result.stderr)}",
                result.returncode,
            )


@dataclass(frozen=True)
class RsyncStats:
    """What one rsync sent: new data, data found in the basis, bytes on the wire."""

    literal: int
    matched: int
    sent: int

    @classmethod
    def parse(cls, output: str) -> RsyncStats:
        def number(label: str) -> int:
            found = re.search(rf"^{label}: ([\d,.]+)", output, re.MULTILINE)
            return int(re.sub(r"[,.]", "", found.group(1))) if found else 0

        return cls(number("Literal data"), number("Matched data"), number("Total bytes sent"))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
