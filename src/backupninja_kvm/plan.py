"""Plan the backup of one domain: which disks, which files each puts into the
set, how loudly a skipped disk is reported, the set's name and the space it
needs. Nothing here changes the domain."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

from backupninja_kvm import destination, images, machine, preflight
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import (
    BLOCK_NEEDS_OVERLAYDIR,
    BLOCK_NOT_WITH_PULL,
    ERROR,
    INFO,
    WARNING,
    ChainPlan,
    Disk,
    SkippedDisk,
    has_guest_agent,
    is_our_overlay,
    parse_disks,
    plan_chain,
    select_disks,
    strip_tag,
)
from backupninja_kvm.errors import DomainError, TransferError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.report import human_bytes, log


@dataclass(frozen=True)
class SetFile:
    """One file copied into the set: a disk's top, a backing layer, a data file."""

    target: str
    source: str
    name: str  # its name in the set
    # What set.json says of it (see ``setinfo.SetImage``).
    format: str = field(default="raw", compare=False)
    virtual_size: int = field(default=0, compare=False)
    role: str = field(default="disk", compare=False)  # disk, backing or data
    backing: str = field(default="", compare=False)  # the set's file below it
    data_file: str = field(default="", compare=False)  # the set's data file of it


@dataclass(frozen=True)
class HeaderFix:
    """A ``qemu-img`` change on a copy in the set, so that the set's layers
    refer to each other by relative names instead of to the domain's files."""

    target: str
    image: str  # the copy changed, by its name in the set
    argv: tuple[str, ...]  # qemu-img's arguments, run in the set's folder
    what: str  # for messages


@dataclass
class Plan:
    """What a backup of one domain will do."""

    name: str
    active: bool
    disks: list[Disk]
    skipped: list[SkippedDisk]
    agent: bool = False  # has a guest agent channel
    files: list[SetFile] = field(default_factory=list)  # what is copied, disks' tops first
    fixes: list[HeaderFix] = field(default_factory=list)  # after the copy
    notes: list[tuple[str, str]] = field(default_factory=list)  # (level, message)
    # The machine's state besides its disks (NVRAM, TPM, boot files), copied
    # right after the freeze; not in ``files``, which a ride-along view exposes.
    state: list[SetFile] = field(default_factory=list)

    def describe(self) -> str:
        state = "running" if self.active else "shut off"
        parts = [f"{d.target} ({d.path}, {d.format})" for d in self.disks]
        text = f"{self.name} ({state}): "
        text += ("back up " + ", ".join(parts)) if parts else "no disk to back up"
        extra = [f.source for f in self.files[len(self.disks) :]]
        if extra:
            text += " with " + ", ".join(extra)
        if self.state:
            text += "; machine state " + ", ".join(f"{f.role} ({f.source})" for f in self.state)
        if self.skipped:
            text += "; skip " + ", ".join(f"{s.disk.target} ({s.reason})" for s in self.skipped)
        if self.agent:
            text += "; guest agent channel"
        return text


def block_refusal(settings: Settings) -> str | None:
    """Why this run cannot back up a block disk, or None when it can: its
    overlay is a file in overlaydir, merged back with a commit."""
    if not settings.overlaydir:
        return BLOCK_NEEDS_OVERLAYDIR
    if settings.merge == "pull":
        return BLOCK_NOT_WITH_PULL
    return None


def make_plan(
    domain: Domain,
    backing: str = "chain",
    block: str | None = BLOCK_NEEDS_OVERLAYDIR,
    exclude_disks: tuple[tuple[str, str], ...] = (),
) -> Plan:
    """Read the domain's live XML and choose its disks, and for each disk
    the files that go into the set (see ``_plan_files``). *block* says why
    block disks are skipped (``block_refusal``), None to back them up;
    *exclude_disks*: (domain, target) shell patterns of disks left out, as
    Info."""
    active = domain.is_active()
    xml = domain.xml()
    chosen, skipped = select_disks(parse_disks(xml), block)
    chosen, left_out = _leave_out(domain.name, chosen, exclude_disks)
    skipped = [*left_out, *skipped]
    plan = Plan(domain.name, active, [], skipped, has_guest_agent(xml))
    owners: dict[str, set[str]] | None = None
    for disk in chosen:
        assert disk.path
        try:
            layers = images.chain(disk.path)
        except images.ImageError as error:
            plan.skipped.append(SkippedDisk(disk, str(error), ERROR))
            continue
        if len(layers) > 1 and owners is None:
            owners = _owners_of_other_domains(domain)
        chain = plan_chain(layers, owners or {}, backing)
        problem = _unusable_data_file(disk, chain)
        if problem:
            plan.skipped.append(SkippedDisk(disk, problem, ERROR))
            continue
        plan.disks.append(disk)
        _plan_files(plan, disk, chain, backing)
    _plan_state(plan, xml, domain.uuid)
    return plan


