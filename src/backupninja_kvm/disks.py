"""Disks of a domain, read from its XML: which to back up, and the snapshot XML.

Pure functions on XML text and plain data, testable without a hypervisor.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from backupninja_kvm import TAG

BACKED_UP_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class Disk:
    """One ``<disk>`` of a domain, as the XML shows it."""

    target: str  # vda, sdb...
    device: str  # disk, cdrom, floppy, lun
    source_type: str  # file, block, network, volume...
    path: str | None  # the top image file (the active layer)
    format: str | None  # qcow2, raw...
    readonly: bool = False
    shareable: bool = False
    alias: str | None = None  # live XML only: virtio-disk0...
    backing: str | None = None  # path of the top image's backing file, if any
    mirror: bool = False  # a block job (copy/commit) is attached
    mirror_ready: bool = False  # ... and is ready to pivot


@dataclass(frozen=True)
class SkippedDisk:
    disk: Disk
    reason: str


def parse_disks(domain_xml: str) -> list[Disk]:
    """Every ``<disk>`` element of a domain XML, in document order."""
    root = ET.fromstring(domain_xml)
    disks = []
    for element in root.findall("./devices/disk"):
        source = element.find("source")
        driver = element.find("driver")
        target = element.find("target")
        alias = element.find("alias")
        backing_source = element.find("./backingStore/source")
        mirror = element.find("mirror")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name")
        disks.append(
            Disk(
                target=target.get("dev", "?") if target is not None else "?",
                device=element.get("device", "disk"),
                source_type=element.get("type", "file"),
                path=path,
                format=driver.get("type") if driver is not None else None,
                readonly=element.find("readonly") is not None,
                shareable=element.find("shareable") is not None,
                alias=alias.get("name") if alias is not None else None,
                backing=backing_source.get("file") if backing_source is not None else None,
                mirror=mirror is not None,
                mirror_ready=mirror is not None and mirror.get("ready") == "yes",
            )
        )
    return disks


def skip_reason(disk: Disk) -> str | None:
    """Why *disk* is not backed up, or None when it is."""
    if disk.device == "cdrom":
        return "cdrom"
    if disk.device == "floppy":
        return "floppy"
    if disk.device == "lun":
        return "lun (passthrough device)"
    if disk.readonly:
        return "read-only"
    if disk.shareable:
        return "shareable (used by several domains)"
    if disk.source_type == "network":
        return "network disk"
    if disk.source_type != "file":
        return f"{disk.source_type} disk, only file-backed images are backed up"
    if not disk.path:
        return "no image file (empty drive)"
    if disk.format not in BACKED_UP_FORMATS:
        return f"format {disk.format or 'unknown'}, only qcow2 and raw are backed up"
    return None


def select_disks(disks: list[Disk]) -> tuple[list[Disk], list[SkippedDisk]]:
    """Split disks into those to back up and those skipped (with the reason)."""
    chosen, skipped = [], []
    for disk in disks:
        reason = skip_reason(disk)
        if reason is None:
            chosen.append(disk)
        else:
            skipped.append(SkippedDisk(disk, reason))
    return chosen, skipped


# The stamp: UTC with a Z since 0.3 (20261127T010000Z), local time before.
_OUR_SUFFIX = re.compile(rf"\.{TAG}-\d{{8}}T\d{{6}}Z?(\.qcow2)?$")


def is_our_overlay(path: str) -> bool:
    """True when *path* is named like one of our overlays."""
    return bool(_OUR_SUFFIX.search(os.path.basename(path)))


def overlay_created(path: str) -> str:
    """When one of our overlays was made, read from the stamp in its name
    (``2026-11-27 01:00:00 UTC``, or without the zone for a local-time stamp
    of an earlier version), or "?" for another name."""
    match = _OUR_SUFFIX.search(os.path.basename(path))
    if not match:
        return "?"
    stamp = match.group(0).split("-", 1)[1][:16]
    zone = " UTC" if stamp.endswith("Z") else ""
    return (
        f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}" + zone
    )


def overlay_path(disk: Disk, stamp: str, overlaydir: str = "", domain: str = "") -> str:
    """Where the overlay for *disk* goes: next to the image, or in *overlaydir*.

    The name is the image's name (less a ``.qcow2`` extension) plus our tag and
    the run's timestamp; a tag left by an earlier ``merge = pull`` is replaced
    rather than stacked.
    """
    assert disk.path
    base = _OUR_SUFFIX.sub("", os.path.basename(disk.path))
    stem = base.removesuffix(".qcow2")
    name = f"{stem}.{TAG}-{stamp}.qcow2"
    if overlaydir:
        return os.path.join(overlaydir, f"{domain}-{disk.target}-{name}")
    return os.path.join(os.path.dirname(disk.path), name)


def overlay_paths(
    disks: list[Disk], stamp: str, overlaydir: str = "", domain: str = ""
) -> dict[str, str]:
    """target -> overlay path for each disk, distinct even when two images
    differ only by a ``.qcow2`` extension (``disk`` and ``disk.qcow2``)."""
    paths = {d.target: overlay_path(d, stamp, overlaydir, domain) for d in disks}
    if len(set(paths.values())) < len(paths):
        paths = {
            target: path.replace(f".{TAG}-", f".{target}.{TAG}-") for target, path in paths.items()
        }
    return paths


def snapshot_xml(all_disks: list[Disk], overlays: dict[str, str]) -> str:
    """The XML for one disk-only external snapshot.

    Every disk is listed: the ones in *overlays* (target -> overlay path) get
    an external qcow2 overlay, all others ``snapshot='no'``; a disk left out
    would be snapshotted by libvirt under a generated name.
    """
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "description").text = f"{TAG} backup overlay"
    disks_element = ET.SubElement(root, "disks")
    for disk in all_disks:
        element = ET.SubElement(disks_element, "disk", name=disk.target)
        if disk.target in overlays:
            element.set("snapshot", "external")
            ET.SubElement(element, "driver", type="qcow2")
            ET.SubElement(element, "source", file=overlays[disk.target])
        else:
            element.set("snapshot", "no")
    return ET.tostring(root, encoding="unicode")


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def has_guest_agent(domain_xml: str) -> bool:
    """True when the domain has a QEMU guest agent channel (whether an agent
    answers on it is for the guest to say)."""
    root = ET.fromstring(domain_xml)
    return any(
        target.get("name") == GUEST_AGENT_CHANNEL
        for target in root.findall("./devices/channel/target")
    )


def guest_agent_connected(domain_xml: str) -> bool:
    """True when an agent is connected on the guest agent channel (libvirt
    tracks it in the live XML: state='connected')."""
    root = ET.fromstring(domain_xml)
    return any(
        target.get("name") == GUEST_AGENT_CHANNEL and target.get("state") == "connected"
        for target in root.findall("./devices/channel/target")
    )


def top_paths(domain_xml: str) -> dict[str, str | None]:
    """target -> path of the top image, for every disk of a domain XML."""
    return {disk.target: disk.path for disk in parse_disks(domain_xml)}


def referenced_paths(domain_xml: str) -> set[str]:
    """Every file any disk chain of a domain XML refers to (tops, backing
    layers, block job mirrors)."""
    root = ET.fromstring(domain_xml)
    return {
        file
        for disk in root.findall("./devices/disk")
        for source in disk.iter("source")
        if (file := source.get("file"))
    }


def with_disk_source(domain_xml: str, target: str, path: str, image_format: str) -> str:
    """The domain XML with disk *target* pointing at *path* (format
    *image_format*), any backing chain description dropped."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", path)
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", image_format)
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
        return ET.tostring(root, encoding="unicode")
    raise KeyError(f"no disk {target} in the domain XML")
