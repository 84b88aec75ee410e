"""Changed blocks: make a night's set from the previous set and what changed.

With ``[dest] changed_blocks = auto`` (the default), each qcow2 disk of a
running domain that a local set holds as one file gets a libvirt checkpoint
(a persistent dirty bitmap in the image, libvirt's own bookkeeping) just
before the freeze. The next night, the disk's new image is made from the
previous set's image and only the extents the previous checkpoint's bitmap
marks, read from the frozen base while the domain runs on its overlay:

    before the freeze   clone the previous set's image into the new set
                        (FICLONE: shared extents on XFS or btrfs; elsewhere
                        a sparse copy of the destination's own file), and
                        start checkpoint C(N) covering the disks
    freeze              the snapshot; the base is now read-only to QEMU,
                        which wrote C(N-1)'s bitmap into it, not in use
    ship                read C(N-1)'s dirty extents from the base's header
                        (``bitmaps``); copy each extent from the base into
                        the clone, both exported by one
                        qemu-storage-daemon over NBD (libnbd); zero blocks
                        become zero clusters
    after the set       delete every checkpoint of ours but C(N)

Writes between C(N) and the freeze land in both bitmaps: counted twice,
never missed. libvirt carries the bitmaps into the overlay at the snapshot
and merges them back at the pivot, and the commit's own writes mark the
base's bitmaps, so the window's writes are in C(N) too. Every set stays a
complete qcow2 image: its manifest is that of the whole file, ``verify``
and ``restore`` see no difference, and pruning any set never touches
another.

Trust nothing: a disk is copied whole, with an Info line saying why, when
the chain cannot be proven intact: no previous set, or it has no record of
this disk's checkpoint; the previous image changed since it was written
(size, modification time), is not in its manifest, or failed ``verify``;
the checkpoint is gone, or libvirt reports its bitmap inconsistent (QEMU
was killed), or the bitmap in the frozen base is missing or in use; the
disk's path, file (a restore, a replaced image) or virtual size changed;
the domain was restarted since (a new QEMU process: something may have
written the image while it was off); or ``full_every`` nights have passed.

Checkpoints are named ``bnkvm-TAG-STAMP``, TAG from the destination's
folder, so two actions backing the same domain up to two places keep their
own; one not of ours is never touched. A kill at any point leaves at most
one checkpoint that no set names: the next night deletes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import types
import xml.sax.saxutils
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from backupninja_kvm import bitmaps, destination, faults, images, setinfo
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import Disk
from backupninja_kvm.errors import HypervisorError, TransferError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import Plan, SetFile
from backupninja_kvm.report import human_bytes, log

PREFIX = "bnkvm-"
FICLONE = 0x40049409
CHUNK = 4 * 1024 * 1024
_ZERO = bytes(CHUNK)
_PR_SET_PDEATHSIG = 1
BOOT_ID = "/proc/sys/kernel/random/boot_id"
QEMU_PID_DIR = "/run/libvirt/qemu"  # qemu:///system's NAME.pid files
EXPORT_TIMEOUT = 30.0
CHANGES_ROOT = "/var/tmp"  # the exports' sockets, the changes for a remote set

_nbd: types.ModuleType | None
try:  # libnbd's bindings: Debian's python3-libnbd (not on PyPI)
    import nbd as _nbd_module

    _nbd = _nbd_module
    _NbdError: type[Exception] = _nbd_module.Error
except ImportError:
    _nbd = None
    _NbdError = OSError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]


@dataclass
class DiskNight:
    """One disk's top in tonight's set, and how it is made."""

    item: SetFile
    identity: str  # "DEV:INODE" of the domain's image
    since: str = ""  # read what changed since this checkpoint; "" copies it whole
    previous: str = ""  # the previous set's image the clone is made of
    reason: str = ""  # why it is copied whole
    nights: int = 0  # changed-only sets before this one since a full copy
    bytes_read: int = 0
    bytes_written: int = 0
    cloned: bool = False  # made from the previous image (not a full copy)
    reflinked: bool = False  # ... sharing its extents

    @property
    def changed(self) -> bool:
        return bool(self.since)


@dataclass
class Night:
    """What changed blocks do for one domain tonight."""

    domain: str
    tag: str
    checkpoint: str  # C(N), started just before the freeze
    run: str
    disks: dict[str, DiskNight] = field(default_factory=dict)  # by the image's name in the set
    started: bool = False  # C(N) exists

    def tracking(self, copied: dict[str, int]) -> dict[str, setinfo.Tracking]:
        """set.json's record of each tracked image (call after the copy);
        *copied*: the bytes of each file copied whole (for a remote set,
        what rsync sent)."""
        records = {}
        for name, disk in self.disks.items():
            whole = copied.get(name, 0)
            records[name] = setinfo.Tracking(
                how="changed" if disk.changed else "full",
                bytes_read=disk.bytes_read if disk.changed else whole,
                bytes_written=disk.bytes_written if disk.changed else whole,
                reason=disk.reason,
                checkpoint=self.checkpoint if self.started else "",
                identity=disk.identity,
                run=self.run,
                nights=disk.nights + 1 if disk.changed else 0,
            )
        return records

    def changed_names(self) -> set[str]:
        return {name for name, disk in self.disks.items() if disk.changed}


def destination_tag(backup_set: destination.AnySet) -> str:
    """Eight hex digits naming the destination folder (and its host) in a
    checkpoint's name."""
    if isinstance(backup_set, destination.RemoteBackupSet):
        folder = f"{backup_set.remote.label}:{os.path.dirname(backup_set.domain_dir)}"
    else:
        folder = os.path.dirname(os.path.realpath(backup_set.domain_dir))
    return hashlib.sha256(folder.encode()).hexdigest()[:8]


