"""Copying frozen images to the destination.

For a local destination we copy only the allocated extents of the image
(``SEEK_DATA``/``SEEK_HOLE``) with ``copy_file_range``, so the kernel moves
the bytes and holes stay holes; measured faster than rsync for local copies.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

from backupninja_kvm.errors import TransferError

CHUNK = 64 * 1024 * 1024


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
