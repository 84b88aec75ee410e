"""Disks of a domain from its XML: which are backed up, the snapshot XML, overlay names."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from backupninja_kvm.disks import (
    BLOCK_NEEDS_OVERLAYDIR,
    NETWORK_DISK,
    Disk,
    guest_agent_connected,
    has_guest_agent,
    is_our_overlay,
    overlay_created,
    overlay_path,
    parse_disks,
    referenced_paths,
    select_disks,
    snapshot_xml,
    top_paths,
)

IMAGES = "/var/lib/libvirt/images"
STAMP = "20260315T010203"

# A qcow2 disk on a two-level backing chain, as the live XML of a running domain shows it.
VDA = f"""
<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2' discard='unmap'/>
  <source file='{IMAGES}/web1.qcow2' index='3'/>
  <backingStore type='file' index='4'>
    <format type='qcow2'/>
    <source file='{IMAGES}/debian-base.qcow2'/>
    <backingStore type='file' index='5'>
      <format type='raw'/>
      <source file='{IMAGES}/debian-root.raw'/>
      <backingStore/>
    </backingStore>
  </backingStore>
  <target dev='vda' bus='virtio'/>
  <alias name='virtio-disk0'/>
  <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
</disk>
"""

VDB = """
<disk type='file' device='disk'>
  <driver name='qemu' type='raw' cache='none'/>
  <source file='/srv/vm/web1-data.img' index='2'/>
  <backingStore/>
  <target dev='vdb' bus='virtio'/>
  <alias name='virtio-disk1'/>
</disk>
"""

# A disk with a block copy job attached, ready to pivot.
VDC_MIRROR = f"""
<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='{IMAGES}/web1-vdc.qcow2' index='1'/>
  <backingStore/>
  <mirror type='file' file='/srv/copy/web1-vdc.qcow2' format='qcow2' job='copy' ready='yes'>
    <format type='qcow2'/>
    <source file='/srv/copy/web1-vdc.qcow2' index='6'/>
  </mirror>
  <target dev='vdc' bus='virtio'/>
  <alias name='virtio-disk2'/>
</disk>
"""

CDROM = """
<disk type='file' device='cdrom'>
  <driver name='qemu' type='raw'/>
  <source file='/srv/iso/debian-12.iso' index='7'/>
  <target dev='sda' bus='sata'/>
  <readonly/>
  <alias name='sata0-0-0'/>
