"""The qcow2 bitmap reader, on real images that qemu-img and qemu-io made
(offline qemu-io opens through QEMU's block layer: an enabled persistent
bitmap records its writes and is stored when it closes)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import pytest

from backupninja_kvm import bitmaps
from backupninja_kvm.bitmaps import BitmapError

K, M = 1024, 1024 * 1024


def qemu_img(*args) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(path, *commands) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(64 * M + 12800))
    return path


def test_the_extents_are_the_writes_rounded_to_the_granularity(image):
    qemu_img("bitmap", "--add", str(image), "b1")
    qemu_io(
        image,
        "write -P 0x55 3M 1M",
        "write -z 10M 64k",
        "write 20M 4k",  # rounds to one 64 KiB granule
        "write 30M 70k",  # two granules
        "write 67108864 512",  # the last, partial granule
    )
    granularity, extents = bitmaps.dirty_extents(str(image), "b1")
    assert granularity == 64 * K
    assert extents == [
        (3 * M, M),
        (10 * M, 64 * K),
        (20 * M, 64 * K),
        (30 * M, 128 * K),
        (64 * M, 12800),  # clipped to the virtual size (512-byte multiple)
    ]


def test_each_bitmap_has_its_own_extents_and_granularity(image):
    qemu_img("bitmap", "--add", str(image), "early")
    qemu_io(image, "write 1M 4k")
    qemu_img("bitmap", "--add", "-g", "4M", str(image), "late")
    qemu_io(image, "write 9M 4k")
    assert bitmaps.dirty_extents(str(image), "early") == (64 * K, [(M, 64 * K), (9 * M, 64 * K)])
    assert bitmaps.dirty_extents(str(image), "late") == (4 * M, [(8 * M, 4 * M)])
    found = {b.name: b for b in bitmaps.bitmaps(str(image))}
    info = json.loads(qemu_img("info", "--output=json", str(image)))
    listed = info["format-specific"]["data"]["bitmaps"]
    assert {b["name"]: b["granularity"] for b in listed} == {
        n: b.granularity for n, b in found.items()
    }
    assert all(b.auto and not b.in_use for b in found.values())


def test_a_disabled_bitmap_records_nothing_and_is_not_trusted(image):
    qemu_img("bitmap", "--add", "--disable", str(image), "off")
    qemu_io(image, "write 1M 4k")
    (bitmap,) = bitmaps.bitmaps(str(image))
    assert not bitmap.auto
    with pytest.raises(BitmapError, match="disabled"):  # it missed the write above
        bitmaps.dirty_extents(str(image), "off")


def test_an_image_without_bitmaps_has_none_and_a_missing_one_is_named(image):
    assert bitmaps.bitmaps(str(image)) == []
    with pytest.raises(BitmapError, match="no bitmap 'bnkvm-x'"):
        bitmaps.dirty_extents(str(image), "bnkvm-x")


def test_files_that_cannot_hold_bitmaps_are_refused(tmp_path):
    old = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(old), "1M")
    with pytest.raises(BitmapError, match="compat 0.10"):
        bitmaps.bitmaps(str(old))
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(BitmapError, match="not a qcow2 image"):
        bitmaps.bitmaps(str(raw))
    with pytest.raises(BitmapError, match="cannot read"):
        bitmaps.bitmaps(str(tmp_path / "gone.qcow2"))


def _directory(path) -> tuple[int, int]:
    """(offset, size) of the image's bitmap directory, from its header."""
    with open(path, "rb") as handle:
        data = handle.read(64 * K)
    offset = struct.unpack(">I", data[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", data[offset : offset + 8])
        if kind == bitmaps.BITMAPS_EXTENSION:
            _, _, size, directory = struct.unpack(">IIQQ", data[offset + 8 : offset + 32])
            return directory, size
        offset += 8 + ((length + 7) & ~7)


def test_a_bitmap_in_use_is_not_trusted(image, tmp_path):
    qemu_img("bitmap", "--add", str(image), "b1")
    qemu_io(image, "write 1M 4k")
    crashed = tmp_path / "crashed.qcow2"
    shutil.copy(image, crashed)
    directory, _ = _directory(crashed)
    with open(crashed, "r+b") as handle:  # as QEMU leaves it when it is killed
        handle.seek(directory + 12)
        flags = struct.unpack(">I", handle.read(4))[0]
        handle.seek(directory + 12)
        handle.write(struct.pack(">I", flags | bitmaps.IN_USE))
    (bitmap,) = bitmaps.bitmaps(str(crashed))
    assert bitmap.in_use
    with pytest.raises(BitmapError, match="in use"):
        bitmaps.dirty_extents(str(crashed), "b1")


def test_a_corrupt_directory_is_an_error_not_a_traceback(image):
    qemu_img("bitmap", "--add", str(image), "b1")
    with open(image, "r+b") as handle:
        data = handle.read(64 * K)
        offset = struct.unpack(">I", data[100:104])[0]
        while struct.unpack(">I", data[offset : offset + 4])[0] != bitmaps.BITMAPS_EXTENSION:
            offset += 8 + ((struct.unpack(">I", data[offset + 4 : offset + 8])[0] + 7) & ~7)
        handle.seek(offset + 8 + 16)
        handle.write(struct.pack(">Q", 1 << 50))  # the directory, far past the end
    with pytest.raises(BitmapError, match="out of bounds"):
        bitmaps.bitmaps(str(image))


def test_an_all_ones_table_entry_marks_its_whole_range(image):
    qemu_img("bitmap", "--add", str(image), "b1")
    qemu_io(image, "write 1M 4k")
    directory, _ = _directory(image)
    with open(image, "r+b") as handle:
        handle.seek(directory)
        table = struct.unpack(">Q", handle.read(8))[0]
        handle.seek(table)
        handle.write(struct.pack(">Q", 1))  # no cluster, all ones
    assert bitmaps.dirty_extents(str(image), "b1") == (64 * K, [(0, 64 * M + 12800)])


def test_a_terabyte_disk_is_read_from_its_few_set_bits(tmp_path):
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "1T")
    qemu_img("bitmap", "--add", str(big), "b1")
    qemu_io(big, "write 0 4k", "write 500G 1M", "write 1099511562240 4k")
    granularity, extents = bitmaps.dirty_extents(str(big), "b1")
    assert extents == [(0, 64 * K), (500 * 1024 * M, M), (1024 * 1024 * M - 64 * K, 64 * K)]


def test_bitmaps_that_a_program_unaware_of_them_left_are_not_trusted(image):
    qemu_img("bitmap", "--add", str(image), "b1")
    qemu_io(image, "write 1M 4k")
    with open(image, "r+b") as handle:  # what such a program does: clear the autoclear bits
        handle.seek(88)
        handle.write(struct.pack(">Q", 0))
    with pytest.raises(BitmapError, match="marked inconsistent"):
        bitmaps.dirty_extents(str(image), "b1")