def _plan_state(plan: Plan, xml: str, uuid: str, swtpm_dir: str = machine.SWTPM_DIR) -> None:
    """The machine-state files of the set: each that exists now; a missing
    one is said (Info when libvirt makes it at the first start, a Warning
    for a boot file: the domain cannot start without it)."""
    try:
        found = machine.state_files(xml, uuid, swtpm_dir)
    except machine.MachineStateError as error:
        plan.notes.append((WARNING, f"{plan.name}: no machine state in the set: {error}"))
        return
    for item in found:
        name = machine.set_name(item)
        if item.role == machine.TPM:
            if os.path.isdir(item.path):
                plan.state.append(SetFile("", item.path, name, "tar", 0, item.role))
            else:
                plan.notes.append(
                    (
                        INFO,
                        f"{plan.name}: its TPM has no state yet ({item.path}: libvirt creates "
                        f"it at the first start); none in the set",
                    )
                )
        elif os.path.isfile(item.path):
            image_format = "raw" if item.role == machine.NVRAM else "file"
            size = os.path.getsize(item.path)
            plan.state.append(SetFile("", item.path, name, image_format, size, item.role))
        elif item.role == machine.NVRAM:
            plan.notes.append(
                (
                    INFO,
                    f"{plan.name}: its UEFI variable store {item.path} does not exist yet "
                    f"(libvirt makes it from the firmware's template at the first start); "
                    f"none in the set",
                )
            )
        else:
            plan.notes.append(
                (
                    WARNING,
                    f"{plan.name}: its {item.role} file {item.path} is not a file: not in the "
                    f"set (the domain cannot boot without it)",
                )
            )


def _leave_out(
    name: str, disks: list[Disk], patterns: tuple[tuple[str, str], ...]
) -> tuple[list[Disk], list[SkippedDisk]]:
    """The disks to back up, and those [source] exclude_disks leaves out."""
    kept, left = [], []
    for disk in disks:
        match = next(
            (
                f"{domain}:{target}"
                for domain, target in patterns
                if fnmatch.fnmatchcase(name, domain) and fnmatch.fnmatchcase(disk.target, target)
            ),
            None,
        )
        if match:
            left.append(SkippedDisk(disk, f"left out by [source] exclude_disks ({match})", INFO))
        else:
            kept.append(disk)
    return kept, left


def _owners_of_other_domains(domain: Domain) -> dict[str, set[str]]:
    """real path -> the other domains whose disks use that file, in their
    live or persistent chain (a persistent XML names only the top: the
    layers below it are read from the images)."""
    owners: dict[str, set[str]] = {}
    for name, paths in domain.paths_of_other_domains().items():
        for path in paths:
            found = {path}
            if os.path.isfile(path):
                try:
                    found |= {layer.path for layer in images.chain(path)}
                except images.ImageError:
                    pass
            for each in found:
                owners.setdefault(os.path.realpath(each), set()).add(name)
    return owners


def _unusable_data_file(disk: Disk, chain: ChainPlan) -> str:
    for layer in chain.copied:
        if layer.data_file and not os.path.isfile(layer.data_file):
            return (
                f"{layer.path} keeps its data in {layer.data_file}, which is not a regular "
                f"file and cannot be copied: the disk is not in the set"
            )
    return ""


