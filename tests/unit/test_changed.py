"""Changed blocks' pure parts: what set.json records, the summary line, the
remote host's file times, the copy of extents between plain files."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from backupninja_kvm import changed, setinfo
from backupninja_kvm.outcome import Outcome

M = 1024 * 1024


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
    read, written = changed.apply_extents(str(source), str(target), extents)
    data = target.read_bytes()
    assert data == b"a" * 10 + b"x" * (M - 10) + bytes(M) + b"c" * M
    assert (read, written) == (10 + 2 * M, 10 + M)  # the zero block was zeroed, not written
    zeros, _ = changed.apply_extents(str(source), str(target), [(M, M)], zeros_as_data=True)
    assert zeros == M


def test_a_short_source_is_an_error_not_a_silent_gap(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"a" * 100)
    target.write_bytes(b"x" * 200)
    with pytest.raises(changed.TransferError, match="short read"):
        changed.apply_extents(str(source), str(target), [(0, 200)])
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