def checkpoint_name(tag: str, stamp: str) -> str:
    return f"{PREFIX}{tag}-{stamp}"


def run_identity(domain: Domain) -> str:
    """BOOT_ID:DOMAIN_ID:START of the QEMU process that runs the domain now
    (START: its start time in clock ticks since boot, from /proc; a domain id
    alone may come back after a restart of libvirtd)."""
    try:
        with open(BOOT_ID) as handle:
            boot = handle.read().strip()
    except OSError:
        boot = "unknown"
    start = ""
    try:
        with open(os.path.join(QEMU_PID_DIR, f"{domain.name}.pid")) as handle:
            pid = int(handle.read().strip())
        with open(f"/proc/{pid}/stat") as handle:
            start = handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, IndexError):
        start = "unknown"
    return f"{boot}:{domain.run_id()}:{start}"


def file_identity(path: str) -> str:
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


# --- before the freeze -------------------------------------------------------


def prepare(
    domain: Domain, plan: Plan, settings: Settings, backup_set: destination.AnySet
) -> Night | None:
    """Decide, per disk, whether tonight copies it whole or only what
    changed; delete the checkpoints of ours that no set needs; clone the
    previous images. None when changed blocks do not apply to this run.

    Call with the domain's lock held, after ``backup_set.begin()``.
    """
    why_not = _why_not(plan, settings, backup_set)
    if why_not == _SILENT:
        return None
    sweep_changes()  # what a killed night left in CHANGES_ROOT
    if why_not:
        log.info("%s: %s", plan.name, why_not)
        return None
    night, never = _night(domain, plan, backup_set)
    for target, unfit in never:
        log.info("%s: %s: copied whole every night: %s", plan.name, target, unfit)
    if not night.disks:
        return None
    stale = _decide(domain, settings, backup_set, night)
    for name in stale:
        _delete(domain, name, "no set needs it")
    for tracked in night.disks.values():
        if not tracked.reason:
            _clone(plan.name, backup_set, tracked)
        if tracked.reason:
            log.info("%s: %s: copied whole: %s", plan.name, tracked.item.target, tracked.reason)
    if isinstance(backup_set, destination.BackupSet):  # keep each tracked image's sum as a tree
        backup_set.trees = {
            name: tracked.previous if tracked.reflinked else ""
            for name, tracked in night.disks.items()
        }
    return night


_SILENT = "-"  # changed blocks are off, or nothing runs: nothing to say


def _why_not(plan: Plan, settings: Settings, backup_set: destination.AnySet) -> str:
    """Why changed blocks do not apply to this run at all (an Info line), or
    "" when they do, or _SILENT."""
    if settings.changed_blocks == "no" or not plan.active or not plan.disks:
        return _SILENT
    missing = _missing_tools()
    if missing:
        return f"changed blocks need {missing}: whole copies"
    if settings.merge != "commit":
        return (
            "changed blocks need merge = commit (a pull makes the overlay the image): whole copies"
        )
    if isinstance(backup_set, destination.RemoteBackupSet):
        remote_missing = _remote_missing_tools(backup_set)
        if remote_missing:
            return (
                f"changed blocks need {remote_missing} on {backup_set.remote.label}: whole "
                f"images, sent by rsync's delta"
            )
    return ""


def _night(
    domain: Domain, plan: Plan, backup_set: destination.AnySet
) -> tuple[Night, list[tuple[str, str]]]:
    """Tonight's Night with the disks that can be tracked, and (target, why)
    of each disk that never can."""
    tag = destination_tag(backup_set)
    night = Night(plan.name, tag, checkpoint_name(tag, backup_set.stamp), run_identity(domain))
    by_target = {d.target: d for d in plan.disks}
    never = []
    for item in plan.files:
        disk = by_target.get(item.target)
        if disk is None or item.role != "disk" or item.source != disk.path:
            continue
        unfit = _unfit(disk, item, plan)
        if unfit:
            never.append((disk.target, unfit))
        else:
            night.disks[item.name] = DiskNight(item, file_identity(item.source))
    return night, never


def _decide(
    domain: Domain, settings: Settings, backup_set: destination.AnySet, night: Night
) -> list[str]:
    """Set each tracked disk's reason to be copied whole, or what it is made
    from (``_why_full``); returns the checkpoints of ours that no set needs
    (which the caller deletes or reports). Changes nothing itself."""
    previous = _previous_set(backup_set)
    ours = [c for c in domain.checkpoints() if c.startswith(f"{PREFIX}{night.tag}-")]
    wanted = _still_needed(previous, night)
    present = set(ours) & wanted
    for tracked in night.disks.values():
        tracked.reason = _why_full(domain, settings, previous, tracked, night, present)
    return [name for name in ours if name not in wanted]


