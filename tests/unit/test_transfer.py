"""Sparse copies of frozen images: same bytes, holes stay holes, clear errors."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from backupninja_kvm.errors import TransferError
from backupninja_kvm.transfer import RsyncStats, copy_sparse, data_extents

MiB = 1024 * 1024
SIZE = 64 * MiB
DATA_AT = (8 * MiB, 40 * MiB)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def same_bytes(first: Path, second: Path) -> bool:
    """Byte for byte, reading everything (holes included)."""
    with open(first, "rb") as a, open(second, "rb") as b:
        while True:
            chunk = a.read(256 * 1024)
            if chunk != b.read(256 * 1024):
                return False
            if not chunk:
                return True


def extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def same_sparse_content(source: Path, copy: Path) -> bool:
    """Same bytes, checked cheaply: same size, the copy has data only where the source
    has, and the same data there (holes read as zeros on both sides)."""
    if os.stat(source).st_size != os.stat(copy).st_size:
        return False
    wanted = extents(source)
    if not all(any(s <= o and o + n <= s + m for s, m in wanted) for o, n in extents(copy)):
        return False
    with open(source, "rb") as a, open(copy, "rb") as b:
        for offset, length in wanted:
            a.seek(offset)
            b.seek(offset)
            if a.read(length) != b.read(length):
                return False
    return True


@pytest.fixture
def sparse_image(tmp_path) -> Path:
    """A 64 MiB image with 1 MiB of data at 8 MiB and at 40 MiB, holes elsewhere."""
    path = tmp_path / "web1.img"
    with open(path, "wb") as image:
        image.truncate(SIZE)
        for offset in DATA_AT:
            image.seek(offset)
            image.write(os.urandom(MiB))
    return path


def test_a_sparse_copy_has_the_same_bytes_and_size(sparse_image, tmp_path):
    target = tmp_path / "vda-web1.img"

    copy_sparse(str(sparse_image), str(target))

    assert os.stat(target).st_size == SIZE
    assert same_bytes(sparse_image, target)


def test_holes_stay_holes(sparse_image, tmp_path):
    target = tmp_path / "vda-web1.img"

    copy_sparse(str(sparse_image), str(target))

    assert allocated(target) <= allocated(sparse_image) + MiB
    assert allocated(target) < SIZE // 8


def test_the_copy_returns_the_bytes_of_data_copied(sparse_image, tmp_path):
    copied = copy_sparse(str(sparse_image), str(tmp_path / "vda-web1.img"))

    assert 2 * MiB <= copied < SIZE


def test_progress_reports_the_running_total(sparse_image, tmp_path):
    seen: list[int] = []

    copied = copy_sparse(str(sparse_image), str(tmp_path / "copy.img"), progress=seen.append)

    assert seen, "progress was never reported"
    assert seen == sorted(seen)
    assert seen[-1] == copied


def test_data_extents_skip_the_holes(sparse_image):
    fd = os.open(sparse_image, os.O_RDONLY)
    try:
        found = list(data_extents(fd, SIZE))
    finally:
        os.close(fd)

    assert found == [(offset, MiB) for offset in DATA_AT]


def test_the_copy_has_data_exactly_where_the_source_has(sparse_image, tmp_path):
    target = tmp_path / "copy.img"

    copy_sparse(str(sparse_image), str(target))

    assert extents(target) == extents(sparse_image)


def test_an_image_of_holes_only_copies_as_holes(tmp_path):
    source = tmp_path / "empty.qcow2"
    with open(source, "wb") as image:
        image.truncate(16 * MiB)
    target = tmp_path / "copy.qcow2"

    copied = copy_sparse(str(source), str(target))

    assert copied == 0
    assert os.stat(target).st_size == 16 * MiB
    assert allocated(target) == 0
    assert target.read_bytes() == bytes(16 * MiB)


def test_an_empty_file_copies_as_an_empty_file(tmp_path):
    source = tmp_path / "zero.img"
    source.write_bytes(b"")

    assert copy_sparse(str(source), str(tmp_path / "copy.img")) == 0
    assert (tmp_path / "copy.img").read_bytes() == b""


def test_a_file_without_holes_copies_whole(tmp_path):
    source = tmp_path / "small.img"
    data = os.urandom(3 * MiB + 17)  # ends off a block boundary
    source.write_bytes(data)

    copied = copy_sparse(str(source), str(tmp_path / "copy.img"))

    assert copied == len(data)
    assert (tmp_path / "copy.img").read_bytes() == data


def test_the_copy_is_readable_by_its_owner_only(sparse_image, tmp_path):
    target = tmp_path / "copy.img"

    copy_sparse(str(sparse_image), str(target))

    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_an_existing_target_is_never_overwritten(sparse_image, tmp_path):
    target = tmp_path / "vda-web1.img"
    target.write_bytes(b"an earlier copy")

    with pytest.raises(TransferError) as info:
        copy_sparse(str(sparse_image), str(target))

    assert str(target) in str(info.value)
    assert "exists" in str(info.value)
    assert target.read_bytes() == b"an earlier copy"


def test_a_missing_source_is_named(tmp_path):
    source = tmp_path / "gone.qcow2"
    target = tmp_path / "copy.qcow2"

    with pytest.raises(TransferError) as info:
        copy_sparse(str(source), str(target))

    assert str(source) in str(info.value)
    assert "No such file" in str(info.value)
    assert not target.exists()


def test_a_missing_target_folder_is_named(sparse_image, tmp_path):
    target = tmp_path / "no-such-set" / "copy.img"

    with pytest.raises(TransferError) as info:
        copy_sparse(str(sparse_image), str(target))

    assert str(target) in str(info.value)


@pytest.mark.parametrize(
    "refusal",
    [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL],
    ids=errno.errorcode.get,
)
def test_without_copy_file_range_the_copy_falls_back_to_read_and_write(
    sparse_image, tmp_path, monkeypatch, refusal
):
    def refuse(*args):
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    target = tmp_path / "copy.img"

    copied = copy_sparse(str(sparse_image), str(target))

    assert copied == 2 * MiB
    assert same_sparse_content(sparse_image, target)
    assert allocated(target) < SIZE // 8


def test_a_failed_copy_names_both_files_and_leaves_no_partial_target(
    sparse_image, tmp_path, monkeypatch
):
    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", fail)
    target = tmp_path / "copy.img"

    with pytest.raises(TransferError) as info:
        copy_sparse(str(sparse_image), str(target))

    message = str(info.value)
    assert str(sparse_image) in message and str(target) in message
    assert "Input/output error" in message
    assert not target.exists()


def test_a_source_that_shrinks_during_the_copy_is_an_error(sparse_image, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # end of file reached early
    target = tmp_path / "copy.img"

    with pytest.raises(TransferError) as info:
        copy_sparse(str(sparse_image), str(target))

    assert "ended early" in str(info.value)
    assert not target.exists()


def test_rsync_stats_are_read_with_or_without_digit_separators():
    output = """
