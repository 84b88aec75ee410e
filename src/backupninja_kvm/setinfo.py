"""What a set holds, beyond its bytes: ``set.json`` and ``checks.json``.

``set.json`` is written into every set (0.5 and later) before its manifest,
so ``B3SUMS`` covers it::

    {"version": 1, "domain": "web1", "uuid": "...", "freeze_time": "2026-12-02T01:00:00Z",
     "consistency": "quiesced" | "crash-consistent" | "shut-off",
     "files": [{"name": "vda-web1.qcow2", "target": "vda", "role": "disk",
                "original_path": "/var/lib/libvirt/images/web1.qcow2",
                "format": "qcow2", "virtual_size": 10737418240,
                "backing": "vda-web1.s1.qcow2", "data_file": ""}, ...]}

``role`` is ``disk`` (the top of a disk, the file the definition names),
``backing`` (a layer below it, named by ``backing`` of the layer above) or
``data`` (a qcow2's external data file, named by ``data_file``). The
machine's state besides its disks (after 0.5.0, each optional, at most one
of each, ``target`` empty, ``virtual_size`` its size in bytes): ``nvram`` (the
UEFI variable store, ``format`` raw), ``tpm`` (the swtpm state folder as a tar,
``format`` tar, ``original_path`` the folder), ``kernel``, ``initrd`` and
``dtb`` (``format`` file); see ``machine``.

A disk's top made by a run with changed blocks (``changed``) also has
``tracking``: how it was made (``full`` or ``changed``), the bytes read and
written, why full, the checkpoint started at its freeze, and what the next
night checks before it trusts that checkpoint (``Tracking``).

A set made by an earlier version has no ``set.json``: the same is read from
its ``domain.xml`` and the images (``legacy_info``). A folder that a borg or
restic extract of a ride-along view produced has the view's
``manifest.json`` instead (``view.Manifest``), read the same way.

``checks.json`` holds the results of ``verify`` and ``rehearse``, the newest
of each kind; it is written after the set is complete (so the manifest does
not list it), replaced atomically, and never read as part of the set.
"""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from backupninja_kvm import machine
from backupninja_kvm.errors import BackupNinjaKvmError
from backupninja_kvm.transfer import replace_file

SET_INFO = "set.json"
CHECKS = "checks.json"
VIEW_MANIFEST = "manifest.json"  # view.MANIFEST_NAME, in a copy of a ride-along view
VERSION = 1
IMAGE_ROLES = ("disk", "backing", "data")
ROLES = (*IMAGE_ROLES, *machine.ROLES)
CONSISTENCIES = ("quiesced", "crash-consistent", "shut-off", "unknown")
# Files of a set that are not in its manifest, and not images.
NOT_IMAGES = ("domain.xml", SET_INFO, CHECKS, "B3SUMS", "SHA256SUMS", VIEW_MANIFEST)


class SetInfoError(BackupNinjaKvmError):
    """A set's description cannot be read; the message names the file."""