def forecast(
    domain: Domain, plan: Plan, settings: Settings, backup_set: destination.AnySet
) -> list[str]:
    """What ``prepare`` would decide for each disk tonight, as lines for
    ``run --test`` (each starts with the domain's name); changes nothing:
    no checkpoint is deleted, no image cloned."""
    why_not = _why_not(plan, settings, backup_set)
    if why_not == _SILENT:
        return []
    if why_not:
        return [f"{plan.name}: {why_not}"]
    night, never = _night(domain, plan, backup_set)
    lines = [f"{plan.name}: {t}: would copy whole every night: {why}" for t, why in never]
    if not night.disks:
        return lines
    for name in _decide(domain, settings, backup_set, night):
        lines.append(f"{plan.name}: would delete the checkpoint {name}: no set needs it")
    for tracked in night.disks.values():
        target = tracked.item.target
        if tracked.reason:
            lines.append(f"{plan.name}: {target}: would copy whole: {tracked.reason}")
        else:
            since_set = os.path.basename(os.path.dirname(tracked.previous))
            lines.append(
                f"{plan.name}: {target}: would copy only the blocks changed since the "
                f"checkpoint {tracked.since} (the set {since_set})"
            )
    lines.append(f"{plan.name}: would start the checkpoint {night.checkpoint} before the freeze")
    return lines


def _missing_tools() -> str:
    if shutil.which("qemu-storage-daemon") is None:
        return "qemu-storage-daemon (Debian package qemu-system-common)"
    if _nbd is None:
        return "libnbd's Python module (Debian package python3-libnbd)"
    return ""


def _unfit(disk: Disk, item: SetFile, plan: Plan) -> str:
    """Why this disk cannot be tracked at all, or ''."""
    if disk.source_type != "file":
        return "a block device is raw: libvirt 9.0 keeps no bitmap for it"
    if disk.format != "qcow2":
        return f"its image is {disk.format}: libvirt 9.0 keeps bitmaps in qcow2 images only"
    if disk.backing:
        return "its image has a backing file (a template the set does not hold)"
    if (
        item.backing
        or item.data_file
        or any(f.target == item.target and f is not item for f in plan.files)
    ):
        return "the set holds more than its one image file (layers, a data file)"
    try:
        layer = images.chain(item.source)[0]
    except images.ImageError as error:
        return str(error)
    if layer.compat != "1.1":
        return f"its qcow2 is version {layer.compat or 'unknown'} (compat 1.1 holds bitmaps)"
    return ""


@dataclass(frozen=True)
class _Previous:
    path: str
    info: setinfo.SetInfo
    manifest: set[str]
    verify_failed: bool
    stats: dict[str, tuple[int, int]] | None = None  # remote: name -> (size, mtime_ns)

    def stat(self, name: str) -> tuple[int, int]:
        """(size, mtime_ns) of a file of the set; OSError when it is not there."""
        if self.stats is None:
            status = os.stat(os.path.join(self.path, name))
            return status.st_size, status.st_mtime_ns
        if name not in self.stats:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return self.stats[name]


# A remote set, for the next night: set.json, "@checks", checks.json,
# "@manifest", the manifest's names, "@stat", "SIZE SECONDS.NANOSECONDS NAME"
# per file.
_DESCRIBE = """cd "$1" || exit 3
cat set.json || exit 3
echo @checks; cat checks.json 2>/dev/null; echo
echo @manifest
for m in B3SUMS SHA256SUMS; do [ -f "$m" ] && { sed 's/^[^ ]*  //' "$m"; break; }; done
echo @stat
stat -c '%s %.9Y %n' -- * 2>/dev/null
exit 0
"""


def _previous_set(backup_set: destination.AnySet) -> _Previous | str:
    """The newest complete set of the domain with images, or why there is none."""
    entries = [e for e in backup_set.entries() if e.has_images]
    if not entries:
        return "no earlier set"
    path = os.path.join(backup_set.domain_dir, entries[-1].stamp)
    if isinstance(backup_set, destination.RemoteBackupSet):
        return _previous_remote(backup_set, path)
    try:
        info = setinfo.read(path)
    except setinfo.SetInfoError as error:
        return f"the previous set cannot be read: {error}"
    manifest = set()
    try:
        with open(os.path.join(path, destination.MANIFEST), errors="replace") as handle:
            for line in handle:
                _, _, name = line.rstrip("\n").partition("  ")
                manifest.add(name)
    except OSError:
        return f"the previous set {path} has no {destination.MANIFEST}"
    verify = setinfo.read_checks(path).get("verify")
    failed = isinstance(verify, dict) and verify.get("ok") is False
    return _Previous(path, info, manifest, failed)


