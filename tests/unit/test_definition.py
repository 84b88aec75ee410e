"""The definition of a copy of a domain: it shares nothing writable with the original."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from backupninja_kvm.definition import (
    DefinitionError,
    copy_definition,
    domain_type,
    for_rehearsal,
    has_guest_agent,
    nvram_path,
    point_disks,
    with_backing_chain,
)

IMAGES = "/var/lib/libvirt/images"
NVRAM = "/var/lib/libvirt/qemu/nvram/web1_VARS.fd"

# What `virsh dumpxml --inactive` shows of a UEFI guest made by virt-install,
# with the devices a copy must not share added.
WEB1 = f"""<domain type='kvm'>
  <name>web1</name>
  <uuid>8f1d3c2a-5b4e-4c1d-9a7b-2e6f0c9d8a11</uuid>
  <title>Web server</title>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{NVRAM}</nvram>
    <boot dev='hd'/>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{IMAGES}/web1.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='{IMAGES}/debian-12.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/logs'>
        <host name='ceph1' port='6789'/>
      </source>
      <auth username='libvirt'>
        <secret type='ceph' uuid='2a5b08e4-3dea-4fb9-b4a1-1b7f6e8e5a10'/>
      </auth>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{IMAGES}/scratch.raw'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{IMAGES}/shared-quorum.raw'/>
      <target dev='vde' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{IMAGES}/reference.qcow2'/>
      <target dev='vdf' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{IMAGES}/debian-12.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='/srv/web1-uploads'/>
      <target dir='uploads'/>
    </filesystem>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='/srv/static'/>
      <target dir='static'/>
      <readonly/>
    </filesystem>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:11:22:33'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/web1-serial.log'/>
      <log file='/var/log/libvirt/qemu/web1-serial0.log' append='on'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
    </serial>
    <console type='file'>
      <source path='/var/log/web1-serial.log'/>
      <target type='serial' port='0'/>
    </console>
    <console type='pty'>
      <target type='virtio' port='1'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web1.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <graphics type='vnc' port='5905' autoport='no' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' autoport='yes'>
      <listen type='socket' socket='/run/web1-spice.sock'/>
    </graphics>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x0529'/><product id='0x0001'/></source>
    </hostdev>
  </devices>
