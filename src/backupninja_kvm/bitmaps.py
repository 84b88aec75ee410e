"""Read the persistent dirty bitmaps of a qcow2 image, without QEMU.

A libvirt checkpoint is a persistent dirty bitmap in each disk's qcow2
image (named after the checkpoint): one bit per ``granularity`` bytes of
the guest's disk, set when QEMU writes there. QEMU keeps the bitmaps in
memory while it has the image open read-write and writes them into the
file when it closes it or makes it read-only: which it does at the external
snapshot, so the frozen base holds them, exact as of the freeze, while the
domain runs on its overlay. Read only such a file (frozen or offline): the
bitmaps in an image QEMU writes are stale and flagged ``in_use``.

The format is QEMU's ``docs/interop/qcow2.txt``, "Bitmaps extension":
header extension 0x23852875 -> bitmap directory -> per bitmap a table of
8-byte entries, each the offset of one cluster of bits (least significant
bit first), or 0 for a cluster of zeros (ones, when bit 0 of the entry is
set). Every offset and size is checked against the file before it is used.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from backupninja_kvm.errors import BackupNinjaKvmError

MAGIC = b"QFI\xfb"
BITMAPS_EXTENSION = 0x23852875
IN_USE = 1 << 0
AUTO = 1 << 1
EXTRA_DATA_COMPATIBLE = 1 << 2
KNOWN_FLAGS = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE
AUTOCLEAR_BITMAPS = 1 << 0  # the header's autoclear bit: the bitmaps extension is consistent
DIRTY_TRACKING = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
MAX_BITMAPS = 65535
MAX_DIRECTORY = 64 * 1024 * 1024
_NOT_ZERO = re.compile(rb"[^\x00]+")


class BitmapError(BackupNinjaKvmError):
    """A bitmap cannot be read or trusted; the message names file and bitmap."""


@dataclass(frozen=True)
class Bitmap:
    name: str
    granularity: int  # bytes of the guest's disk per bit
    in_use: bool  # QEMU did not close it cleanly (killed): not to be trusted
    auto: bool  # it was recording
    kind: int = DIRTY_TRACKING
    flags: int = 0
    table_offset: int = 0
    table_size: int = 0  # entries
    extra_data: int = 0  # bytes of extra data in its directory entry


@dataclass(frozen=True)
class _Image:
    cluster_size: int
    virtual_size: int
    file_size: int
    consistent: bool = True  # autoclear bit 0: no program unaware of bitmaps changed it


def bitmaps(path: str) -> list[Bitmap]:
    """The bitmaps stored in the qcow2 image *path*; [] when it has none."""
    fd = _open(path)
    try:
        return _read_directory(fd, path)[1]
    except OSError as error:
        raise BitmapError(f"cannot read {path}: {error.strerror}") from None
    finally:
        os.close(fd)


def dirty_extents(path: str, name: str) -> tuple[int, list[tuple[int, int]]]:
    """(granularity, [(offset, length), ...]): the parts of the guest's disk
    that bitmap *name* of *path* marks, sorted and merged, the last one
    ending at the disk's size. BitmapError when it is missing or cannot be
    trusted."""
    fd = _open(path)
    try:
        image, found = _read_directory(fd, path)
        bitmap = next((b for b in found if b.name == name), None)
        if bitmap is None:
            raise BitmapError(f"{path}: no bitmap {name!r} (it has {_names(found)})")
        if not bitmap.auto:
            raise BitmapError(
                f"{path}: bitmap {name!r} is disabled: it stopped recording, so it may miss writes"
            )
        if bitmap.in_use:
            raise BitmapError(
                f"{path}: bitmap {name!r} is in use: QEMU did not store it cleanly "
                f"(killed or crashed), so what it marks cannot be trusted"
            )
        if bitmap.kind != DIRTY_TRACKING:
            raise BitmapError(
                f"{path}: bitmap {name!r} is of type {bitmap.kind}, not dirty tracking"
            )
        if bitmap.flags & ~KNOWN_FLAGS:
            raise BitmapError(f"{path}: bitmap {name!r} has unknown flags {bitmap.flags:#x}")
        if bitmap.extra_data and not bitmap.flags & EXTRA_DATA_COMPATIBLE:
            raise BitmapError(f"{path}: bitmap {name!r} has extra data this reader does not know")
        if not image.consistent:
            raise BitmapError(
                f"{path}: its bitmaps are marked inconsistent (a program that does not know "
                f"bitmaps changed the image), so what bitmap {name!r} marks cannot be trusted"
            )
        return bitmap.granularity, _extents(fd, path, image, bitmap)
    except OSError as error:
        raise BitmapError(f"cannot read {path}: {error.strerror}") from None
    finally:
        os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as error:
        raise BitmapError(f"cannot read {path}: {error.strerror}") from None


def _pread(fd: int, path: str, size: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise BitmapError(f"{path}: its {what} at {offset} is past the end of the file")
    return data


def _read_directory(fd: int, path: str) -> tuple[_Image, list[Bitmap]]:
    file_size = os.fstat(fd).st_size
    header = os.pread(fd, 112, 0)
    if len(header) < 72 or header[:4] != MAGIC:
        raise BitmapError(f"{path}: not a qcow2 image")
    version = struct.unpack(">I", header[4:8])[0]
    if version < 3:
        raise BitmapError(f"{path}: qcow2 version {version} (compat 0.10) cannot hold bitmaps")
    if len(header) < 104:
        raise BitmapError(f"{path}: its qcow2 header is cut short")
    cluster_bits = struct.unpack(">I", header[20:24])[0]
    if not 9 <= cluster_bits <= 21:
        raise BitmapError(f"{path}: cluster size 2^{cluster_bits} is not one qcow2 allows")
    virtual_size = struct.unpack(">Q", header[24:32])[0]
    header_length = struct.unpack(">I", header[100:104])[0]
    autoclear = struct.unpack(">Q", header[88:96])[0]
    image = _Image(1 << cluster_bits, virtual_size, file_size, bool(autoclear & AUTOCLEAR_BITMAPS))
    offset = header_length
    limit = min(image.cluster_size, file_size)
    while offset + 8 <= limit:
        kind, length = struct.unpack(">II", _pread(fd, path, 8, offset, "header extension"))
        if kind == 0:
            break
        if offset + 8 + length > limit:
            raise BitmapError(f"{path}: header extension {kind:#x} runs past the header")
        if kind == BITMAPS_EXTENSION:
            if length < 24:
                raise BitmapError(f"{path}: its bitmaps extension is cut short")
            data = _pread(fd, path, 24, offset + 8, "bitmaps extension")
            count, _, size, directory = struct.unpack(">IIQQ", data)
            return image, _parse_directory(fd, path, image, count, size, directory)
        offset += 8 + ((length + 7) & ~7)
    return image, []


def _parse_directory(
    fd: int, path: str, image: _Image, count: int, size: int, offset: int
) -> list[Bitmap]:
    if count > MAX_BITMAPS or size > MAX_DIRECTORY or offset + size > image.file_size:
        raise BitmapError(f"{path}: its bitmap directory ({count} entries) is out of bounds")
    data = _pread(fd, path, size, offset, "bitmap directory")
    found: list[Bitmap] = []
    position = 0
    for _ in range(count):
        if position + 24 > size:
            raise BitmapError(f"{path}: its bitmap directory is cut short")
        table, entries, flags, kind, granularity_bits, name_size, extra = struct.unpack(
            ">QIIBBHI", data[position : position + 24]
        )
        start = position + 24 + extra
        if start + name_size > size or not 9 <= granularity_bits <= 31:
            raise BitmapError(f"{path}: bitmap directory entry {len(found) + 1} is corrupt")
        name = data[start : start + name_size].decode("utf-8", "replace")
        found.append(
            Bitmap(
                name,
                1 << granularity_bits,
                bool(flags & IN_USE),
                bool(flags & AUTO),
                kind,
                flags,
                table & OFFSET_MASK,
                entries,
                extra,
            )
        )
        position = (start + name_size + 7) & ~7
    return found


def _extents(fd: int, path: str, image: _Image, bitmap: Bitmap) -> list[tuple[int, int]]:
    bits_per_cluster = image.cluster_size * 8
    bits = -(-image.virtual_size // bitmap.granularity)
    needed = -(-bits // bits_per_cluster)
    if bitmap.table_size < needed or bitmap.table_offset + 8 * needed > image.file_size:
        raise BitmapError(f"{path}: the table of bitmap {bitmap.name!r} is out of bounds")
    table = struct.unpack(
        f">{needed}Q", _pread(fd, path, 8 * needed, bitmap.table_offset, "bitmap table")
    )
    runs: list[list[int]] = []  # [first bit, end bit]

    def add(first: int, end: int) -> None:
        end = min(end, bits)
        if first >= end:
            return
        if runs and runs[-1][1] == first:
            runs[-1][1] = end
        else:
            runs.append([first, end])

    for index, entry in enumerate(table):
        base = index * bits_per_cluster
        offset = entry & OFFSET_MASK
        if offset == 0:
            if entry & 1:
                add(base, base + bits_per_cluster)
            continue
        if offset + image.cluster_size > image.file_size:
            raise BitmapError(f"{path}: bitmap {bitmap.name!r} points past the end of the file")
        data = os.pread(fd, image.cluster_size, offset)
        for match in _NOT_ZERO.finditer(data):
            _add_bits(data, match.start(), match.end(), base, add)
    return [(first * bitmap.granularity, _length(first, end, bitmap, image)) for first, end in runs]


def _add_bits(data: bytes, start: int, end: int, base: int, add) -> None:
    """Add the set bits of data[start:end] (no zero byte in it): whole 0xff
    bytes as one run, the others bit by bit."""
    index = start
    while index < end:
        byte = data[index]
        if byte == 0xFF:
            run_end = index
            while run_end < end and data[run_end] == 0xFF:
                run_end += 1
            add(base + index * 8, base + run_end * 8)
            index = run_end
            continue
        for bit in range(8):
            if byte >> bit & 1:
                add(base + index * 8 + bit, base + index * 8 + bit + 1)
        index += 1


def _length(first: int, end: int, bitmap: Bitmap, image: _Image) -> int:
    return min(end * bitmap.granularity, image.virtual_size) - first * bitmap.granularity


def _names(found: list[Bitmap]) -> str:
    return ", ".join(repr(b.name) for b in found) or "none"