def _plan_files(plan: Plan, disk: Disk, chain: ChainPlan, backing: str) -> None:
    """The files of one disk in the set, the header fixes that make them
    refer to each other, and what to say about the layers left out."""
    name, target = plan.name, disk.target
    used = {f.name for f in plan.files} | {"domain.xml"}

    def set_name(path: str, first: str = "") -> str:
        wanted = first or f"{target}-{os.path.basename(path)}"
        candidate, number = wanted, 1
        while candidate in used:
            number += 1
            candidate = f"{target}-{number}-{os.path.basename(path)}"
        used.add(candidate)
        return candidate

    names = [
        set_name(layer.path, backup_file_name(disk) if position == 0 else "")
        for position, layer in enumerate(chain.copied)
    ]
    data_names = [set_name(layer.data_file) if layer.data_file else "" for layer in chain.copied]
    for position, layer in enumerate(chain.copied):
        plan.files.append(
            SetFile(
                target,
                layer.path,
                names[position],
                layer.format,
                layer.virtual_size,
                "disk" if position == 0 else "backing",
                names[position + 1] if position + 1 < len(names) else "",
                data_names[position],
            )
        )
    for position, layer in enumerate(chain.copied):
        if layer.data_file:
            data_name = data_names[position]
            plan.files.append(
                SetFile(target, layer.data_file, data_name, "raw", layer.virtual_size, "data")
            )
            plan.fixes.append(
                HeaderFix(
                    target,
                    names[position],
                    tuple(images.data_file_argv(data_name, names[position])),
                    f"point {names[position]} at its data file {data_name}",
                )
            )
    for position, layer in enumerate(chain.copied[1:], start=1):
        plan.fixes.append(
            HeaderFix(
                target,
                names[position - 1],
                tuple(images.rebase_argv(names[position], layer.format, names[position - 1])),
                f"point {names[position - 1]} at {names[position]}",
            )
        )
    left = (*chain.own_left, *chain.shared)
    lowest = chain.copied[-1]
    if left and lowest.backing_name and not os.path.isabs(lowest.backing_name):
        # The original names its backing file relative to its own folder; the
        # copy is meant to find the very file the domain uses.
        plan.fixes.append(
            HeaderFix(
                target,
                names[-1],
                tuple(images.rebase_argv(left[0].path, left[0].format, names[-1])),
                f"point {names[-1]} at {left[0].path}",
            )
        )
    if len(chain.copied) > 1:
        plan.notes.append(
            (
                INFO,
                f"{name}: {target}: its backing file(s) "
                f"{', '.join(layer.path for layer in chain.copied[1:])} belong to no other "
                f"domain: copied into the set with it (backing = chain)",
            )
        )
    if chain.own_left:
        plan.notes.append(
            (
                WARNING,
                f"{name}: {target}: its backing file(s) "
                f"{', '.join(layer.path for layer in chain.own_left)} belong to no other "
                f"domain and are not in the set (backing = {backing}); the set cannot be "
                f"restored without them: set [source] backing = chain to save them",
            )
        )
    if chain.shared:
        plan.notes.append(
            (
                INFO,
                f"{name}: {target}: its backing file {chain.shared[0].path} is a template "
                f"also used by {', '.join(chain.shared_with)}; it is not in the set, which "
                f"needs it to be restored",
            )
        )


def backup_file_name(disk: Disk) -> str:
    """Name of a disk's image in the set: target plus the image's own name.

    Our tag is left out: after ``merge = pull`` the disk runs on a tagged
    image whose name changes every night, and the set's names must not (a
    remote ``delta`` finds its basis by name). ``a.bnkvm-STAMP.qcow2`` gives
    ``vda-a.qcow2``, ``p.raw.bnkvm-STAMP.qcow2`` gives ``vda-p.raw.qcow2``.
    A block device's contents become a raw image file: ``/dev/vg/data``
    gives ``vdb-data.raw``.
    """
    assert disk.path
    name = os.path.basename(disk.path)
    if disk.source_type == "block":
        return f"{disk.target}-{name}.raw"
    if is_our_overlay(name):
        name = strip_tag(name).removesuffix(".qcow2") + ".qcow2"
    return f"{disk.target}-{name}"


def nothing_to_back_up(plan: Plan) -> str:
    if not plan.skipped:
        return (
            f"{plan.name}: the domain has no disk, nothing to back up; no set made "
            f"(leave it out with [source] exclude if that is intended)"
        )
    reasons = "; ".join(_skipped_text(s) for s in plan.skipped)
    return (
        f"{plan.name}: no disk can be backed up ({reasons}); no set made, nothing frozen; "
        f"its last sets are kept"
    )


