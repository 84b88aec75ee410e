"""Changed blocks' pure parts: what set.json records, the summary line, the
remote host's file times, the copy of extents between plain files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from backupninja_kvm import changed, setinfo
from backupninja_kvm.outcome import Outcome

M = 1024 * 1024


class PlainFile:
    """A plain file with the calls of a libnbd connection (changed.Device)."""

    def __init__(self, path: str, writable: bool = False) -> None:
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)

    def pread(self, count: int, offset: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def pwrite(self, buf: bytes, offset: int) -> None:
        assert os.pwrite(self.fd, buf, offset) == len(buf)

    def zero(self, count: int, offset: int) -> None:
        self.pwrite(bytes(count), offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def test_tracking_goes_through_set_json_and_old_readers_ignore_it():
    tracking = setinfo.Tracking("changed", 3 * M, 2 * M, "", "bnkvm-a-1", "8:3", "b:4", 9, 10, 2)
    image = setinfo.SetImage(
        "vda-a.qcow2", "vda", "disk", "/a.qcow2", "qcow2", M, tracking=tracking
    )
    info = setinfo.SetInfo("a", "u", "2026-12-02T01:00:00Z", "crash-consistent", (image,))
    again = setinfo.SetInfo.from_json(info.to_json(), "set.json")
    assert again.files[0].tracking == tracking
    with pytest.raises(setinfo.SetInfoError, match="tracking how 'partly'"):
        setinfo.SetInfo.from_json(info.to_json().replace('"changed"', '"partly"'), "set.json")


def test_the_summary_names_the_disks_made_from_changes():
    outcome = Outcome("web1", disks=["vda", "vdb"], bytes_copied=5 * M, merge="commit")
    outcome.changes["vda"] = (4 * M, 3 * M)
    text = outcome.summary()
    assert (
        "5.0 MiB copied (vda changed blocks only: 4.0 MiB read, 3.0 MiB written; vdb whole)" in text
    )


def test_remote_file_times_keep_their_nanoseconds():
    output = "1245240 1796245538.917400292 vda-vda.qcow2\n7 1796245538 plain\nbad line\n"
    assert changed._parse_stats(output) == {
        "vda-vda.qcow2": (1245240, 1796245538917400292),
        "plain": (7, 1796245538000000000),
    }


def test_extents_are_copied_and_zero_blocks_zeroed(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"a" * M + bytes(M) + b"c" * M)
    target.write_bytes(b"x" * 3 * M)
    extents = [(0, 10), (M, M), (2 * M, M)]  # zero blocks are found per chunk of a copy
    frozen, clone = PlainFile(str(source)), PlainFile(str(target), writable=True)
    read, written = changed.apply_extents(frozen, clone, extents)
    data = target.read_bytes()
    assert data == b"a" * 10 + b"x" * (M - 10) + bytes(M) + b"c" * M
    assert (read, written) == (10 + 2 * M, 10 + M)  # the zero block was zeroed, not written
    zeros, _ = changed.apply_extents(frozen, clone, [(M, M)], zeros_as_data=True)
    assert zeros == M
    frozen.close()
    clone.close()


def test_a_short_source_is_an_error_not_a_silent_gap(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"a" * 100)
    target.write_bytes(b"x" * 200)
    frozen, clone = PlainFile(str(source)), PlainFile(str(target), writable=True)
    with pytest.raises(changed.TransferError, match="short read"):
        changed.apply_extents(frozen, clone, [(0, 200)])
    assert os.path.getsize(target) == 200


def test_the_changes_qcow2_is_written_in_whole_clusters():
    assert changed.delta_layout(4096, [(0, 4096), (8192, 4096)], 1 << 20) == (
        4096,
        [(0, 4096), (8192, 4096)],
    )
    # a granularity qcow2 cannot take: rounded out to 64 KiB clusters, merged, clipped
    assert changed.delta_layout(4 * M, [(0, 4 * M)], 5 * M) == (64 * 1024, [(0, 4 * M)])
    assert changed.delta_layout(256, [(100, 10), (70000, 10)], 70005) == (
        64 * 1024,
        [(0, 70005)],  # adjacent once rounded: one extent
    )


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_changes_committed_into_a_clone_leave_its_other_data_alone(tmp_path):
    """The remote path, on this host: a disk with 4 KiB clusters (and so a
    4 KiB granularity) changed in 4 KiB; the changes qcow2 committed into a
    clone of the previous image must give the frozen base, not zeros around
    the change (helper-22's review reproduced that with 64 KiB clusters)."""
    base, clone = tmp_path / "base.qcow2", tmp_path / "vda-vda.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", str(base)],
        check=True,
        capture_output=True,
    )
    shutil.copy(base, clone)  # the previous set's image
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 4k", str(base)],
        check=True,
        capture_output=True,
    )
    changes = tmp_path / "changes.qcow2"

    read, written = changed.write_changes(str(base), clone.name, M, 4096, [(0, 4096)], str(changes))
    _qemu_img("commit", "-q", "-d", "-f", "qcow2", str(changes))

    assert (read, written) == (4096, 4096)
    compared = subprocess.run(["qemu-img", "compare", str(base), str(clone)], capture_output=True)
    assert compared.returncode == 0, compared.stdout