def _previous_remote(backup_set: destination.RemoteBackupSet, path: str) -> _Previous | str:
    where = f"{backup_set.remote.label}:{path}"
    try:
        output = backup_set.remote.run(_DESCRIBE, path)
    except TransferError as error:
        return f"the previous set {where} cannot be read: {error}"
    info_text, _, rest = output.partition("\n@checks\n")
    checks_text, _, rest = rest.partition("\n@manifest\n")
    manifest_text, _, stat_text = rest.partition("@stat\n")
    try:
        info = setinfo.SetInfo.from_json(info_text, f"{where}/set.json")
    except setinfo.SetInfoError as error:
        return f"the previous set cannot be read: {error}"
    try:
        checks = json.loads(checks_text) if checks_text.strip() else {}
    except ValueError:
        checks = {}
    manifest = {line for line in manifest_text.splitlines() if line}
    if not manifest:
        return f"the previous set {where} has no manifest"
    stats = _parse_stats(stat_text)
    verify = checks.get("verify") if isinstance(checks, dict) else None
    failed = isinstance(verify, dict) and verify.get("ok") is False
    return _Previous(path, info, manifest, failed, stats)


def _remote_missing_tools(backup_set: destination.RemoteBackupSet) -> str:
    """What the remote host lacks to build a set from changes, or ''."""
    try:
        backup_set.remote.run("command -v qemu-img >/dev/null || exit 3")
    except TransferError as error:
        return "qemu-img (qemu-utils)" if error.status == 3 else f"a shell ({error})"
    return ""


def _still_needed(previous: _Previous | str, night: Night) -> set[str]:
    if isinstance(previous, str):
        return set()
    return {
        item.tracking.checkpoint
        for item in previous.info.disks()
        if item.tracking is not None and item.tracking.checkpoint.startswith(PREFIX + night.tag)
    }


def _why_full(
    domain: Domain,
    settings: Settings,
    previous: _Previous | str,
    disk: DiskNight,
    night: Night,
    present: set[str],
) -> str:
    """Why *disk* must be copied whole tonight, or '' (then ``since`` is set)."""
    if isinstance(previous, str):
        return previous
    stamp = os.path.basename(previous.path)
    old = next((f for f in previous.info.disks() if f.target == disk.item.target), None)
    if old is None or old.tracking is None:
        return f"the previous set {stamp} has no record of its changes"
    tracking = old.tracking
    if not tracking.checkpoint:
        return f"the previous set {stamp} was made without a checkpoint"
    if settings.full_every and tracking.nights >= settings.full_every:
        return f"{tracking.nights} changed-only sets since the last full copy (full_every)"
    if previous.verify_failed:
        return f"the previous set {stamp} failed its verification"
    if old.name not in previous.manifest:
        return f"the previous set {stamp} has no sum of {old.name}"
    image = os.path.join(previous.path, old.name)
    try:
        status = previous.stat(old.name)
    except OSError as error:
        return f"the previous image {image} cannot be read: {error.strerror}"
    if status != (tracking.size, tracking.mtime_ns):
        return f"the previous image {image} changed since it was written"
    if old.original_path != disk.item.source:
        return f"its image is now {disk.item.source}, not {old.original_path}"
    if tracking.identity != disk.identity:
        return f"{disk.item.source} is another file than at the previous set (restored, replaced)"
    if old.virtual_size != disk.item.virtual_size:
        return (
            f"its size changed from {human_bytes(old.virtual_size)} to "
            f"{human_bytes(disk.item.virtual_size)}"
        )
    if tracking.run != night.run:
        return (
            "the domain was restarted since the previous set (its image may have been "
            "written while it was off)"
        )
    if tracking.checkpoint not in present:
        return f"the checkpoint {tracking.checkpoint} is gone"
    try:
        sizes = domain.checkpoint_sizes(tracking.checkpoint)
    except HypervisorError as error:
        return f"the checkpoint {tracking.checkpoint} cannot be read: {error.reason}"
    if disk.item.target not in sizes:
        return f"the checkpoint {tracking.checkpoint} does not cover it"
    if sizes[disk.item.target] is None:
        return (
            f"the bitmap of checkpoint {tracking.checkpoint} is not consistent "
            f"(QEMU stopped without saving it)"
        )
    disk.since = tracking.checkpoint
    disk.previous = image
    disk.nights = tracking.nights
    return ""


_REMOTE_CLONE = 'cp --reflink=auto --sparse=always -- "$1" "$2" && chmod 600 -- "$2"'


def _clone(domain: str, backup_set: destination.AnySet, disk: DiskNight) -> None:
    """The new image starts as the previous one: shared extents where the
    filesystem can (FICLONE), else a sparse copy; on failure a full copy."""
    target = os.path.join(backup_set.partial_path, disk.item.name)
    if isinstance(backup_set, destination.RemoteBackupSet):
        try:
            backup_set.remote.run(_REMOTE_CLONE, disk.previous, target)
        except TransferError as error:
            disk.reason = f"the previous image cannot be copied on the remote host: {error}"
            disk.since = disk.previous = ""
            return
        disk.cloned = True
        return
    try:
        with open(disk.previous, "rb") as source:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.ioctl(fd, FICLONE, source.fileno())
                disk.reflinked = True
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
            finally:
                os.close(fd)
        if not disk.reflinked:
            os.unlink(target)
            destination.copy_sparse(disk.previous, target)
            # On disk now, before the freeze: else the flush that ends the copy
            # of the changes writes the whole copy back while the domain is on
            # its overlay (make bench, ext4: 2.7 s on the overlay at 1 %).
            destination.sync_file(target)
    except (OSError, TransferError) as error:
        _remove(target)
        disk.reason = f"the previous image cannot be copied: {getattr(error, 'strerror', error)}"
        disk.since = disk.previous = ""
        return
    disk.cloned = True
    log.debug(
        "%s: %s: started from %s (%s)",
        domain,
        disk.item.target,
        disk.previous,
        "shared extents" if disk.reflinked else "a copy: this filesystem has no reflinks",
    )


