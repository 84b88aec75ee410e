"""Block-device disks (LVM volumes, partitions): chosen only with an
overlaydir and merge = commit, frozen on an overlay file, copied into a
sparse raw image file, merged back into the device."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from backupninja_kvm import transfer
from backupninja_kvm.disks import (
    BLOCK_NEEDS_OVERLAYDIR,
    BLOCK_NOT_WITH_PULL,
    overlay_path,
    parse_disks,
    referenced_paths,
    select_disks,
    snapshot_xml,
    with_disk_source,
)
from backupninja_kvm.plan import backup_file_name
from tests.unit.test_disks import domain_xml

LV = (
    "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
    "<source dev='/dev/vg0/web1-data'/><target dev='vdb' bus='virtio'/></disk>"
)
QCOW2_ON_LV = LV.replace("type='raw'", "type='qcow2'")
# What the live XML shows while the disk runs on our overlay.
ON_OVERLAY = (
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/srv/ovl/web1-vdb-web1-data.bnkvm-20261127T010000Z.qcow2' index='3'/>"
    "<backingStore type='block' index='1'><format type='raw'/>"
    "<source dev='/dev/vg0/web1-data'/><backingStore/></backingStore>"
    "<target dev='vdb' bus='virtio'/></disk>"
)


def test_a_block_disk_is_skipped_without_overlaydir_with_the_fix():
    chosen, skipped = select_disks(parse_disks(domain_xml(LV)))

    assert chosen == []
    assert [s.reason for s in skipped] == [BLOCK_NEEDS_OVERLAYDIR]
    assert "set overlaydir" in skipped[0].reason and skipped[0].level == "warning"


def test_a_raw_block_disk_is_chosen_when_the_run_can_take_it():
    chosen, skipped = select_disks(parse_disks(domain_xml(LV)), None)

    assert [d.path for d in chosen] == ["/dev/vg0/web1-data"] and skipped == []


@pytest.mark.parametrize(
    ("element", "refusal", "reason"),
    [
        (LV, BLOCK_NOT_WITH_PULL, BLOCK_NOT_WITH_PULL),
        (QCOW2_ON_LV, None, "block disk in format qcow2, only raw devices are backed up"),
    ],
    ids=["merge-pull", "qcow2-on-device"],
)
def test_block_disks_the_run_cannot_take_are_skipped_with_the_reason(element, refusal, reason):
    _, skipped = select_disks(parse_disks(domain_xml(element)), refusal)

    assert [s.reason for s in skipped] == [reason]


def test_the_overlay_of_a_block_disk_is_a_file_in_overlaydir_named_after_the_device():
    (disk,) = parse_disks(domain_xml(LV))

    path = overlay_path(disk, "20261127T010000Z", "/srv/ovl", "web1")

    assert path == "/srv/ovl/web1-vdb-web1-data.bnkvm-20261127T010000Z.qcow2"
    with pytest.raises(ValueError):
        overlay_path(disk, "20261127T010000Z", "", "web1")


def test_the_snapshot_of_a_block_disk_asks_for_an_overlay_file():
    disks = parse_disks(domain_xml(LV))

    xml = snapshot_xml(disks, {"vdb": "/srv/ovl/o.qcow2"})

    element = ET.fromstring(xml).find("./disks/disk")
    assert element is not None
    assert (element.get("snapshot"), element.get("type")) == ("external", "file")


def test_a_disk_on_an_overlay_over_a_device_shows_the_device_as_its_backing():
    (disk,) = parse_disks(domain_xml(ON_OVERLAY))

    assert disk.backing == "/dev/vg0/web1-data"
    assert "/dev/vg0/web1-data" in referenced_paths(domain_xml(ON_OVERLAY))


def test_the_set_holds_a_device_as_a_raw_image_named_after_it():
    (disk,) = parse_disks(domain_xml(LV))

    assert backup_file_name(disk) == "vdb-web1-data.raw"


def test_pointing_a_definition_back_at_a_device_makes_it_a_block_disk_again():
    xml = with_disk_source(domain_xml(ON_OVERLAY), "vdb", "/dev/vg0/web1-data", "raw", block=True)

    (disk,) = parse_disks(xml)
    assert (disk.source_type, disk.path, disk.format, disk.backing) == (
        "block",
        "/dev/vg0/web1-data",
        "raw",
        None,
    )


def test_a_device_is_copied_with_its_zero_blocks_as_holes(tmp_path):
    # _copy_device reads with pread like from a device; a file stands in for it.
    source = tmp_path / "device"
    size = 3 * transfer.DEVICE_CHUNK + 5000
    data = bytearray(size)
    data[10 : 10 + 3] = b"abc"  # one block of data at the start
    data[transfer.DEVICE_CHUNK * 2 + 70000] = 1  # one in the third chunk
    data[-1] = 2  # the very last byte, in a short block
    source.write_bytes(bytes(data))
    target = tmp_path / "copy.raw"
    seen: list[int] = []

    with open(source, "rb") as reader, open(target, "wb") as writer:
        written = transfer._copy_device(reader.fileno(), writer.fileno(), size, seen.append)
        os.ftruncate(writer.fileno(), size)

    assert target.read_bytes() == bytes(data)
    assert written == 2 * transfer.ZERO_BLOCK + 5000 % transfer.ZERO_BLOCK
    assert seen[-1] == size
    assert os.stat(target).st_blocks * 512 <= written + 3 * 4096
