"""Disks of a domain, read from its XML: which to back up, and the snapshot XML.

Pure functions on XML text and plain data, testable without a hypervisor.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

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
    data_file: str | None = None  # a qcow2's external data file (<dataStore>), if any


# How a skipped disk is reported: INFO when it holds none of the VM's data
# (an install medium, an empty drive), WARNING when its data is not saved
# (backupninja's report mail shows warnings, never Info lines), ERROR when
# part of a disk that is backed up could not be saved.
INFO, WARNING, ERROR = "info", "warning", "error"


@dataclass(frozen=True)
class SkippedDisk:
    disk: Disk
    reason: str
    level: str = WARNING


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
        data_store = element.find("./source/dataStore/source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name")
        data_file = None
        if data_store is not None:
            data_file = data_store.get("file") or data_store.get("dev") or "?"
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
                backing=(backing_source.get("file") or backing_source.get("dev"))
                if backing_source is not None
                else None,
                mirror=mirror is not None,
                mirror_ready=mirror is not None and mirror.get("ready") == "yes",
                data_file=data_file,
            )
        )
    return disks


# Why a block disk is not backed up when the run cannot take it: its
# overlay is a file, and a device has no folder beside it.
BLOCK_NEEDS_OVERLAYDIR = (
    "block disk: its overlay must be a file in [source] overlaydir, which is not set; "
    "set overlaydir to back it up"
)
BLOCK_NOT_WITH_PULL = (
    "block disk: merge = pull would move its data off the device into a file in "
    "overlaydir for good; use merge = commit to back it up"
)
BLOCK_NOT_EXPOSED = (
    "block disk: stage = freeze exposes files, not devices; back it up with stage = full"
)
NETWORK_DISK = (
    "network disk (RBD, iSCSI, NBD, Gluster...): its image is on a storage server, "
    "not a local file or device; back it up on that storage"
)


def skip_reason(disk: Disk, block_refusal: str | None = BLOCK_NEEDS_OVERLAYDIR) -> str | None:
    """Why *disk* is not backed up, or None when it is. A block disk (raw,
    on a local device) is backed up unless *block_refusal* says why not."""
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
        return NETWORK_DISK
    if disk.source_type == "block":
        if block_refusal:
            return block_refusal
        if not disk.path:
            return "block disk without a device"
        if disk.format != "raw":
            return (
                f"block disk in format {disk.format or 'unknown'}, only raw devices are backed up"
            )
        return None
    if disk.source_type != "file":
        return f"{disk.source_type} disk, only image files and block devices are backed up"
    if not disk.path:
        return "no image file (empty drive)"
    if disk.format not in BACKED_UP_FORMATS:
        return f"format {disk.format or 'unknown'}, only qcow2 and raw are backed up"
    return None


def skip_level(disk: Disk) -> str:
    """How a skipped *disk* is reported: INFO when it holds none of the VM's
    data (a cdrom's install medium, an empty or read-only floppy drive, a
    drive without media), WARNING for everything else: a read-only,
    shareable, block, network or passthrough disk has data that the set
    does not hold."""
    if disk.device == "cdrom":
        return INFO
    if disk.device == "floppy" and (disk.readonly or not disk.path):
        return INFO
    if disk.device in ("disk", "floppy") and disk.source_type == "file" and not disk.path:
        return INFO
    return WARNING


def select_disks(
    disks: list[Disk], block_refusal: str | None = BLOCK_NEEDS_OVERLAYDIR
) -> tuple[list[Disk], list[SkippedDisk]]:
    """Split disks into those to back up and those skipped (with the reason
    and how loudly to report it); see ``skip_reason`` for *block_refusal*."""
    chosen, skipped = [], []
    for disk in disks:
        reason = skip_reason(disk, block_refusal)
        if reason is None:
            chosen.append(disk)
        else:
            skipped.append(SkippedDisk(disk, reason, skip_level(disk)))
    return chosen, skipped


@dataclass(frozen=True)
class Layer:
    """One image file of a disk's chain, as ``qemu-img info`` shows it."""

    path: str
    format: str
    backing_name: str | None = None  # the backing file as the header names it
    data_file: str | None = None  # qcow2 external data file, absolute
    virtual_size: int = field(default=0, compare=False)  # bytes the guest sees
    compat: str = field(default="", compare=False)  # a qcow2's version: 1.1 (v3) or 0.10 (v2)


