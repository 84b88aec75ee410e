"""A domain definition turned into one for a copy of the domain: pure XML transforms.

``copy_definition`` gives the definition of a second domain that boots from
other images (a restore under another name, a rehearsal) and shares nothing
writable with the original: not its name, UUID or MAC addresses, not an
image the copy does not get, not its serial log files, channel sockets,
VNC/SPICE port or UEFI variable store. ``for_rehearsal`` then makes it a
throwaway guest on this host (console into a file, no host devices, QEMU
without relabelling the images).

Functions take and return XML text; they raise ``DefinitionError`` when the
text is not a domain definition.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from backupninja_kvm.errors import BackupNinjaKvmError

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
# The children of a disk's <source> that still mean something once it is a
# plain file (the others describe a network or block source).
KEPT_SOURCE_CHILDREN = ("encryption", "seclabel")
# Disk devices a guest writes its data to: a copy never shares them.
DATA_DEVICES = ("disk", "lun")


class DefinitionError(BackupNinjaKvmError):
    """The text is not a domain definition we can transform."""


def copy_definition(
    xml: str,
    name: str,
    disks: dict[str, tuple[str, str]],
    *,
    drop_interfaces: bool = False,
    files_dir: str | None = None,
) -> tuple[str, list[str]]:
    """The definition of a copy of the domain *xml* describes, named *name*.

    *disks* maps a disk's target (vda...) to the copy's image (path, format):
    that disk becomes ``<disk type='file'>`` on that file (also from block,
    volume or network), its ``<backingStore>`` removed so that libvirt reads
    the chain from the image's header. Every other writable disk of device
    disk or lun is removed: it would be the original's image (also a
    ``<transient/>`` one: its overlay is fresh, but the image below it is the
    original's, read while the original writes it). CD-ROMs, floppies,
    read-only and shareable disks stay.

    Also: ``<uuid>`` removed (libvirt makes a new one); each interface's
    ``<mac>`` removed (libvirt makes new ones), or with *drop_interfaces*
    every ``<interface>``; each writable ``<filesystem>`` (a host folder the
    original writes to) removed; unix channel socket paths removed (libvirt
    picks its own); graphics with a fixed port or a socket get autoport; a
    ``<console>`` that mirrors the first serial port is removed (libvirt
    adds it back from the serial port).

    Files the original writes besides its disks are moved into *files_dir*
    when given (serial and console ``type='file'`` sources and ``<log
    file>``, named after the copy); without it those devices become
    ``type='null'``. The UEFI variable store (``<nvram>``) is the original's
    file, which QEMU writes: with *files_dir* it becomes
    ``files_dir/NAME_VARS.fd``, else the path is removed and libvirt makes
    ``/var/lib/libvirt/qemu/nvram/NAME_VARS.fd``. Either way libvirt creates
    the file from the firmware's template when it does not exist, which
    forgets the original's boot entries: a guest that boots only from an
    entry (not from the removable-media path, \\EFI\\BOOT\\BOOTX64.EFI)
    needs a copy of the original's variables put there first
    (``nvram_path`` gives the original's path).

    Returns the new XML and the devices it dropped: disk targets, and
    ``filesystem:TAG`` for each folder share.
    """
    root = _parse(xml)
    _set_text(root, "name", name)
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    devices = root.find("devices")
    dropped: list[str] = []
    if devices is not None:
        dropped += _rewrite_disks(devices, disks)
        dropped += _drop_shared_folders(devices)
        _rewrite_interfaces(devices, drop_interfaces)
        _rewrite_character_devices(devices, name, files_dir)
        _rewrite_graphics(devices)
    _rewrite_nvram(root, name, files_dir)
    return _text(root), dropped


def point_disks(xml: str, disks: dict[str, tuple[str, str]]) -> str:
    """*xml* with each disk of *disks* (target -> path, format) on that file,
    as ``copy_definition`` points them; nothing else changes (a restore in
    place keeps the domain's name, UUID, MACs and other disks)."""
    root = _parse(xml)
    for disk in root.iter("disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev in disks:
            _point_disk_at(disk, *disks[dev])
    return _text(root)


def point_os_files(xml: str, files: dict[str, str]) -> str:
    """*xml* with the ``<os>`` files of *files* (``nvram``, ``kernel``,
    ``initrd``, ``dtb`` -> path) at those paths, as a restore into
    ``--to DIR`` puts them; an element the definition lacks is not added."""
    root = _parse(xml)
    for tag, path in files.items():
        element = root.find(f"./os/{tag}")
        if element is None:
            continue
        if tag == "nvram":
            for child in list(element):  # <nvram type='file'><source file=.../>
                element.remove(child)
            element.attrib.pop("type", None)
        element.text = path
    return _text(root)


def with_backing_chain(xml: str, target: str, chain: list[tuple[str, str]]) -> str:
    """The definition with disk *target*'s backing chain spelled out: each
    (path, format) of *chain* below its top, topmost first.

    libvirt then opens exactly these files below the top, whatever names
    their headers hold (a copy of a ride-along view still names the
    domain's own files). Below the last one libvirt reads the header, as
    it does for a disk without ``<backingStore>``: a template that is not
    in a set is still found where the set's lowest layer names it.
    """
    root = _parse(xml)
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        for element in disk.findall("backingStore"):
            disk.remove(element)
        parent = disk
        for path, image_format in chain:
            store = ET.Element("backingStore", type="file")
            ET.SubElement(store, "format", type=image_format)
            ET.SubElement(store, "source", file=path)
            if parent is disk:
                source = disk.find("source")
                position = list(disk).index(source) + 1 if source is not None else len(disk)
                disk.insert(position, store)
            else:
                parent.append(store)
            parent = store
        return _text(root)
    raise DefinitionError(f"the definition has no disk {target}")


def nvram_path(xml: str) -> str | None:
    """The path of the domain's UEFI variable store, if it names one."""
    element = _parse(xml).find("./os/nvram")
    text = (element.text or "").strip() if element is not None else ""
    return text or None


def for_rehearsal(xml: str, console_path: str) -> str:
    """The copy's definition *xml* made a throwaway guest on this host.

    - Its first serial port writes into *console_path* (one is added when it
      has none; a ``<console>`` that only mirrors it is removed, libvirt adds
      it back); further serial ports write next to it (``NAME.serialN.log``).
    - Host devices passed through (``<hostdev>``, ``<redirdev>``,
      ``<smartcard>``) are removed: the original may hold them.
    - QEMU runs as root without relabelling (``<seclabel model='dac'
      relabel='no'>``): libvirt would otherwise chown the images below the
      overlays, the set's own files, and QEMU's user could not reach them
      in the set's root-only folder anyway. QEMU opens them read-only.
    - It is destroyed on reboot, power-off and crash: one boot is the test.
    """
    root = _parse(xml)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for tag in ("hostdev", "redirdev", "smartcard"):
        for element in devices.findall(tag):
            devices.remove(element)
    serials = devices.findall("serial")
    if not serials:
        serial = ET.SubElement(devices, "serial")
        ET.SubElement(serial, "target", port="0")
        serials = [serial]
    stem = os.path.splitext(console_path)[0]
    for number, serial in enumerate(serials):
        path = console_path if number == 0 else f"{stem}.serial{number}.log"
        _point_at_file(serial, path)
        for log in serial.findall("log"):
            serial.remove(log)
    for console in devices.findall("console"):
        if _mirrors_first_serial(console):
            devices.remove(console)
    for label in root.findall("seclabel"):
        if label.get("model") in (None, "dac"):
            root.remove(label)
    seclabel = ET.SubElement(root, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(seclabel, "label").text = "+0:+0"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _set_text(root, event, "destroy")
    return _text(root)


def domain_type(xml: str) -> str:
    """The hypervisor type the definition asks for: kvm, qemu..."""
    return _parse(xml).get("type", "")


def has_guest_agent(xml: str) -> bool:
    """True when the definition has the QEMU guest agent channel."""
    return any(
        target.get("name") == GUEST_AGENT_CHANNEL
        for target in _parse(xml).findall("./devices/channel/target")
    )


def _parse(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise DefinitionError(f"the domain definition is not XML: {error}") from None
    if root.tag != "domain":
        raise DefinitionError(f"the definition's root element is <{root.tag}>, not <domain>")
    return root


def _text(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def _set_text(parent: ET.Element, tag: str, text: str) -> None:
    element = parent.find(tag)
    if element is None:
        element = ET.SubElement(parent, tag)
    element.text = text


def _rewrite_disks(devices: ET.Element, disks: dict[str, tuple[str, str]]) -> list[str]:
    dropped = []
    for disk in devices.findall("disk"):
        target_element = disk.find("target")
        target = target_element.get("dev", "") if target_element is not None else ""
        if target in disks:
            path, image_format = disks[target]
            _point_disk_at(disk, path, image_format)
        elif _is_writable_data_disk(disk):
            devices.remove(disk)
            dropped.append(target)
    return dropped


def _is_writable_data_disk(disk: ET.Element) -> bool:
    return (
        disk.get("device", "disk") in DATA_DEVICES
        and disk.find("readonly") is None
        and disk.find("shareable") is None
    )


def _point_disk_at(disk: ET.Element, path: str, image_format: str) -> None:
    disk.set("type", "file")
    if disk.get("device") == "lun":  # a lun needs a block device; the copy is a file
        disk.set("device", "disk")
    source = disk.find("source")
    if source is None:
        source = ET.Element("source")
        disk.insert(0, source)
    for child in list(source):
        if child.tag not in KEPT_SOURCE_CHILDREN:
            source.remove(child)
    source.attrib.clear()
    source.set("file", path)
    for tag in ("backingStore", "mirror", "auth"):
        for element in disk.findall(tag):
            disk.remove(element)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", image_format)


def _drop_shared_folders(devices: ET.Element) -> list[str]:
    dropped = []
    for share in devices.findall("filesystem"):
        if share.find("readonly") is None:
            target = share.find("target")
            tag = target.get("dir", "") if target is not None else ""
            devices.remove(share)
            dropped.append(f"filesystem:{tag}")
    return dropped


def _rewrite_interfaces(devices: ET.Element, drop: bool) -> None:
    for interface in devices.findall("interface"):
        if drop:
            devices.remove(interface)
            continue
        for mac in interface.findall("mac"):
            interface.remove(mac)


def _rewrite_character_devices(devices: ET.Element, name: str, files_dir: str | None) -> None:
    if devices.find("serial") is not None:
        for console in devices.findall("console"):
            if _mirrors_first_serial(console):
                devices.remove(console)  # libvirt adds it back, a copy of the serial port
    counts: dict[str, int] = {}
    for element in [*devices.findall("serial"), *devices.findall("console")]:
        kind = element.tag
        number = counts.get(kind, 0)
        counts[kind] = number + 1
        if element.get("type") == "file":
            if files_dir is None:
                element.set("type", "null")
                for source in element.findall("source"):
                    element.remove(source)
            else:
                _point_at_file(element, os.path.join(files_dir, f"{name}.{kind}{number}.log"))
        for log in element.findall("log"):
            if files_dir is None:
                element.remove(log)
            else:
                log.set("file", os.path.join(files_dir, f"{name}.{kind}{number}.chardev.log"))
    for channel in devices.findall("channel"):
        if channel.get("type") == "unix":
            for source in channel.findall("source"):
                source.attrib.pop("path", None)


def _mirrors_first_serial(console: ET.Element) -> bool:
    """A ``<console>`` on a serial target is libvirt's alias of the first
    serial port (it writes it that way), not a device of its own."""
    target = console.find("target")
    return target is None or target.get("type", "serial") == "serial"


def _point_at_file(element: ET.Element, path: str) -> None:
    """A serial or console device writing into *path*, its target kept."""
    element.set("type", "file")
    for source in element.findall("source"):
        element.remove(source)
    element.insert(0, ET.Element("source", path=path))


def _rewrite_graphics(devices: ET.Element) -> None:
    for graphics in devices.findall("graphics"):
        fixed = any(graphics.get(key, "-1") not in ("-1", "") for key in ("port", "tlsPort"))
        if fixed or graphics.get("socket"):
            for key in ("port", "tlsPort", "websocket", "socket"):
                graphics.attrib.pop(key, None)
            graphics.set("autoport", "yes")
        for listen in graphics.findall("listen"):
            if listen.get("type") == "socket":
                listen.attrib.pop("socket", None)


def _rewrite_nvram(root: ET.Element, name: str, files_dir: str | None) -> None:
    nvram = root.find("./os/nvram")
    if nvram is None:
        return
    for child in list(nvram):  # libvirt 8.5+: <nvram type='file'><source file=.../>
        nvram.remove(child)
    nvram.attrib.pop("type", None)
    if files_dir is None:
        nvram.text = None
    else:
        nvram.text = os.path.join(files_dir, f"{name}_VARS.fd")
