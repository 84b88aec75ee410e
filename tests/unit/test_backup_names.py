"""Names in the set, and whether a domain's lock is held."""

from __future__ import annotations

import pytest

from backupninja_kvm import lock
from backupninja_kvm.disks import Disk
from backupninja_kvm.plan import backup_file_name


def disk(path: str, image_format: str = "qcow2") -> Disk:
    return Disk("vda", "disk", "file", path, image_format)


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("/srv/vm/a.qcow2", "vda-a.qcow2"),
        ("/srv/vm/p.raw", "vda-p.raw"),
        # After merge = pull the disk runs on our tagged image, renamed every
        # night: the set keeps the name of the disk, so that nothing piles
        # up and a remote delta finds its basis.
        ("/srv/vm/a.bnkvm-20261127T010000.qcow2", "vda-a.qcow2"),
        ("/srv/vm/p.raw.bnkvm-20261128T010000.qcow2", "vda-p.raw.qcow2"),
        ("/srv/vm/disk.bnkvm-20261128T010000", "vda-disk.qcow2"),
    ],
)
def test_set_file_names_leave_out_our_tag(image, name):
    assert backup_file_name(disk(image)) == name


def test_set_file_names_stay_the_same_from_one_pulled_night_to_the_next():
    nights = ["20261127T010000", "20261128T010000", "20261129T010000"]
    names = {backup_file_name(disk(f"/srv/vm/p.raw.bnkvm-{night}.qcow2")) for night in nights}
    assert names == {"vda-p.raw.qcow2"}


def test_a_held_lock_names_its_holder_and_a_free_one_nobody(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path))
    uuid = "c925d4aa-0000-4000-8000-000000000001"
    assert lock.holder(uuid) is None
    with lock.domain_lock("web1", uuid):
        held = lock.holder(uuid)
    assert held is not None and held.startswith("pid ") and ", since " in held
    assert lock.holder(uuid) is None  # released, the file stays