def start_checkpoint(domain: Domain, night: Night, all_disks: list[Disk]) -> None:
    """Start C(N) covering the tracked disks; just before the freeze, so
    that what is written until the next freeze is in its bitmaps."""
    tracked = {d.item.target for d in night.disks.values()}
    lines = "".join(
        f"<disk name={xml.sax.saxutils.quoteattr(d.target)} "
        f"checkpoint='{'bitmap' if d.target in tracked else 'no'}'/>"
        for d in all_disks
    )
    text = (
        f"<domaincheckpoint><name>{night.checkpoint}</name>"
        "<description>backupninja-kvm: the next set of this domain is made from what "
        "changed since</description>"
        f"<disks>{lines}</disks></domaincheckpoint>"
    )
    try:
        domain.create_checkpoint(text)
    except HypervisorError as error:
        log.info(
            "%s: cannot start checkpoint %s (%s): the next set copies every disk whole",
            night.domain,
            night.checkpoint,
            error.reason,
        )
        return
    night.started = True


# --- while frozen ---------------------------------------------------------------


def copy_changes(night: Night, backup_set: destination.AnySet, outcome: Outcome) -> None:
    """Write what changed into each cloned image. A disk whose bitmap
    cannot be trusted, or whose changes cannot be copied, falls back to a
    full copy: its clone is removed, and ``night.changed_names()`` no
    longer lists it."""
    for name, disk in night.disks.items():
        if not disk.changed:
            continue
        clone = os.path.join(backup_set.partial_path, name)
        try:
            granularity, extents = bitmaps.dirty_extents(disk.item.source, disk.since)
        except bitmaps.BitmapError as error:
            _fall_back(night, disk, backup_set, clone, str(error))
            continue
        changed = sum(length for _, length in extents)
        log.debug(
            "%s: %s: %s changed since %s (%d extents, granularity %s)",
            night.domain,
            disk.item.target,
            human_bytes(changed),
            disk.since,
            len(extents),
            human_bytes(granularity),
        )
        sent = 0
        try:
            if isinstance(backup_set, destination.RemoteBackupSet):
                sent = _send_changes(disk, backup_set, granularity, extents)
            elif extents:
                with _Exports(disk.item.source, clone) as (base, target):
                    disk.bytes_read, disk.bytes_written = apply_extents(
                        base, target, extents, label=clone
                    )
        except TransferError as error:
            log.warning(
                "%s: %s: the changes could not be copied (%s): copying it whole",
                night.domain,
                disk.item.target,
                error,
            )
            reason = f"the changes could not be copied: {error}"
            _fall_back(night, disk, backup_set, clone, reason, quiet=True)
            continue
        remote = isinstance(backup_set, destination.RemoteBackupSet)
        outcome.bytes_copied += sent if remote else disk.bytes_written
        outcome.changes[disk.item.target] = (disk.bytes_read, disk.bytes_written)


# On the remote host, in the new set's folder: write the changes (a qcow2
# whose backing file is the clone, by its name in the set) into the clone.
_REMOTE_COMMIT = """cd "$1" || exit 1
qemu-img commit -q -d -f qcow2 -- "$2"; status=$?
rm -f -- "$2"
exit $status
"""