Number of files: 1 (reg: 1)
Number of regular files transferred: 1
Total file size: 67,108,864 bytes
Total transferred file size: 67,108,864 bytes
Literal data: 1,048,576 bytes
Matched data: 66,060,288 bytes
File list size: 0
Total bytes sent: 1,110,123
Total bytes received: 35
"""
    assert RsyncStats.parse(output) == RsyncStats(1_048_576, 66_060_288, 1_110_123)
    plain = "Literal data: 5 bytes\nMatched data: 0 bytes\nTotal bytes sent: 99\n"
    assert RsyncStats.parse(plain) == RsyncStats(5, 0, 99)
    assert RsyncStats.parse("") == RsyncStats(0, 0, 0)


def test_ssh_shares_a_connection_in_a_private_folder_and_sshoptions_still_win():
    from backupninja_kvm import transfer

    remote = transfer.Remote("backup.example.org", options=("-o", "ControlMaster=no"))
    argv = remote._ssh()
    try:
        [path] = [a.split("=", 1)[1] for a in argv if a.startswith("ControlPath=")]
        folder = os.path.dirname(path)
        assert (
            stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and os.stat(folder).st_uid == os.getuid()
        )
        assert "ControlMaster=auto" in argv and "ControlPersist=60" in argv
        # ssh takes the first value of an option: the user's, except BatchMode.
        assert argv.index("BatchMode=yes") < argv.index("ControlMaster=no")
        assert argv.index("ControlMaster=no") < argv.index("ControlMaster=auto")
    finally:
        transfer.close_connections()
    assert not os.path.exists(folder)
    transfer.close_connections()  # idempotent


def test_the_socket_folder_leaves_room_for_sshs_temporary_name(monkeypatch):
    from backupninja_kvm import transfer

    # A TMPDIR of 36 characters makes mkdtemp's folder 55 long: ssh's
    # PATH.XXXXXXXXXXXXXXXX would pass 107 bytes there.
    deep = tempfile.mkdtemp(prefix="bnkvm-sock-test-", dir="/tmp")
    deep_enough = deep + "d" * (36 - len(deep))
    os.rename(deep, deep_enough)
    monkeypatch.setattr(tempfile, "tempdir", deep_enough)
    try:
        argv = transfer.Remote("backup.example.org")._ssh()
        [path] = [a.split("=", 1)[1] for a in argv if a.startswith("ControlPath=")]
        socket = path.replace("%C", "c" * 40)
        assert len(socket) + len(".XXXXXXXXXXXXXXXX") <= 107, socket
    finally:
        transfer.close_connections()
        shutil.rmtree(deep_enough, ignore_errors=True)


def test_a_destination_that_stops_answering_is_given_up():
    from backupninja_kvm import transfer

    argv = transfer.Remote("backup.example.org")._ssh()
    transfer.close_connections()
    assert "ServerAliveInterval=15" in argv and "ServerAliveCountMax=4" in argv