def parse_chain(info: list[dict]) -> list[Layer]:
    """The layers of ``qemu-img info --backing-chain --output=json`` (a list,
    top first). A relative data file name is taken relative to its image."""
    layers = []
    for entry in info:
        path = str(entry.get("filename", ""))
        specific = (entry.get("format-specific") or {}).get("data") or {}
        data_file = specific.get("data-file")
        if data_file and not os.path.isabs(data_file):
            data_file = os.path.join(os.path.dirname(path), data_file)
        layers.append(
            Layer(
                path=path,
                format=str(entry.get("format", "raw")),
                backing_name=entry.get("backing-filename"),
                data_file=data_file or None,
                virtual_size=int(entry.get("virtual-size") or 0),
                compat=str(specific.get("compat") or ""),
            )
        )
    return layers


@dataclass(frozen=True)
class ChainPlan:
    """Which layers of one disk's chain go into the set.

    ``copied``: the top and, with ``backing = chain``, each layer below it
    that no other domain uses. ``own_left``: layers that belong to no other
    domain but are not copied (``backing = top``): their data is in no set.
    ``shared``: the first layer another domain also uses (a template) and
    everything below it; ``shared_with`` names those domains.
    """

    copied: tuple[Layer, ...]
    own_left: tuple[Layer, ...] = ()
    shared: tuple[Layer, ...] = ()
    shared_with: tuple[str, ...] = ()


def plan_chain(layers: list[Layer], owners: dict[str, set[str]], backing: str) -> ChainPlan:
    """Decide which layers of a chain (top first) are copied.

    *owners* maps the real path of every image another domain uses (in its
    live or persistent chain) to those domains' names. A layer that another
    domain uses is a shared template: it and every layer below it stay out
    of the set (they are the other domains' base too). The layers above it
    are this domain's own data: copied with *backing* ``chain``, left out
    (to be reported) with ``top``.
    """
    if not layers:
        return ChainPlan(())
    below = list(layers[1:])
    own: list[Layer] = []
    shared_with: tuple[str, ...] = ()
    for position, layer in enumerate(below):
        users = owners.get(os.path.realpath(layer.path))
        if users:
            shared_with = tuple(sorted(users))
            shared = tuple(below[position:])
            break
        own.append(layer)
    else:
        shared = ()
    if backing == "chain":
        return ChainPlan((layers[0], *own), (), shared, shared_with)
    return ChainPlan((layers[0],), tuple(own), shared, shared_with)


# The stamp: UTC with a Z since 0.3 (20261127T010000Z), local time before.
_OUR_SUFFIX = re.compile(rf"\.{TAG}-\d{{8}}T\d{{6}}Z?(\.qcow2)?$")


def is_our_overlay(path: str) -> bool:
    """True when *path* is named like one of our overlays."""
    return bool(_OUR_SUFFIX.search(os.path.basename(path)))


def strip_tag(name: str) -> str:
    """*name* without our tag and stamp (and the ``.qcow2`` that follows them)."""
    return _OUR_SUFFIX.sub("", name)


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
    rather than stacked. A symlinked image is followed: the overlay goes next
    to the real file (its filesystem, where the guest's writes must fit),
    named after it. A block disk's overlay is always in *overlaydir* (the
    plan skips it without one), named after the device as the XML names it
    (``/dev/vg/lv``, not ``/dev/dm-3``).
    """
    assert disk.path
    if disk.source_type == "block":
        if not overlaydir:
            raise ValueError(f"disk {disk.target} is a block device: its overlay needs overlaydir")
        name = f"{os.path.basename(disk.path)}.{TAG}-{stamp}.qcow2"
        return os.path.join(overlaydir, f"{domain}-{disk.target}-{name}")
    real = os.path.realpath(disk.path)
    base = _OUR_SUFFIX.sub("", os.path.basename(real))
    prefix = f"{domain}-{disk.target}-"
    if overlaydir and base != os.path.basename(real):
        base = base.removeprefix(prefix)  # an earlier pull's image: no prefix stacked
    stem = base.removesuffix(".qcow2")
    name = f"{stem}.{TAG}-{stamp}.qcow2"
    if overlaydir:
        return os.path.join(overlaydir, f"{prefix}{name}")
    return os.path.join(os.path.dirname(real), name)


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
            element.set("type", "file")  # a block disk's overlay too
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
    """Every file or device any disk chain of a domain XML refers to (tops,
    backing layers, block job mirrors)."""
    root = ET.fromstring(domain_xml)
    return {
        file
        for disk in root.findall("./devices/disk")
        for source in disk.iter("source")
        if (file := source.get("file") or source.get("dev"))
    }


def with_disk_source(
    domain_xml: str, target: str, path: str, image_format: str, block: bool = False
) -> str:
    """The domain XML with disk *target* pointing at *path* (format
    *image_format*; a block device when *block*), any backing chain
    description dropped."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        disk.set("type", "block" if block else "file")
        source.set("dev" if block else "file", path)
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", image_format)
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
        return ET.tostring(root, encoding="unicode")
    raise KeyError(f"no disk {target} in the domain XML")