@dataclass(frozen=True)
class Tracking:
    """How a disk's image came into the set, and what the next night needs
    to make its image from this one (``changed``); in set.json as the
    image's ``tracking``, absent for sets made without changed blocks."""

    how: str  # "full" (the whole image copied) or "changed" (the previous set's + changes)
    bytes_read: int  # read from the domain's image
    bytes_written: int  # written into the set (zeroed ranges not counted)
    reason: str = ""  # why a full copy, when changed blocks were wanted
    checkpoint: str = ""  # the libvirt checkpoint started just before this set's freeze
    identity: str = ""  # "DEV:INODE" of the domain's image at the freeze
    run: str = ""  # "BOOT_ID:DOMAIN_ID": the QEMU process that ran the domain
    size: int = 0  # the set's image file as written: its size ...
    mtime_ns: int = 0  # ... and modification time (a later change is seen)
    nights: int = 0  # changed-only sets since the last full copy, this one included

    def to_dict(self) -> dict:
        return {
            "how": self.how,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "reason": self.reason,
            "checkpoint": self.checkpoint,
            "identity": self.identity,
            "run": self.run,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "nights": self.nights,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Tracking:
        how = str(data["how"])
        if how not in ("full", "changed"):
            raise ValueError(f"tracking how {how!r} is not full or changed")
        return cls(
            how,
            int(data["bytes_read"]),
            int(data["bytes_written"]),
            str(data.get("reason", "")),
            str(data.get("checkpoint", "")),
            str(data.get("identity", "")),
            str(data.get("run", "")),
            int(data.get("size", 0)),
            int(data.get("mtime_ns", 0)),
            int(data.get("nights", 0)),
        )


@dataclass(frozen=True)
class SetImage:
    """One image file of a set."""

    name: str  # its file name in the set
    target: str  # the disk it belongs to (vda...)
    role: str  # disk, backing or data
    original_path: str  # where the domain had it
    format: str  # qcow2, raw...
    virtual_size: int  # bytes the guest sees (0: unknown)
    backing: str = ""  # the set's file below it, if any
    data_file: str = ""  # the set's data file of it, if any
    tracking: Tracking | None = None  # a disk's top, made by a run with changed blocks

    def to_dict(self) -> dict:
        data = {
            "name": self.name,
            "target": self.target,
            "role": self.role,
            "original_path": self.original_path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "backing": self.backing,
            "data_file": self.data_file,
        }
        if self.tracking is not None:
            data["tracking"] = self.tracking.to_dict()
        return data


@dataclass(frozen=True)
class SetInfo:
    """What ``set.json`` says of a set."""

    domain: str
    uuid: str
    freeze_time: str  # UTC, ISO 8601 with Z; "" when unknown
    consistency: str
    files: tuple[SetImage, ...] = ()
    source: str = SET_INFO  # where it was read from: set.json, manifest.json, domain.xml

    def disks(self) -> list[SetImage]:
        return [f for f in self.files if f.role == "disk"]

    def images(self) -> list[SetImage]:
        """The disks' files: tops, layers, data files."""
        return [f for f in self.files if f.role in IMAGE_ROLES]

    def state(self) -> list[SetImage]:
        """The machine-state files (``machine.ROLES``), if any."""
        return [f for f in self.files if f.role in machine.ROLES]

    def by_name(self) -> dict[str, SetImage]:
        return {f.name: f for f in self.files}

    def to_json(self) -> str:
        data = {
            "version": VERSION,
            "domain": self.domain,
            "uuid": self.uuid,
            "freeze_time": self.freeze_time,
            "consistency": self.consistency,
            "files": [f.to_dict() for f in self.files],
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> SetInfo:
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r} is not {VERSION}")
            files = tuple(
                SetImage(
                    str(f["name"]),
                    str(f["target"]),
                    str(f["role"]),
                    str(f["original_path"]),
                    str(f["format"]),
                    int(f["virtual_size"]),
                    str(f.get("backing", "")),
                    str(f.get("data_file", "")),
                    Tracking.from_dict(f["tracking"]) if f.get("tracking") else None,
                )
                for f in data["files"]
            )
            info = cls(
                str(data["domain"]),
                str(data.get("uuid", "")),
                str(data.get("freeze_time", "")),
                str(data.get("consistency", "unknown")),
                files,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SetInfoError(f"{where}: not a set description of ours ({error})") from None
        check(info, where)
        return info


def check(info: SetInfo, where: str) -> None:
    """Refuse a description whose names could point outside the set."""
    names = set()
    for item in info.files:
        if item.role not in ROLES:
            raise SetInfoError(f"{where}: {item.name}: role {item.role!r} is not one of {ROLES}")
        if not item.name or "/" in item.name or item.name in (".", "..") or item.name in NOT_IMAGES:
            raise SetInfoError(f"{where}: {item.name!r} cannot be an image's name in a set")
        if item.name in names:
            raise SetInfoError(f"{where}: {item.name} is listed twice")
        names.add(item.name)
    roles = [item.role for item in info.state()]
    for role in sorted({role for role in roles if roles.count(role) > 1}):
        raise SetInfoError(f"{where}: two files have the role {role!r}")
    for item in info.state():
        if item.backing or item.data_file:
            raise SetInfoError(f"{where}: {item.name}: a {item.role} file has no layers")
    for item in info.files:
        for other in (item.backing, item.data_file):
            if other and other not in names:
                raise SetInfoError(
                    f"{where}: {item.name} refers to {other}, which it does not list"
                )
    if info.consistency not in CONSISTENCIES:
        raise SetInfoError(f"{where}: consistency {info.consistency!r} is not known")


def utc_text(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def parse_utc(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def domain_identity(xml: str) -> tuple[str, str]:
    """(name, uuid) of a domain definition; ValueError when it is not one."""
    root = ET.fromstring(xml)
    if root.tag != "domain":
        raise ValueError(f"the root element is <{root.tag}>, not <domain>")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise ValueError("it has no <name>")
    return name, (root.findtext("uuid") or "").strip()


def read(set_path: str) -> SetInfo:
    """The description of the set (or view copy) in *set_path*."""
    path = os.path.join(set_path, SET_INFO)
    if os.path.isfile(path):
        return SetInfo.from_json(_read_text(path), path)
    view_manifest = os.path.join(set_path, VIEW_MANIFEST)
    if os.path.isfile(view_manifest):
        return from_view_manifest(set_path, _read_text(view_manifest))
    return legacy_info(set_path)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError as error:
        raise SetInfoError(f"cannot read {path}: {error.strerror}") from None


def from_view_manifest(set_path: str, text: str) -> SetInfo:
    """A copy of a ride-along view: its manifest lists each file's original
    path; which layer backs which is read from the images' headers."""
    from backupninja_kvm import view as views

    where = os.path.join(set_path, VIEW_MANIFEST)
    try:
        manifest = views.Manifest.from_json(text)
        views.check_manifest(manifest)
    except views.ViewError as error:
        raise SetInfoError(f"{where}: {error}") from None
    files = [
        SetImage(f.name, f.target, "disk", f.source, f.format, f.virtual_size)
        for f in manifest.files
    ]
    info = SetInfo(
        manifest.domain,
        _uuid_of(set_path),
        manifest.freeze_time,
        manifest.consistency,
        tuple(_link_layers(set_path, files)),
        VIEW_MANIFEST,
    )
    check(info, where)
    return info


def _uuid_of(set_path: str) -> str:
    try:
        return domain_identity(_read_text(os.path.join(set_path, "domain.xml")))[1]
    except (SetInfoError, ValueError, ET.ParseError):
        return ""


def legacy_info(set_path: str) -> SetInfo:
    """A set made before set.json: each disk of domain.xml whose image is in
    the set as TARGET-NAME; layers below it and data files from the headers."""
    from backupninja_kvm.disks import parse_disks
    from backupninja_kvm.plan import backup_file_name

    definition = os.path.join(set_path, "domain.xml")
    text = _read_text(definition)
    try:
        name, uuid = domain_identity(text)
        disks = parse_disks(text)
    except (ValueError, ET.ParseError) as error:
        raise SetInfoError(f"{definition}: the definition cannot be read ({error})") from None
    present = set(os.listdir(set_path))
    files = []
    for disk in disks:
        if not disk.path:
            continue
        file_name = backup_file_name(disk)
        if file_name in present:
            files.append(
                SetImage(file_name, disk.target, "disk", disk.path, disk.format or "raw", 0)
            )
    info = SetInfo(name, uuid, "", "unknown", tuple(_link_layers(set_path, files)), "domain.xml")
    check(info, definition)
    return info


def _link_layers(set_path: str, tops: list[SetImage]) -> list[SetImage]:
    """Follow each top's header (qemu-img info, in the set's folder) down to
    the set's files below it: a backing file or a data file that is a file
    of the set, named as the set names it (a set's headers) or by its
    original path (a view copy's headers still name the domain's files)."""
    present = set(os.listdir(set_path))
    by_original = {top.original_path: top.name for top in tops}
    result: list[SetImage] = []
    seen: set[str] = set()
    for top in tops:
        item: SetImage | None = top
        while item is not None and item.name not in seen:
            seen.add(item.name)
            header = _header(set_path, item.name)
            below_item, extra = None, []
            below = data = ""
            backing_ref = str(header.get("backing-filename") or "")
            specific = (header.get("format-specific") or {}).get("data") or {}
            data_ref = str(specific.get("data-file") or "")
            size = int(header.get("virtual-size") or item.virtual_size or 0)
            if backing_ref:
                found, original = _in_set(backing_ref, item, present, by_original)
                if found and found not in seen:
                    below = found
                    below_format = str(header.get("backing-filename-format") or "qcow2")
                    below_item = SetImage(found, top.target, "backing", original, below_format, 0)
            if data_ref:
                found, original = _in_set(data_ref, item, present, by_original)
                if found and found not in seen:
                    data = found
                    seen.add(found)
                    extra.append(SetImage(found, top.target, "data", original, "raw", size))
            result.append(
                SetImage(
                    item.name,
                    item.target,
                    item.role,
                    item.original_path,
                    str(header.get("format") or item.format),
                    size,
                    below,
                    data,
                )
            )
            result.extend(extra)
            item = below_item
    return result


def _in_set(
    reference: str, item: SetImage, present: set[str], by_original: dict[str, str]
) -> tuple[str, str]:
    """(the set's file that *reference*, a name in *item*'s header, means,
    its original path); ("", "") when the set does not hold it."""
    prefix = f"{item.target}-"
    if "/" not in reference and reference in present:  # a set's own relative name
        original = os.path.join(os.path.dirname(item.original_path), reference.removeprefix(prefix))
        return reference, original
    original = (
        reference
        if os.path.isabs(reference)
        else os.path.normpath(os.path.join(os.path.dirname(item.original_path), reference))
    )
    if original in by_original:
        return by_original[original], original
    candidate = prefix + os.path.basename(reference)
    return (candidate, original) if candidate in present else ("", "")


def _header(set_path: str, name: str) -> dict:
    """``qemu-img info`` of one file, without opening its backing file."""
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", name],
        cwd=set_path,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return {}
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# checks.json: {"verify": {...}, "rehearse": {...}}, each with "time" (UTC),
# "ok" (bool) and "summary" (one line), verify also "problems" (list).


def read_checks(set_path: str) -> dict:
    try:
        with open(os.path.join(set_path, CHECKS), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_check(set_path: str, kind: str, result: dict) -> None:
    """Keep *result* as the newest check of *kind* in the set's checks.json
    (mkstemp in the set's folder, then rename: never through a link)."""
    checks = read_checks(set_path)
    checks[kind] = result
    text = json.dumps(checks, indent=2, sort_keys=True) + "\n"
    replace_file(os.path.join(set_path, CHECKS), text.encode(), ".checks.")
