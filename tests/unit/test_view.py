"""The pure parts of the view: names, the manifest, mountinfo parsing."""

from __future__ import annotations

import json

import pytest

from backupninja_kvm.disks import Disk
from backupninja_kvm.view import (
    Manifest,
    ViewError,
    ViewFile,
    check_manifest,
    mounts_under,
    parse_mountinfo,
)


def _disk(target: str, path: str, fmt: str = "qcow2") -> Disk:
    return Disk(target=target, device="disk", source_type="file", path=path, format=fmt)


def test_view_file_is_named_like_the_sets_file():
    assert ViewFile.for_disk(_disk("vda", "/img/a.qcow2"), 10).name == "vda-a.qcow2"
    # the tag of a disk that a merge = pull left is not in the name
    pulled = _disk("vdb", "/img/p.raw.bnkvm-20261127T010000Z.qcow2")
    assert ViewFile.for_disk(pulled, 10).name == "vdb-p.raw.qcow2"


def test_manifest_round_trips_and_documents_each_file():
    files = (ViewFile("vda", "vda-a.qcow2", "/img/a.qcow2", "qcow2", 1 << 30),)
    manifest = Manifest("web", "2026-12-02T01:00:00Z", "quiesced", files)
    data = json.loads(manifest.to_json())
    assert data == {
        "version": 1,
        "domain": "web",
        "freeze_time": "2026-12-02T01:00:00Z",
        "consistency": "quiesced",
        "files": [
            {
                "name": "vda-a.qcow2",
                "target": "vda",
                "original_path": "/img/a.qcow2",
                "format": "qcow2",
                "virtual_size": 1 << 30,
            }
        ],
    }
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("text", ["", "{}", '{"version": 2, "files": []}', "[1]"])
def test_a_manifest_that_is_not_ours_is_a_view_error(text):
    with pytest.raises(ViewError):
        Manifest.from_json(text)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", ".hidden", "domain.xml", "manifest.json", "a\nb"]
)
def test_unsafe_or_reserved_names_are_refused(name):
    files = (ViewFile("vda", name, "/img/a", "raw", 1),)
    with pytest.raises(ViewError):
        check_manifest(Manifest("web", "2026-12-02T01:00:00Z", "crash-consistent", files))


def test_two_files_with_one_name_are_refused():
    files = (
        ViewFile("vda", "vda-a.raw", "/img/a.raw", "raw", 1),
        ViewFile("vda", "vda-a.raw", "/other/a.raw", "raw", 1),
    )
    with pytest.raises(ViewError, match="two files"):
        check_manifest(Manifest("web", "2026-12-02T01:00:00Z", "quiesced", files))


def test_unknown_consistency_is_refused():
    with pytest.raises(ViewError, match="consistency"):
        check_manifest(Manifest("web", "2026-12-02T01:00:00Z", "maybe"))


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=1024k
41 22 8:1 /images/a.qcow2 /var/lib/view/web/vda-a.qcow2 ro,nosuid,nodev,noexec - ext4 /dev/sda1 rw
42 22 0:25 /b\\040c.raw /var/lib/view/my\\040vm/vdb-b\\040c.raw ro shared:5 - tmpfs tmpfs rw
43 22 8:1 /x /var/lib/view2/web/vda-x rw shared:1 - ext4 /dev/sda1 rw
44 41 8:1 /y /var/lib/view/web/vda-a.qcow2 ro master:3 - ext4 /dev/sda1 rw
not a mountinfo line
"""


def test_mountinfo_fields_and_escapes_are_read():
    mounts = parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 6  # the broken line is skipped
    bound = mounts[3]
    assert bound.mount_point == "/var/lib/view/my vm/vdb-b c.raw"
    assert bound.root == "/b c.raw"
    assert bound.fstype == "tmpfs" and bound.source == "tmpfs"
    assert bound.read_only
    assert not mounts[1].read_only  # "rw,nosuid": super options (after -) do not count


def test_mounts_under_a_view_are_strictly_inside_it_newest_first():
    mounts = parse_mountinfo(MOUNTINFO)
    inside = mounts_under(mounts, "/var/lib/view")
    # not /var/lib/view2 (a sibling with the same prefix); the stacked mount first
    assert [m.mount_id for m in inside] == [44, 42, 41]
    assert mounts_under(mounts, "/var/lib/view/web/") == [mounts[5], mounts[2]]