</domain>
"""

COPY_DISKS = {
    "vda": ("/restore/web1-copy/vda.qcow2", "qcow2"),
    "vdb": ("/restore/web1-copy/vdb.raw", "raw"),
}


def copied(**options) -> tuple[ET.Element, list[str]]:
    xml, dropped = copy_definition(WEB1, "web1-copy", COPY_DISKS, **options)
    return ET.fromstring(xml), dropped


def disk(root: ET.Element, target: str) -> ET.Element | None:
    for element in root.findall("./devices/disk"):
        if element.find("target").get("dev") == target:
            return element
    return None


def test_the_copy_has_the_new_name_and_no_uuid():
    root, _ = copied()

    assert root.findtext("name") == "web1-copy"
    assert root.find("uuid") is None
    assert root.findtext("title") == "Web server"


def test_the_copy_disks_are_files_whose_chain_libvirt_reads_from_the_image():
    root, _ = copied()

    vda = disk(root, "vda")
    assert vda.get("type") == "file"
    assert vda.find("source").attrib == {"file": "/restore/web1-copy/vda.qcow2"}
    assert vda.find("driver").get("type") == "qcow2"
    assert vda.find("driver").get("discard") == "unmap"
    assert vda.find("backingStore") is None
    assert vda.find("address").get("slot") == "0x00"  # the guest sees the same device
    vdb = disk(root, "vdb")
    assert vdb.get("type") == "file"
    assert vdb.find("source").attrib == {"file": "/restore/web1-copy/vdb.raw"}
    assert vdb.find("driver").get("io") == "native"


def test_a_network_disk_given_an_image_loses_its_host_and_auth():
    xml, _ = copy_definition(WEB1, "web1-copy", {"vdc": ("/restore/vdc.raw", "raw")})

    vdc = disk(ET.fromstring(xml), "vdc")
    assert vdc.get("type") == "file"
    assert list(vdc.find("source")) == []
    assert vdc.find("source").attrib == {"file": "/restore/vdc.raw"}
    assert vdc.find("auth") is None


def test_other_writable_disks_are_dropped_and_reported_read_only_ones_stay():
    root, dropped = copied()

    assert dropped == ["vdc", "vdd", "filesystem:uploads"]
    assert disk(root, "vdc") is None and disk(root, "vdd") is None
    assert disk(root, "vde") is not None  # shareable: made to be shared
    assert disk(root, "vdf").find("source").get("file") == f"{IMAGES}/reference.qcow2"
    assert disk(root, "sda").find("source").get("file") == f"{IMAGES}/debian-12.iso"
    shares = [f.find("target").get("dir") for f in root.findall("./devices/filesystem")]
    assert shares == ["static"]


def test_no_image_of_the_original_stays_writable_in_the_copy():
    root, _ = copied()

    for element in root.findall("./devices/disk"):
        source = element.find("source")
        path = (source.get("file") or source.get("dev") or "") if source is not None else ""
        if path.startswith(IMAGES) or path.startswith("/dev/"):
            assert element.find("readonly") is not None or element.find("shareable") is not None


def test_a_transient_disk_is_dropped_its_image_is_the_originals():
    xml = WEB1.replace("<target dev='vdd' bus='virtio'/>", "<target dev='vdd'/><transient/>")

    _, dropped = copy_definition(xml, "web1-copy", COPY_DISKS)

    assert "vdd" in dropped


def test_interfaces_lose_their_mac_or_go_altogether():
    kept, _ = copied()
    dropped, _ = copied(drop_interfaces=True)

    interfaces = kept.findall("./devices/interface")
    assert [i.find("source").attrib for i in interfaces] == [
        {"network": "default"},
        {"bridge": "br0"},
    ]
    assert all(i.find("mac") is None for i in interfaces)
    assert dropped.findall("./devices/interface") == []


def test_serial_log_files_go_into_files_dir():
    root, _ = copied(files_dir="/restore/web1-copy")

    serial = root.find("./devices/serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == "/restore/web1-copy/web1-copy.serial0.log"
    assert serial.find("log").get("file") == "/restore/web1-copy/web1-copy.serial0.chardev.log"
    assert serial.find("target").get("type") == "isa-serial"
    consoles = root.findall("./devices/console")  # the serial mirror goes, libvirt adds it
    assert [c.find("target").get("type") for c in consoles] == ["virtio"]


def test_without_files_dir_serial_files_become_null_devices():
    root, _ = copied()

    serial = root.find("./devices/serial")
    assert serial.get("type") == "null"
    assert serial.find("source") is None and serial.find("log") is None
    assert "/var/log/web1" not in ET.tostring(root, encoding="unicode")


def test_a_unix_channel_gets_a_socket_libvirt_picks():
    root, _ = copied()

    channel = root.find("./devices/channel")
    assert channel.find("source").attrib == {"mode": "bind"}
    assert channel.find("target").get("name") == "org.qemu.guest_agent.0"
    assert has_guest_agent(ET.tostring(root, encoding="unicode"))


def test_graphics_with_a_fixed_port_or_socket_get_autoport():
    root, _ = copied()

    vnc, spice = root.findall("./devices/graphics")
    assert vnc.get("autoport") == "yes" and vnc.get("port") is None
    assert vnc.get("listen") == "127.0.0.1"
    assert spice.find("listen").attrib == {"type": "socket"}


def test_the_uefi_variables_are_the_copys_own():
    in_files_dir, _ = copied(files_dir="/restore/web1-copy")
    default, _ = copied()

    assert nvram_path(WEB1) == NVRAM
    nvram = in_files_dir.find("./os/nvram")
    assert nvram.text == "/restore/web1-copy/web1-copy_VARS.fd"
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert nvram_path(ET.tostring(default, encoding="unicode")) is None
    assert default.find("./os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_nvram_in_the_source_form_of_newer_libvirt():
    xml = WEB1.replace(
        f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{NVRAM}</nvram>",
        f"<nvram type='file'><source file='{NVRAM}'/></nvram>",
    )

    copy, _ = copy_definition(xml, "web1-copy", COPY_DISKS)

    assert "web1_VARS" not in copy


def test_a_minimal_definition_without_devices():
    xml, dropped = copy_definition(
        "<domain type='qemu'><name>a</name><memory>65536</memory></domain>", "b", {}
    )

    assert ET.fromstring(xml).findtext("name") == "b" and dropped == []


@pytest.mark.parametrize(
    "text", ["not xml", "<network><name>default</name></network>"], ids=["garbage", "network"]
)
def test_what_is_not_a_domain_definition_is_refused(text):
    with pytest.raises(DefinitionError):
        copy_definition(text, "b", {})


def rehearsal() -> ET.Element:
    xml, _ = copy_definition(WEB1, "rh", COPY_DISKS, drop_interfaces=True, files_dir="/t")
    return ET.fromstring(for_rehearsal(xml, "/t/console.log"))


def test_a_rehearsal_writes_its_serial_console_into_the_file():
    root = rehearsal()

    serial = root.find("./devices/serial")
    assert serial.get("type") == "file"
    assert serial.find("source").attrib == {"path": "/t/console.log"}
    assert serial.find("log") is None
    assert [c.find("target").get("type") for c in root.findall("./devices/console")] == ["virtio"]


def test_a_rehearsal_gets_a_serial_console_when_the_domain_has_none():
    xml = "<domain type='qemu'><name>a</name><devices><console type='pty'/></devices></domain>"

    root = ET.fromstring(for_rehearsal(xml, "/t/console.log"))

    serials = root.findall("./devices/serial")
    assert len(serials) == 1 and serials[0].find("source").get("path") == "/t/console.log"
    assert serials[0].find("target").get("port") == "0"
    assert root.find("./devices/console") is None


def test_a_rehearsal_runs_qemu_without_relabelling_and_without_host_devices():
    root = rehearsal()

    labels = root.findall("seclabel")
    assert [(s.get("model"), s.get("relabel"), s.findtext("label")) for s in labels] == [
        ("dac", "no", "+0:+0")
    ]
    assert root.find("./devices/hostdev") is None
    assert root.find("./devices/interface") is None
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_domain_type_and_agent_channel():
    assert domain_type(WEB1) == "kvm"
    assert has_guest_agent(WEB1)
    assert not has_guest_agent("<domain type='qemu'><name>a</name></domain>")


def test_point_disks_moves_only_the_named_disks_and_keeps_the_identity():
    xml = (
        "<domain type='qemu'><name>web1</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>"
        "<devices><disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        "<source dev='/dev/vg/web1'/><backingStore/><target dev='vda'/></disk>"
        "<disk type='file' device='disk'><source file='/srv/b.raw'/><target dev='vdb'/></disk>"
        "<interface type='user'><mac address='52:54:00:aa:bb:01'/></interface>"
        "</devices></domain>"
    )

    moved = ET.fromstring(point_disks(xml, {"vda": ("/srv/r/vda.raw", "raw")}))

    vda, vdb = moved.iter("disk")
    assert vda.get("type") == "file" and vda.find("source").attrib == {"file": "/srv/r/vda.raw"}
    assert vda.find("backingStore") is None
    assert vdb.find("source").get("file") == "/srv/b.raw"
    assert moved.findtext("uuid") == "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    assert moved.find("devices/interface/mac").get("address") == "52:54:00:aa:bb:01"


def test_a_backing_chain_spelled_out_names_the_given_layers_topmost_first():
    xml, _ = copy_definition(WEB1, "rh", COPY_DISKS)

    chained = with_backing_chain(
        xml, "vda", [("/set/vda-web1.s1.qcow2", "qcow2"), ("/set/b", "raw")]
    )

    vda = disk(ET.fromstring(chained), "vda")
    first = vda.find("backingStore")
    assert [child.tag for child in vda][:3] == ["driver", "source", "backingStore"]
    assert first.find("source").get("file") == "/set/vda-web1.s1.qcow2"
    assert first.find("format").get("type") == "qcow2"
    second = first.find("backingStore")
    assert (second.find("source").get("file"), second.find("format").get("type")) == (
        "/set/b",
        "raw",
    )
    assert second.find("backingStore") is None  # below it: what the header names, if anything


def test_a_backing_chain_for_a_disk_that_is_not_there_is_refused():
    with pytest.raises(DefinitionError):
        with_backing_chain(WEB1, "vdz", [])