def test_the_sweep_removes_changes_a_killed_run_left_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(changed, "CHANGES_ROOT", str(tmp_path))
    with changed._changes_folder() as alive:  # a run that is still going
        with open(os.path.join(alive, "changes.qcow2"), "wb") as handle:
            handle.write(b"x")
        left = tmp_path / "bnkvm-changes-left"  # its lock released: its run is gone
        left.mkdir()
        (left / ".lock").write_bytes(b"")
        (left / "changes.qcow2").write_bytes(b"y")
        young = tmp_path / "bnkvm-changes-young"  # no lock yet: being made
        young.mkdir()
        old = tmp_path / "bnkvm-changes-old"  # no lock, an hour old: a kill before the lock
        old.mkdir()
        os.utime(old, (1, 1))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "keep").write_bytes(b"z")
        link = tmp_path / "bnkvm-changes-link"  # never followed
        link.symlink_to(elsewhere)
        other = tmp_path / "not-ours"
        other.mkdir()
        changed.sweep_changes(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == sorted(
            [os.path.basename(alive), "bnkvm-changes-young", "elsewhere", link.name, "not-ours"]
        )
        assert os.path.exists(os.path.join(alive, "changes.qcow2"))
        assert (elsewhere / "keep").exists()
    assert not os.path.exists(alive)  # removed once used


def test_the_exports_copy_extents_between_qcow2_images_over_nbd(tmp_path, monkeypatch):
    monkeypatch.setattr(changed, "CHANGES_ROOT", str(tmp_path))
    base, clone = str(tmp_path / "base.qcow2"), str(tmp_path / "clone.qcow2")
    for path, pattern in ((base, 0x5A), (clone, 0x11)):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "8M"], check=True)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 8M", path],
            check=True,
            capture_output=True,
        )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -z 2M 1M", base], check=True, capture_output=True
    )
    with changed._Exports(base, clone) as (frozen, target):
        assert len(os.listdir(tmp_path)) == 3  # the images and the exports' own folder
        read, written = changed.apply_extents(
            frozen, target, [(M, M), (2 * M, M), (6 * M, 64 * 1024)]
        )
    assert (read, written) == (2 * M + 64 * 1024, M + 64 * 1024)
    assert sorted(os.listdir(tmp_path)) == ["base.qcow2", "clone.qcow2"]  # folder removed
    for offset, length, pattern in (
        (0, M, 0x11),
        (M, M, 0x5A),
        (2 * M, M, 0),
        (3 * M, 3 * M, 0x11),
    ):
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", clone],
            check=True,
            capture_output=True,
        )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read -P 0x5a {6 * M} 65536", clone],
        check=True,
        capture_output=True,
    )
    mapped = subprocess.run(
        ["qemu-img", "map", "--output=json", clone], capture_output=True, text=True, check=True
    )
    zero = [e for e in json.loads(mapped.stdout) if e["start"] == 2 * M]
    assert zero and zero[0]["zero"] and not zero[0]["data"]  # a zero cluster, not written zeros