</disk>
"""

SKIPPED_DISKS = {
    "cdrom": (CDROM, "cdrom"),
    "empty-cdrom": (
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
        "<target dev='sdb' bus='sata'/><readonly/></disk>",
        "cdrom",
    ),
    "floppy": (
        "<disk type='file' device='floppy'><driver name='qemu' type='raw'/>"
        "<source file='/srv/boot.img'/><target dev='fda' bus='fdc'/></disk>",
        "floppy",
    ),
    "readonly": (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/srv/ref.qcow2'/><target dev='vdd' bus='virtio'/><readonly/></disk>",
        "read-only",
    ),
    "shareable": (
        "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        "<source file='/srv/cluster.img'/><target dev='vde' bus='virtio'/><shareable/></disk>",
        "shareable (used by several domains)",
    ),
    "network-rbd": (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='rbd' name='pool/img'><host name='ceph1' port='6789'/></source>"
        "<target dev='vdf' bus='virtio'/></disk>",
        NETWORK_DISK,
    ),
    "block-device": (
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        "<source dev='/dev/vg0/web1-logs'/><target dev='vdg' bus='virtio'/></disk>",
        BLOCK_NEEDS_OVERLAYDIR,
    ),
    "lun": (
        "<disk type='block' device='lun'><driver name='qemu' type='raw'/>"
        "<source dev='/dev/sdc'/><target dev='sdc' bus='scsi'/></disk>",
        "lun (passthrough device)",
    ),
    "vmdk": (
        "<disk type='file' device='disk'><driver name='qemu' type='vmdk'/>"
        "<source file='/srv/imported.vmdk'/><target dev='vdh' bus='virtio'/></disk>",
        "format vmdk, only qcow2 and raw are backed up",
    ),
    "no-format": (
        "<disk type='file' device='disk'>"
        "<source file='/srv/unknown.bin'/><target dev='vdi' bus='virtio'/></disk>",
        "format unknown, only qcow2 and raw are backed up",
    ),
    "volume": (
        "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source pool='default' volume='web1.qcow2'/><target dev='vdj' bus='virtio'/></disk>",
        "volume disk, only image files and block devices are backed up",
    ),
    "empty-drive": (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<target dev='vdk' bus='virtio'/></disk>",
        "no image file (empty drive)",
    ),
}


def domain_xml(*disks: str) -> str:
    devices = "".join(disks)
    return (
        "<domain type='kvm' id='7'><name>web1</name><memory unit='KiB'>524288</memory>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"{devices}<interface type='network'><source network='default'/></interface>"
        "</devices></domain>"
    )


def disk(path: str, target: str = "vda", fmt: str = "qcow2") -> Disk:
    return Disk(target=target, device="disk", source_type="file", path=path, format=fmt)


def test_parse_disks_reads_every_disk_in_document_order():
    disks = parse_disks(domain_xml(VDA, CDROM, VDB, VDC_MIRROR))

    assert [d.target for d in disks] == ["vda", "sda", "vdb", "vdc"]


def test_parse_disks_reads_the_top_image_its_backing_file_and_alias():
    (vda,) = parse_disks(domain_xml(VDA))

    assert vda == Disk(
        target="vda",
        device="disk",
        source_type="file",
        path=f"{IMAGES}/web1.qcow2",
        format="qcow2",
        readonly=False,
        shareable=False,
        alias="virtio-disk0",
        backing=f"{IMAGES}/debian-base.qcow2",  # the layer just below, not the bottom
        mirror=False,
        mirror_ready=False,
    )


def test_parse_disks_reads_a_disk_without_backing_file():
    (vdb,) = parse_disks(domain_xml(VDB))

    assert (vdb.path, vdb.format, vdb.backing, vdb.alias) == (
        "/srv/vm/web1-data.img",
        "raw",
        None,
        "virtio-disk1",
    )


def test_parse_disks_sees_a_block_job_and_whether_it_is_ready():
    (ready,) = parse_disks(domain_xml(VDC_MIRROR))
    (busy,) = parse_disks(domain_xml(VDC_MIRROR.replace("ready='yes'", "")))

    assert (ready.mirror, ready.mirror_ready) == (True, True)
    assert (busy.mirror, busy.mirror_ready) == (True, False)
    assert ready.path == f"{IMAGES}/web1-vdc.qcow2"  # the mirror is not the top


def test_parse_disks_reads_cdrom_readonly_and_devices():
    cdrom, network, block = parse_disks(
        domain_xml(CDROM, SKIPPED_DISKS["network-rbd"][0], SKIPPED_DISKS["block-device"][0])
    )

    assert (cdrom.device, cdrom.readonly, cdrom.path) == ("cdrom", True, "/srv/iso/debian-12.iso")
    assert (network.source_type, network.path) == ("network", "pool/img")
    assert (block.source_type, block.path) == ("block", "/dev/vg0/web1-logs")


def test_parse_disks_of_an_inactive_definition_has_no_alias():
    inactive = VDB.replace("<alias name='virtio-disk1'/>", "").replace(" index='2'", "")

    (vdb,) = parse_disks(domain_xml(inactive))

    assert vdb.alias is None
    assert vdb.path == "/srv/vm/web1-data.img"


def test_a_domain_without_disks_has_none():
    assert parse_disks(domain_xml()) == []


def test_file_backed_qcow2_and_raw_disks_are_backed_up():
    chosen, skipped = select_disks(parse_disks(domain_xml(VDA, VDB)))

    assert [d.target for d in chosen] == ["vda", "vdb"]
    assert skipped == []


@pytest.mark.parametrize(("element", "reason"), SKIPPED_DISKS.values(), ids=SKIPPED_DISKS.keys())
def test_disks_that_cannot_be_backed_up_are_skipped_with_a_reason(element, reason):
    chosen, skipped = select_disks(parse_disks(domain_xml(VDA, element, VDB)))

    assert [d.target for d in chosen] == ["vda", "vdb"]
    assert [s.reason for s in skipped] == [reason]


def test_skipped_disks_keep_their_description():
    _, skipped = select_disks(parse_disks(domain_xml(VDA, CDROM)))

    assert [(s.disk.target, s.disk.path) for s in skipped] == [("sda", "/srv/iso/debian-12.iso")]


def test_the_snapshot_lists_every_disk_and_freezes_only_the_chosen_ones():
    all_disks = parse_disks(domain_xml(VDA, CDROM, VDB))
    overlays = {
        "vda": f"{IMAGES}/web1.bnkvm-{STAMP}.qcow2",
        "vdb": f"/srv/vm/web1-data.bnkvm-{STAMP}.qcow2",
    }

    root = ET.fromstring(snapshot_xml(all_disks, overlays))

    assert root.tag == "domainsnapshot"
    assert "bnkvm" in root.findtext("description")
    elements = root.findall("./disks/disk")
    assert [e.get("name") for e in elements] == ["vda", "sda", "vdb"]
    by_name = {e.get("name"): e for e in elements}
    for target, overlay in overlays.items():
        element = by_name[target]
        assert element.get("snapshot") == "external"
        assert element.find("driver").get("type") == "qcow2"
        assert element.find("source").get("file") == overlay  # never a generated name
    assert by_name["sda"].get("snapshot") == "no"
    assert list(by_name["sda"]) == []


def test_a_snapshot_without_overlays_freezes_nothing():
    root = ET.fromstring(snapshot_xml(parse_disks(domain_xml(VDA, VDB)), {}))

    assert [e.get("snapshot") for e in root.findall("./disks/disk")] == ["no", "no"]


def test_snapshot_xml_escapes_paths():
    overlay = "/srv/a&b/<odd>'name\".bnkvm-20260315T010203.qcow2"

    root = ET.fromstring(snapshot_xml([disk("/srv/a&b/x.qcow2")], {"vda": overlay}))

    assert root.find("./disks/disk/source").get("file") == overlay


@pytest.mark.parametrize(
    ("image", "overlay"),
    [
        (f"{IMAGES}/web1.qcow2", f"{IMAGES}/web1.bnkvm-{STAMP}.qcow2"),
        ("/srv/vm/data.img", f"/srv/vm/data.img.bnkvm-{STAMP}.qcow2"),
        ("/srv/vm/data.raw", f"/srv/vm/data.raw.bnkvm-{STAMP}.qcow2"),
        ("/srv/vm/disk", f"/srv/vm/disk.bnkvm-{STAMP}.qcow2"),
        ("/srv/vm/web.v2.qcow2", f"/srv/vm/web.v2.bnkvm-{STAMP}.qcow2"),
        # left by an earlier `merge = pull`: the tag is replaced, not stacked
        ("/srv/vm/x.bnkvm-20260101T000000.qcow2", f"/srv/vm/x.bnkvm-{STAMP}.qcow2"),
        ("/srv/vm/x.bnkvm-20260101T000000Z.qcow2", f"/srv/vm/x.bnkvm-{STAMP}.qcow2"),
    ],
)
def test_the_overlay_goes_next_to_the_image_with_our_tag_and_the_stamp(image, overlay):
    assert overlay_path(disk(image), STAMP) == overlay


def test_the_overlay_goes_to_overlaydir_with_domain_and_target_in_its_name():
    path = overlay_path(disk("/srv/vm/data.img", target="vdb"), STAMP, "/var/tmp/ov", "web1")

    assert path == f"/var/tmp/ov/web1-vdb-data.img.bnkvm-{STAMP}.qcow2"


def test_images_with_the_same_name_get_distinct_overlays_in_overlaydir():
    first = overlay_path(disk("/srv/a/root.qcow2", "vda"), STAMP, "/var/tmp/ov", "web1")
    second = overlay_path(disk("/srv/b/root.qcow2", "vdb"), STAMP, "/var/tmp/ov", "web1")
    other = overlay_path(disk("/srv/c/root.qcow2", "vda"), STAMP, "/var/tmp/ov", "db1")

    assert len({first, second, other}) == 3


def test_an_image_a_pull_left_in_overlaydir_gets_no_stacked_prefix():
    # merge = pull with an overlaydir: the disk runs on web1-vda-root.bnkvm-...;
    # the next night's overlay (and the set's file name) must not grow.
    pulled = overlay_path(disk("/srv/a/root.qcow2", "vda"), STAMP, "/var/tmp/ov", "web1")
    again = overlay_path(disk(pulled, "vda"), "20261128T010000", "/var/tmp/ov", "web1")

    assert pulled == f"/var/tmp/ov/web1-vda-root.bnkvm-{STAMP}.qcow2"
    assert again == "/var/tmp/ov/web1-vda-root.bnkvm-20261128T010000.qcow2"


def test_images_that_differ_only_by_extension_get_distinct_overlays():
    first = overlay_path(disk("/srv/vm/data.qcow2", "vda"), STAMP)
    second = overlay_path(disk("/srv/vm/data.img", "vdb", "raw"), STAMP)

    assert first != second


def test_overlays_are_recognised_as_ours():
    for image in ("/srv/vm/web1.qcow2", "/srv/vm/x.bnkvm-20260101T000000.qcow2"):
        assert is_our_overlay(overlay_path(disk(image), STAMP))
        assert is_our_overlay(overlay_path(disk(image), STAMP, "/var/tmp/ov", "web1"))


@pytest.mark.parametrize(
    ("path", "ours"),
    [
        (f"{IMAGES}/web1.bnkvm-20260101T000000.qcow2", True),
        (f"{IMAGES}/web1.bnkvm-20260101T000000", True),
        ("/var/tmp/ov/web1-vda-web1.bnkvm-20261127T010000.qcow2", True),
        (f"{IMAGES}/web1.bnkvm-20261202T025647Z.qcow2", True),  # UTC, since 0.3
        ("/var/tmp/ov/web1-vda-web1.bnkvm-20261202T025647Z.qcow2", True),
        (f"{IMAGES}/web1.bnkvm-20261202T025647X.qcow2", False),
        (f"{IMAGES}/web1.qcow2", False),
        (f"{IMAGES}/bnkvm.qcow2", False),
        (f"{IMAGES}/web1-bnkvm-20260101T000000.qcow2", False),
        (f"{IMAGES}/web1.bnkvm-20260101.qcow2", False),
        (f"{IMAGES}/web1.bnkvm-2026010T000000.qcow2", False),
        (f"{IMAGES}/web1.bnkvm-20260101T000000.qcow2.bak", False),
        (f"{IMAGES}/web1.bnkvm-20260101T000000.img", False),
        (f"{IMAGES}/web1.snap-20260101T000000.qcow2", False),
        ("/srv/x.bnkvm-20260101T000000.qcow2/web1.qcow2", False),  # only the name counts
    ],
)
def test_only_our_overlay_names_are_recognised(path, ours):
    assert is_our_overlay(path) is ours


def test_referenced_paths_include_tops_backing_layers_and_mirrors():
    xml = domain_xml(VDA, VDB, VDC_MIRROR, CDROM, SKIPPED_DISKS["network-rbd"][0])

    assert referenced_paths(xml) == {
        f"{IMAGES}/web1.qcow2",
        f"{IMAGES}/debian-base.qcow2",
        f"{IMAGES}/debian-root.raw",
        "/srv/vm/web1-data.img",
        f"{IMAGES}/web1-vdc.qcow2",
        "/srv/copy/web1-vdc.qcow2",
        "/srv/iso/debian-12.iso",
    }


def test_referenced_paths_see_an_overlay_still_in_a_chain():
    overlay = f"{IMAGES}/web1.bnkvm-{STAMP}.qcow2"
    frozen_on_overlay = VDA.replace(f"{IMAGES}/web1.qcow2", overlay, 1).replace(
        f"{IMAGES}/debian-base.qcow2", f"{IMAGES}/web1.qcow2"
    )

    assert overlay in referenced_paths(domain_xml(frozen_on_overlay))
    assert overlay not in referenced_paths(domain_xml(VDA))


def test_top_paths_maps_targets_to_their_top_image():
    xml = domain_xml(VDA, SKIPPED_DISKS["empty-cdrom"][0], VDB)

    assert top_paths(xml) == {
        "vda": f"{IMAGES}/web1.qcow2",
        "sdb": None,
        "vdb": "/srv/vm/web1-data.img",
    }


def test_a_guest_agent_channel_is_recognised_and_other_channels_are_not():
    with_agent = """<domain><devices>
      <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
      <channel type='unix'>
        <source mode='bind' path='/run/libvirt/qemu/channel/1-web1/org.qemu.guest_agent.0'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
    </devices></domain>"""
    spice_only = """<domain><devices>
      <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    </devices></domain>"""

    assert has_guest_agent(with_agent)
    assert not has_guest_agent(spice_only)
    assert not has_guest_agent("<domain><devices/></domain>")


def test_a_connected_guest_agent_is_told_from_a_silent_channel():
    def domain(state: str) -> str:
        return (
            "<domain><devices><channel type='unix'><target type='virtio' "
            f"name='org.qemu.guest_agent.0' state='{state}'/></channel></devices></domain>"
        )

    assert guest_agent_connected(domain("connected"))
    assert not guest_agent_connected(domain("disconnected"))
    assert not guest_agent_connected("<domain><devices/></domain>")


@pytest.mark.parametrize(
    ("path", "created"),
    [
        ("/srv/vm/web1.bnkvm-20261202T025647Z.qcow2", "2026-12-02 02:56:47 UTC"),
        ("/srv/vm/web1.bnkvm-20261202T025647.qcow2", "2026-12-02 02:56:47"),  # local, 0.2
        ("/srv/vm/web1.qcow2", "?"),
    ],
)
def test_an_overlay_s_creation_time_is_read_from_its_stamp(path, created):
    assert overlay_created(path) == created