def _skipped_text(skipped: SkippedDisk) -> str:
    disk = skipped.disk
    source = f" ({disk.path})" if disk.path else ""
    return f"{disk.target}: {skipped.reason}{source}"


def report_skipped(name: str, skipped: SkippedDisk) -> str:
    """Info for what holds none of the VM's data, a Warning for a disk whose
    data is not saved (the report mail shows only warnings and errors).
    Returns the Error text for a disk whose data could not be saved (the
    set of the other disks is still made), or ""."""
    text = _skipped_text(skipped)
    if skipped.level == INFO:
        log.info("%s: skipping disk %s", name, text)
    elif skipped.level == WARNING:
        log.warning("%s: disk %s; its data is not in the set", name, text)
    else:
        return f"{name}: disk {text}; it is not in the set"
    return ""


def refuse_unsafe_chains(plan: Plan) -> None:
    for disk in plan.disks:
        if disk.mirror:
            raise DomainError(
                f"{plan.name}: disk {disk.target} has a block job running "
                f"(see `virsh blockjob {plan.name} {disk.target}`); domain skipped"
            )
    # A disk named like our overlay with no journal (recovery has run) is the
    # domain's own disk, e.g. what a finished `merge = pull` left on top of a
    # template: backed up like any other, never merged.


def checked_plan(
    domain: Domain,
    backing: str = "chain",
    block: str | None = BLOCK_NEEDS_OVERLAYDIR,
    exclude_disks: tuple[tuple[str, str], ...] = (),
) -> tuple[Plan, list[str]]:
    """``make_plan``, then what every stage says and refuses before a freeze:
    DomainError when nothing can be backed up or a disk has a block job;
    each skipped disk and each note reported. Returns the plan and the Error
    texts of the disks whose data could not be saved."""
    plan = make_plan(domain, backing, block, exclude_disks)
    if not plan.disks:
        raise DomainError(nothing_to_back_up(plan))
    unsaved = [text for skipped in plan.skipped if (text := report_skipped(plan.name, skipped))]
    refuse_unsafe_chains(plan)
    for level, note in plan.notes:
        (log.warning if level == WARNING else log.info)("%s", note)
    return plan, unsaved


def open_set(settings: Settings, name: str, stamp: str) -> destination.AnySet:
    """The new set of domain *name*, under the next free name from *stamp*
    (the caller holds the domain's lock). Raises DomainError for a name that
    is not a safe folder name, or a destination that cannot be listed."""
    domain_dir = destination.domain_directory(settings.directory, name)
    backup_set: destination.AnySet
    if settings.dest == "remote":
        backup_set = destination.RemoteBackupSet(
            domain_dir, stamp, settings.remote(), delta=settings.delta
        )
    else:
        backup_set = destination.BackupSet(domain_dir, stamp)
    try:
        backup_set.check_folder()
        chosen = backup_set.choose_stamp()
    except (OSError, TransferError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise DomainError(f"{name}: cannot read {domain_dir}: {reason}; domain skipped") from None
    if chosen != stamp:
        log.info("%s: a set named %s or later exists; this one is %s", name, stamp, chosen)
    return backup_set


def check_space(
    plan: Plan, settings: Settings, overlays: dict[str, str], backup_set: destination.AnySet
) -> None:
    """Refuse, before anything is frozen, a backup that would fill a disk."""
    sources = [f.source for f in plan.files]
    sources += [f.source for f in plan.state if f.role != machine.TPM]  # a TPM's: a few KiB
    set_need = preflight.destination_need(settings.directory, sources)
    needs = []
    problems = []
    if isinstance(backup_set, destination.RemoteBackupSet):
        try:
            free = backup_set.free_bytes()
        except (TransferError, ValueError, IndexError) as error:
            raise DomainError(
                f"{plan.name}: cannot check the space at the destination: {error}"
            ) from None
        if free < set_need.needed:
            problems.append(
                f"not enough free space for the backup set in {backup_set.remote.label}:"
                f"{settings.directory}: {human_bytes(set_need.needed)} needed, "
                f"{human_bytes(free)} free"
            )
    else:
        needs.append(set_need)
    if plan.active:
        needs += preflight.overlay_needs(list(overlays.values()), settings.overlay_reserve)
    problems += preflight.shortfalls(needs)
    if problems:
        raise DomainError(f"{plan.name}: " + "; ".join(problems) + "; nothing was frozen")