def delta_layout(
    granularity: int, extents: list[tuple[int, int]], size: int
) -> tuple[int, list[tuple[int, int]]]:
    """The cluster size of the qcow2 that carries the changes, and the
    extents rounded out to it. Every cluster the changes allocate must be
    written whole: committed into the clone, its unwritten part would be
    zeros over the clone's data (the qcow2 has no backing file while it is
    written). The granularity itself where qcow2 allows it (512 B to 2 MiB),
    so that nothing more is read than the bitmap marks."""
    cluster = granularity if 512 <= granularity <= 2 * 1024 * 1024 else 64 * 1024
    aligned: list[tuple[int, int]] = []
    for offset, length in extents:
        start = offset - offset % cluster
        end = min(-(-(offset + length) // cluster) * cluster, size)
        if aligned and start <= aligned[-1][0] + aligned[-1][1]:
            first = aligned[-1][0]
            aligned[-1] = (first, max(end, first + aligned[-1][1]) - first)
        else:
            aligned.append((start, end - start))
    return cluster, aligned


def write_changes(
    base: str,
    backing_name: str,
    size: int,
    granularity: int,
    extents: list[tuple[int, int]],
    changes: str,
) -> tuple[int, int]:
    """Write *extents* of the frozen *base* into a new qcow2 *changes* that
    holds them alone, its header naming *backing_name* (the clone, beside
    it once sent). Returns (bytes read, bytes written)."""
    cluster, aligned = delta_layout(granularity, extents, size)
    created = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
        + ["-u", "-b", backing_name, "-F", "qcow2", changes, str(size)],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        raise TransferError(f"qemu-img cannot make {changes}: {created.stderr.strip()}")
    # Its backing file is on the remote host: opened without one here, and
    # every zero is written as data, never left to read through.
    with _Exports(base, changes, no_backing=True) as (frozen, target):
        return apply_extents(frozen, target, aligned, zeros_as_data=True, label=changes)


def _send_changes(
    disk: DiskNight,
    backup_set: destination.RemoteBackupSet,
    granularity: int,
    extents: list[tuple[int, int]],
) -> int:
    """The changes, for a remote set: written here into a qcow2 that holds
    them alone (its backing file named as the clone in the set), sent with
    rsync, and committed into the clone there by the remote host's
    qemu-img. Returns the bytes sent."""
    if not extents:
        return 0
    with _changes_folder() as folder:
        changes = os.path.join(folder, "changes.qcow2")
        disk.bytes_read, disk.bytes_written = write_changes(
            disk.item.source, disk.item.name, disk.item.virtual_size, granularity, extents, changes
        )
        remote_name = f".bnkvm-changes-{disk.item.name}"
        stats = backup_set.remote.send(changes, os.path.join(backup_set.partial_path, remote_name))
        faults.checkpoint("changes-sent")
        backup_set.remote.run(_REMOTE_COMMIT, backup_set.partial_path, remote_name)
        log.debug(
            "%s: %s: %s of changes sent, committed into the clone on %s",
            backup_set.domain,
            disk.item.target,
            human_bytes(stats.sent),
            backup_set.remote.label,
        )
        return stats.sent


_CHANGES_PREFIX = "bnkvm-changes-"
_CHANGES_LOCK = ".lock"
_CHANGES_GRACE = 3600.0  # a folder without its lock yet, younger than this, is being made


@contextlib.contextmanager
def _changes_folder() -> Iterator[str]:
    """A private folder in CHANGES_ROOT (the NBD socket of the exports, the
    changes of a remote set), removed afterwards. A lock held on a file in
    it for as long as it is in use tells ``sweep_changes`` that a killed
    run left it."""
    folder = tempfile.mkdtemp(prefix=_CHANGES_PREFIX, dir=CHANGES_ROOT)
    lock = -1
    try:
        lock = os.open(
            os.path.join(folder, _CHANGES_LOCK),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if lock >= 0:
            os.close(lock)


def sweep_changes(root: str = CHANGES_ROOT) -> None:
    """Remove what a killed run left in *root*: the folders (changes, NBD
    sockets) that no living run holds the lock of. Never follows a link;
    only folders of this user."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(_CHANGES_PREFIX)]
    except OSError:
        return
    for name in names:
        folder = os.path.join(root, name)
        try:
            info = os.lstat(folder)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            continue
        try:
            lock = os.open(
                os.path.join(folder, _CHANGES_LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except FileNotFoundError:
            if time.time() - info.st_mtime < _CHANGES_GRACE:
                continue  # being made: its lock comes next
            lock = -1
        except OSError:
            continue
        try:
            if lock >= 0:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a run that is alive uses it
            shutil.rmtree(folder, ignore_errors=True)
            log.debug("removed %s, left by a run that was stopped", folder)
        finally:
            if lock >= 0:
                os.close(lock)


def _fall_back(
    night: Night,
    disk: DiskNight,
    backup_set: destination.AnySet,
    clone: str,
    reason: str,
    quiet: bool = False,
) -> None:
    _remove_in_set(backup_set, clone)
    disk.since = disk.previous = ""
    disk.cloned = disk.reflinked = False
    disk.bytes_read = disk.bytes_written = 0
    disk.reason = reason
    if not quiet:
        log.info("%s: %s: copied whole: %s", night.domain, disk.item.target, reason)


def discard_clones(plan: Plan, backup_set: destination.AnySet) -> None:
    """Remove what a failed ``prepare`` cloned into the set already."""
    for item in plan.files:
        _remove_in_set(backup_set, os.path.join(backup_set.partial_path, item.name))


def _remove_in_set(backup_set: destination.AnySet, path: str) -> None:
    """Remove a clone before its whole copy (which replaces it anyway)."""
    try:
        if isinstance(backup_set, destination.RemoteBackupSet):
            backup_set.remote.run('rm -f -- "$1"', path)
        else:
            _remove(path)
    except (OSError, TransferError) as error:
        log.debug("cannot remove %s before its whole copy: %s", path, error)


class Device(Protocol):
    """What the copy of changes needs of an image: the calls of a libnbd
    connection (``nbd.NBD``)."""

    def pread(self, count: int, offset: int) -> bytes: ...

    def pwrite(self, buf: bytes, offset: int) -> None: ...

    def zero(self, count: int, offset: int) -> None: ...

    def flush(self) -> None: ...


def apply_extents(
    source: Device,
    target: Device,
    extents: list[tuple[int, int]],
    progress: Callable[[int], None] | None = None,
    zeros_as_data: bool = False,
    label: str = "the clone",
) -> tuple[int, int]:
    """Copy each (offset, length) of *source* into *target* (the guest's
    view of each); an all-zero block becomes a zeroed range, which qcow2
    keeps as zero clusters (with *zeros_as_data*, zeros written as data).
    Returns (bytes read, bytes written)."""
    read = written = 0
    try:
        for offset, length in extents:
            end = offset + length
            while offset < end:
                step = min(CHUNK, end - offset)
                data = source.pread(step, offset)
                if len(data) != step:
                    raise TransferError(
                        f"short read of the frozen image at {offset}: {len(data)} of {step} bytes"
                    )
                read += step
                if data == _ZERO[:step] and not zeros_as_data:
                    target.zero(step, offset)
                else:
                    target.pwrite(data, offset)
                    written += step
                offset += step
                if progress:
                    progress(read)
                if read == step:
                    faults.checkpoint("mid-changes")
        target.flush()
    except (OSError, _NbdError) as error:
        message = getattr(error, "strerror", None) or getattr(error, "string", None) or error
        raise TransferError(f"copy of changes into {label} failed: {message}") from None
    return read, written


class _Exports:
    """The frozen base (read-only, sharing it with the domain's QEMU) and
    the clone in the set (writable), each exported by one
    qemu-storage-daemon over NBD on a Unix socket in a private folder, and
    connected to with libnbd: the guest's view of each, at the speed of
    large requests (about twice that of QEMU 7.2's FUSE export), with no
    mount point and no /dev/fuse.

    The daemon dies with us (PR_SET_PDEATHSIG) and, on SIGTERM, closes the
    clone cleanly. The base is opened with force-share, so even a daemon
    left behind never blocks the commit; the folder a killed run left is
    removed by ``sweep_changes``.
    """

    def __init__(self, base: str, clone: str, no_backing: bool = False) -> None:
        self.base, self.clone, self.no_backing = base, clone, no_backing
        self.process: subprocess.Popen[str] | None = None
        self.handles: list = []
        self.folder = contextlib.ExitStack()  # the private folder, removed by _stop

    def __enter__(self) -> tuple[Device, Device]:
        assert _nbd is not None
        socket_path = os.path.join(self.folder.enter_context(_changes_folder()), "nbd.sock")
        nodes = [
            {
                "driver": "qcow2",
                "node-name": "base",
                "read-only": True,
                "force-share": True,
                "file": {
                    "driver": "file",
                    "filename": self.base,
                    "read-only": True,
                    "force-share": True,
                },
            },
            {
                "driver": "qcow2",
                "node-name": "clone",
                "file": {"driver": "file", "filename": self.clone},
                **({"backing": None} if self.no_backing else {}),
            },
        ]
        argv = ["qemu-storage-daemon"]
        for node in nodes:
            argv += ["--blockdev", json.dumps(node)]
        argv += ["--nbd-server", json.dumps({"addr": {"type": "unix", "path": socket_path}})]
        for name, writable in (("base", False), ("clone", True)):
            export = {"type": "nbd", "id": name, "node-name": name, "name": name}
            argv += ["--export", json.dumps({**export, "writable": writable})]
        try:
            try:
                self.process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:
                raise TransferError(f"cannot run qemu-storage-daemon: {error.strerror}") from None
            deadline = time.monotonic() + EXPORT_TIMEOUT
            for name in ("base", "clone"):
                self.handles.append(self._connect(socket_path, name, deadline))
        except BaseException:  # a signal, an error: no daemon left behind
            self._stop()
            raise
        return self.handles[0], self.handles[1]

    def _connect(self, socket_path: str, name: str, deadline: float):
        assert _nbd is not None and self.process is not None
        while True:
            handle = _nbd.NBD()
            handle.set_export_name(name)
            try:
                handle.connect_unix(socket_path)
                return handle
            except _nbd.Error as error:
                del handle  # libnbd 1.14 closes a handle when it is freed
                if self.process.poll() is not None or time.monotonic() > deadline:
                    _, stderr = self._stop()
                    raise TransferError(
                        f"qemu-storage-daemon could not export {self.base} and {self.clone}: "
                        f"{stderr or error.string or f'no export within {EXPORT_TIMEOUT:g} s'}"
                    ) from None
                time.sleep(0.01)

    def __exit__(self, kind, value, traceback) -> None:
        returncode, stderr = self._stop()
        if kind is None and returncode != 0:
            raise TransferError(
                f"qemu-storage-daemon did not close {self.clone} cleanly: {stderr or 'no message'}"
            )

    def _stop(self) -> tuple[int | None, str]:
        """Disconnect, stop the daemon, remove the folder; its exit status
        and last message."""
        for handle in self.handles:
            with contextlib.suppress(Exception):
                handle.shutdown()
        self.handles = []  # freed: libnbd closes them
        returncode, stderr = None, ""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                _, stderr = self.process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                _, stderr = self.process.communicate()
            returncode = self.process.returncode
            self.process = None
        self.folder.close()
        lines = (stderr or "").strip().splitlines()
        return returncode, lines[-1] if lines else ""


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:  # the set's discard says so
        log.debug("cannot remove %s: %s", path, error.strerror)


# --- after the set --------------------------------------------------------------


# The same on the remote host, with its qemu-img (a host without one keeps them).
_REMOTE_STRIP = """cd "$1" && shift || exit 1
command -v qemu-img >/dev/null || exit 0
for f in "$@"; do
  qemu-img info -U --output=json -- "$f" |
    sed -n 's/^ *"name": "\\(bnkvm-[^"]*\\)",\\{0,1\\}$/\\1/p' |
    while read -r b; do qemu-img bitmap --remove -f qcow2 -- "$f" "$b" || exit 1; done ||
    { echo "qemu-img cannot remove the bitmaps of $f" >&2; exit 1; }
done
"""


def strip_bitmaps(plan: Plan, backup_set: destination.AnySet) -> None:
    """Remove our checkpoints' bitmaps from the set's qcow2 copies (after
    the header fixes): a restored image must not carry bitmaps that libvirt
    knows nothing of, which QEMU would go on updating for good. Foreign
    bitmaps are kept, as the domain had them."""
    if isinstance(backup_set, destination.RemoteBackupSet):
        names = [item.name for item in plan.files if item.format == "qcow2"]
        if names:
            backup_set.remote.run(_REMOTE_STRIP, backup_set.partial_path, *names)
        return
    for item in plan.files:
        if item.format != "qcow2":
            continue
        copy = os.path.join(backup_set.partial_path, item.name)
        try:
            names = [b.name for b in bitmaps.bitmaps(copy) if b.name.startswith(PREFIX)]
        except bitmaps.BitmapError as error:
            log.debug("%s: %s: bitmaps not read: %s", plan.name, item.name, error)
            continue
        for name in names:
            removed = subprocess.run(
                ["qemu-img", "bitmap", "--remove", "-f", "qcow2", item.name, name],
                cwd=backup_set.partial_path,
                capture_output=True,
                text=True,
            )
            if removed.returncode != 0:
                raise TransferError(
                    f"qemu-img cannot remove bitmap {name} from {copy}: "
                    f"{removed.stderr.strip() or removed.returncode}"
                )


def record(
    night: Night, backup_set: destination.AnySet, outcome: Outcome
) -> dict[str, setinfo.Tracking]:
    """set.json's tracking of each image, with the image file's size and
    modification time as written (call after the header fixes)."""
    records = night.tracking(outcome.copied)
    if isinstance(backup_set, destination.RemoteBackupSet):
        stats = _remote_stats(backup_set, list(records))
    else:
        stats = {}
        for name in records:
            status = os.stat(os.path.join(backup_set.partial_path, name))
            stats[name] = (status.st_size, status.st_mtime_ns)
    for name, tracking in list(records.items()):
        size, mtime_ns = stats.get(name, (0, 0))
        records[name] = replace(tracking, size=size, mtime_ns=mtime_ns)
    return records


def _remote_stats(
    backup_set: destination.RemoteBackupSet, names: list[str]
) -> dict[str, tuple[int, int]]:
    output = backup_set.remote.run(
        'cd "$1" && shift && stat -c \'%s %.9Y %n\' -- "$@"', backup_set.partial_path, *names
    )
    return _parse_stats(output)


def _parse_stats(output: str) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) from lines of ``stat -c '%s %.9Y %n'``."""
    stats = {}
    for line in output.splitlines():
        size, stamp, name = (line.split(" ", 2) + ["", ""])[:3]
        seconds, _, fraction = stamp.partition(".")
        fraction = fraction or "0"
        if size.isdigit() and seconds.isdigit() and fraction.isdigit():
            stats[name] = (int(size), int(seconds) * 10**9 + int(fraction.ljust(9, "0")[:9]))
    return stats


def finish(domain: Domain, night: Night, complete: bool) -> None:
    """After the set: when it is complete, delete every checkpoint of ours
    but tonight's (the next night reads tonight's); when it is not, delete
    tonight's instead, so that the next night reads the previous one again
    (it never stopped recording: what it marks is a superset)."""
    try:
        ours = [c for c in domain.checkpoints() if c.startswith(f"{PREFIX}{night.tag}-")]
    except HypervisorError as error:
        log.warning(
            "%s: cannot list its checkpoints (%s): the next night deletes the ones no set needs",
            night.domain,
            error.reason,
        )
        return
    for name in ours:
        if complete and name != night.checkpoint:
            _delete(domain, name, f"the new set's is {night.checkpoint}")
        elif not complete and name == night.checkpoint:
            _delete(domain, name, "its set was not made")


def _delete(domain: Domain, name: str, why: str) -> None:
    try:
        domain.delete_checkpoint(name)
    except HypervisorError as error:
        log.warning(
            "%s: cannot delete checkpoint %s (%s); the next night tries again",
            domain.name,
            name,
            error.reason,
        )
        return
    log.debug("%s: deleted checkpoint %s: %s", domain.name, name, why)
