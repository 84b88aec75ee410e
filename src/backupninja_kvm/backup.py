"""The backup cycle of one domain: plan, freeze, ship, merge, verify, clean.

The hypervisor is reached only through ``hypervisor.Domain``; everything here
works on names, paths and XML text.

Between the freeze and the merge, only the copy runs. Whatever happens during
the copy, the merge still runs; checksums, the manifest and pruning come after.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field

from backupninja_kvm import destination, faults, interrupts, preflight, recovery
from backupninja_kvm import journal as journals
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import (
    GUEST_AGENT_CHANNEL,
    Disk,
    SkippedDisk,
    guest_agent_connected,
    has_guest_agent,
    is_our_overlay,
    overlay_paths,
    parse_disks,
    referenced_paths,
    select_disks,
    snapshot_xml,
)
from backupninja_kvm.errors import (
    DomainError,
    HypervisorError,
    OverlayLeftError,
    TransferError,
)
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.lock import domain_lock
from backupninja_kvm.progress import Board, Progress
from backupninja_kvm.report import human_bytes, log, seconds

# Called right after the freeze, before the copy, while the domain runs on its
# overlays, with the domain and {target: overlay path}. Tests use it to write
# into the guest during the backup window.
WindowHook = Callable[[Domain, dict[str, str]], None]


@dataclass
class Plan:
    """What a backup of one domain will do."""

    name: str
    active: bool
    disks: list[Disk]
    skipped: list[SkippedDisk]
    agent: bool = False  # has a guest agent channel

    def describe(self) -> str:
        state = "running" if self.active else "shut off"
        parts = [f"{d.target} ({d.path}, {d.format})" for d in self.disks]
        text = f"{self.name} ({state}): "
        text += ("back up " + ", ".join(parts)) if parts else "no disk to back up"
        if self.skipped:
            text += "; skip " + ", ".join(f"{s.disk.target} ({s.reason})" for s in self.skipped)
        if self.agent:
            text += "; guest agent channel"
        return text


@dataclass
class Outcome:
    """What a backup of one domain did, for the summary line."""

    name: str
    disks: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    overlay_seconds: float = 0.0  # from the freeze until verified back on its images
    merge: str = ""
    merge_seconds: float = 0.0
    freeze_seconds: float = 0.0  # the snapshot call
    copy_seconds: float = 0.0
    hook_seconds: float = 0.0  # the tests' and the benchmark's window hook
    quiesced: int | None = None  # guest filesystems frozen for the snapshot
    complete_seconds: float = 0.0  # flush, checksums, manifest, rename, prune
    flush_seconds: float = 0.0  # of which writing the copy to disk (fsync), local sets
    total_seconds: float = 0.0
    set_path: str = ""
    live: bool = True
    problems: list[str] = field(default_factory=list)  # Error lines; the set is still good

    def summary(self) -> str:
        disks = ", ".join(self.disks) or "no disk"
        text = f"{self.name}: backed up {disks}, {human_bytes(self.bytes_copied)} copied"
        if self.live:
            text += (
                f", {'quiesced' if self.quiesced is not None else 'crash-consistent'}"
                f", {seconds(self.overlay_seconds)} on the overlay"
                f", {self.merge} merge in {seconds(self.merge_seconds)}"
            )
        else:
            text += " (shut off, copied without snapshot)"
        return text + f", set {self.set_path}"


def make_plan(domain: Domain) -> Plan:
    """Read the domain's live XML and choose its disks."""
    active = domain.is_active()
    xml = domain.xml()
    chosen, skipped = select_disks(parse_disks(xml))
    return Plan(domain.name, active, chosen, skipped, has_guest_agent(xml))


def backup_file_name(disk: Disk) -> str:
    """Name of a disk's image in the set: target plus the image's own name."""
    assert disk.path
    return f"{disk.target}-{os.path.basename(disk.path)}"


def back_up_domain(
    domain: Domain,
    settings: Settings,
    stamp: str,
    window_hook: WindowHook | None = None,
) -> Outcome:
    """Back up one domain into a new set under ``settings.directory``.

    Returns the outcome. Raises DomainError when the backup failed but the
    domain runs on its own images, OverlayLeftError when it does not.
    """
    started = time.monotonic()
    with domain_lock(domain.name, domain.uuid):
        outcome = _back_up_locked(domain, settings, stamp, window_hook)
    outcome.total_seconds = time.monotonic() - started
    return outcome


def _back_up_locked(
    domain: Domain, settings: Settings, stamp: str, window_hook: WindowHook | None
) -> Outcome:
    _recover_first(domain, settings)
    plan = make_plan(domain)
    name = plan.name
    for skipped in plan.skipped:
        log.info("%s: skipping disk %s: %s", name, skipped.disk.target, skipped.reason)
    _refuse_unsafe_chains(plan)
    for disk in plan.disks:
        if disk.backing:
            log.info(
                "%s: %s has a backing file %s; the set holds %s's own layer and needs "
                "that file to be restored",
                name,
                disk.target,
                disk.backing,
                disk.target,
            )

    quiesce = quiesce_wanted(plan, settings)
    backup_set = open_set(settings, name, stamp)
    domain_dir = backup_set.domain_dir
    overlays = overlay_paths(plan.disks, backup_set.stamp, settings.overlaydir, name)
    _check_space(plan, settings, overlays, backup_set)

    try:
        backup_set.begin()
        _write_definition(domain, backup_set)
    except destination.SetExists as error:
        raise DomainError(f"{name}: {error}; domain skipped") from None
    except OSError as error:
        backup_set.discard()
        raise DomainError(f"{name}: cannot write to {domain_dir}: {error.strerror}") from None
    except TransferError as error:
        backup_set.discard()
        raise DomainError(f"{name}: cannot write to {domain_dir}: {error}") from None

    outcome = Outcome(name, disks=[d.target for d in plan.disks], merge=settings.merge)
    try:
        if plan.active:
            _back_up_running(
                domain, plan, settings, quiesce, overlays, backup_set, outcome, window_hook
            )
        else:
            outcome.live = False
            _back_up_shut_off(domain, plan, backup_set, outcome)
    except BaseException:
        backup_set.discard()  # failed or interrupted: never leave a half set behind
        raise

    completing = time.monotonic()
    try:
        outcome.set_path = backup_set.complete()
    except (OSError, TransferError) as error:
        backup_set.discard()
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise DomainError(
            f"{name}: cannot complete the set in {domain_dir}: {reason}; "
            f"the domain runs on its own images"
        ) from None
    try:
        removed = backup_set.prune(settings.keep)
        for old in backup_set.remove_stale_partials():
            log.warning("%s: removed the incomplete set %s left by an earlier run", name, old)
    except (OSError, TransferError) as error:
        removed = []
        log.warning("%s: the set is complete, but pruning old sets failed: %s", name, error)
    if removed:
        log.info("%s: removed %d old set(s) beyond keep = %d", name, len(removed), settings.keep)
    outcome.complete_seconds = time.monotonic() - completing
    outcome.flush_seconds = backup_set.flush_seconds
    return outcome


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


def _check_space(
    plan: Plan, settings: Settings, overlays: dict[str, str], backup_set: destination.AnySet
) -> None:
    """Refuse, before anything is frozen, a backup that would fill a disk."""
    images = [d.path for d in plan.disks if d.path]
    set_need = preflight.destination_need(settings.directory, images)
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


def _refuse_unsafe_chains(plan: Plan) -> None:
    for disk in plan.disks:
        if disk.mirror:
            raise DomainError(
                f"{plan.name}: disk {disk.target} has a block job running "
                f"(see `virsh blockjob {plan.name} {disk.target}`); domain skipped"
            )
        if disk.path and is_our_overlay(disk.path) and disk.backing:
            raise DomainError(
                f"{plan.name}: disk {disk.target} is on {disk.path}, an overlay left by an "
                f"earlier run; merge it (running domain: `virsh blockcommit {plan.name} "
                f"{disk.target} --active --shallow --pivot --wait`; shut off: `qemu-img commit` "
                f"and `virsh edit`), then delete the file; domain skipped"
            )


def _write_definition(domain: Domain, backup_set: destination.AnySet) -> None:
    xml = domain.xml(inactive=True) if domain.is_persistent() else domain.xml()
    backup_set.write_file("domain.xml", xml)


class _CopyStopped(Exception):
    """Another disk's copy failed, or we were interrupted: stop this one."""


def _copy_disks(plan: Plan, backup_set: destination.AnySet, outcome: Outcome) -> None:
    """Copy every disk of the domain into the set, side by side.

    Disks are copied in parallel (one thread each, at most 4): measured
    about twice as fast as one after the other here, and the time on the
    overlay is the copy's. A failure or a signal stops the other copies at
    their next chunk; the first error is raised.
    """
    started = time.monotonic()
    board = Board()
    stop = threading.Event()
    copied: dict[str, int] = {}

    def copy_one(disk: Disk, progress: Progress) -> None:
        assert disk.path

        def update(done: int) -> None:
            if stop.is_set():
                raise _CopyStopped()
            progress.update(done)

        disk_started = time.monotonic()
        copied[disk.target] = backup_set.copy_image(disk.path, backup_file_name(disk), update)
        progress.finish()
        log.debug(
            "%s: %s: copied %s of data from %s in %s",
            plan.name,
            disk.target,
            human_bytes(copied[disk.target]),
            disk.path,
            seconds(time.monotonic() - disk_started),
        )

    progresses = {
        d.target: board.add(
            f"{plan.name}: {d.target}: copy", preflight.allocated_bytes(d.path or "")
        )
        for d in plan.disks
    }
    pool = ThreadPoolExecutor(max_workers=min(len(plan.disks), 4) or 1)
    futures = [pool.submit(copy_one, d, progresses[d.target]) for d in plan.disks]
    try:
        for number, future in enumerate(as_completed(futures)):
            error = future.exception()
            if error is not None and not isinstance(error, _CopyStopped):
                raise error
            if number == 0 and len(futures) > 1:
                faults.checkpoint("mid-copy")
    finally:
        stop.set()
        pool.shutdown(wait=True)  # each copy stops at its next chunk
    outcome.bytes_copied += sum(copied.values())
    outcome.copy_seconds = time.monotonic() - started


def _back_up_shut_off(
    domain: Domain, plan: Plan, backup_set: destination.AnySet, outcome: Outcome
) -> None:
    """Copy the images of a shut-off domain: nothing writes them, unless it starts."""
    before = {d.target: _signature(d.path) for d in plan.disks}
    try:
        _copy_disks(plan, backup_set, outcome)
    except TransferError as error:
        backup_set.discard()
        raise DomainError(f"{plan.name}: {error}") from None
    changed = [d.target for d in plan.disks if _signature(d.path) != before[d.target]]
    if domain.is_active() or changed:
        backup_set.discard()
        raise DomainError(
            f"{plan.name}: the domain started during the copy of its images "
            f"(changed: {', '.join(changed) or 'none yet'}); the copy was discarded"
        )


def _signature(path: str | None) -> tuple[int, int]:
    assert path
    status = os.stat(path)
    return status.st_mtime_ns, status.st_size


def _recover_first(domain: Domain, settings: Settings) -> None:
    """Repair what an interrupted earlier run left, before anything else."""
    try:
        repaired = recovery.recover_domain(domain, settings.merge_timeout, settings.bandwidth)
    except journals.JournalError as error:
        raise DomainError(
            f"{domain.name}: {error}; remove it once checked; domain skipped"
        ) from None
    if repaired:
        log.warning(
            "%s: repaired what an interrupted backup left: %s", domain.name, "; ".join(repaired)
        )


def quiesce_wanted(plan: Plan, settings: Settings) -> bool:
    """Whether to freeze the guest's filesystems for the snapshot; raises
    DomainError, before anything is done, when quiesce = yes cannot be met."""
    if settings.quiesce == "no" or not plan.active or not plan.disks:
        return False
    if plan.agent:
        return True
    if settings.quiesce == "yes":
        raise DomainError(
            f"{plan.name}: {settings.where('general', 'quiesce')} is yes, but the domain has "
            f"no guest agent channel ({GUEST_AGENT_CHANNEL}); nothing done, domain skipped"
        )
    log.info("%s: no guest agent channel: the snapshot will be crash-consistent", plan.name)
    return False


@contextmanager
def _filesystems_frozen(
    domain: Domain, wanted: bool, settings: Settings, outcome: Outcome
) -> Iterator[None]:
    """Freeze the guest's filesystems around the body (the snapshot) when
    *wanted*; thaw them however the body ends.

    libvirt waits for the agent without limit by default: the freeze and the
    thaw get ``quiesce_timeout`` each. A freeze given up after that may still
    complete in the guest, so the agent is asked to thaw until it answers
    before the snapshot is taken (crash-consistent then).
    """
    if not wanted:
        yield
        return
    timeout = settings.quiesce_timeout
    try:
        domain.set_agent_timeout(timeout)
        try:
            outcome.quiesced = domain.fs_freeze()
        except HypervisorError as error:
            reason = error.reason
            if _agent_connected(domain):  # it may finish the freeze later
                reason += f"; quiesce_timeout {timeout} s"
                _thaw_a_late_freeze(domain, timeout, outcome)
            if settings.quiesce == "yes":
                raise DomainError(
                    "; ".join(
                        [
                            f"{domain.name}: could not freeze the guest's filesystems "
                            f"({reason}); quiesce = yes: nothing done, domain skipped",
                            *outcome.problems,
                        ]
                    )
                ) from None
            log.warning(
                "%s: could not freeze the guest's filesystems (%s); the snapshot is "
                "crash-consistent",
                domain.name,
                reason,
            )
            yield
            return
        try:
            faults.checkpoint("after-fsfreeze")
            yield
        finally:
            _thaw(domain, outcome)
    finally:
        try:
            domain.set_agent_timeout(None)
        except HypervisorError as error:
            log.debug("%s: could not reset the guest agent timeout: %s", domain.name, error)


def _agent_connected(domain: Domain) -> bool:
    try:
        return guest_agent_connected(domain.xml())
    except HypervisorError:
        return True  # cannot tell: ask for the thaw anyway


def _thaw_a_late_freeze(domain: Domain, timeout: int, outcome: Outcome) -> None:
    """The freeze failed with an agent connected: if it timed out, the agent
    may still finish it. Ask for a thaw until the agent answers (at once
    when it is idle; at most max(timeout, 60) s)."""
    deadline = time.monotonic() + max(timeout, 60)
    while True:
        try:
            thawed = domain.fs_thaw()
        except HypervisorError:
            if time.monotonic() < deadline:
                time.sleep(1)
                continue
            outcome.problems.append(
                f"{domain.name}: the guest agent finished neither the freeze nor a thaw in "
                f"time; if the guest's writes hang, run `virsh domfsthaw {domain.name}`"
            )
            return
        if thawed:
            log.warning(
                "%s: the guest agent finished the freeze late; thawed %d filesystem(s)",
                domain.name,
                thawed,
            )
        return


def _thaw(domain: Domain, outcome: Outcome) -> None:
    failure: HypervisorError | None = None
    for attempt in range(3):
        try:
            domain.fs_thaw()
            return
        except HypervisorError as error:
            failure = error
            time.sleep(0.5 * (attempt + 1))
    outcome.problems.append(
        f"{domain.name}: the guest's filesystems could not be thawed after the snapshot "
        f"({failure.reason if failure else 'no answer'}); the guest's writes may be blocked: "
        f"run `virsh domfsthaw {domain.name}`"
    )


def _back_up_running(
    domain: Domain,
    plan: Plan,
    settings: Settings,
    quiesce: bool,
    overlays: dict[str, str],
    backup_set: destination.AnySet,
    outcome: Outcome,
    window_hook: WindowHook | None,
) -> None:
    name = plan.name
    if not plan.disks:
        return
    for target, path in overlays.items():
        if os.path.lexists(path):
            backup_set.discard()
            raise DomainError(f"{name}: {target}: overlay {path} already exists; domain skipped")

    journal = journals.Journal(
        name,
        domain.uuid,
        journals.FROZEN,
        settings.merge,
        tuple(
            journals.DiskEntry(d.target, d.path or "", d.format or "raw", overlays[d.target])
            for d in plan.disks
        ),
        quiesce=quiesce,
    )
    all_disks = parse_disks(domain.xml())
    frozen_at = time.monotonic()
    frozen = copied = False
    copy_error: Exception | None = None
    journals.write(journal)
    try:
        faults.checkpoint("after-journal")
        try:
            # A signal waits until the guest is thawed.
            with interrupts.critical(), _filesystems_frozen(domain, quiesce, settings, outcome):
                domain.create_overlays(snapshot_xml(all_disks, overlays))
        except HypervisorError as error:
            raise DomainError(f"{name}: could not freeze the disks: {error}") from None
        frozen = True
        outcome.freeze_seconds = time.monotonic() - frozen_at
        log.info(
            "%s: froze %s in %s%s",
            name,
            ", ".join(overlays),
            seconds(time.monotonic() - frozen_at),
            ""
            if outcome.quiesced is None
            else f", {outcome.quiesced} guest filesystem(s) quiesced",
        )
        faults.checkpoint("after-freeze")
        if window_hook:
            hook_started = time.monotonic()
            window_hook(domain, overlays)
            outcome.hook_seconds = time.monotonic() - hook_started
        _copy_disks(plan, backup_set, outcome)
        copied = True
        faults.checkpoint("after-copy")
    except (TransferError, OSError) as error:
        copy_error = error
    finally:
        # Whatever happened since the journal was written (a failed copy, a
        # signal, a bug), the domain goes back onto its images before we go on.
        frozen = frozen or _runs_on_any(domain, overlays)
        if frozen:
            merge_started = time.monotonic()
            back_on_images = merge(domain, plan.disks, overlays, settings, journal)
            outcome.merge_seconds = back_on_images - merge_started
            outcome.overlay_seconds = back_on_images - frozen_at
            _resume_if_paused_by_io_error(domain, overlays, outcome)
        else:
            journals.remove(domain.uuid)
        if not copied:
            backup_set.discard()
    if copy_error is not None:
        raise DomainError(
            "; ".join(
                [
                    f"{name}: copy failed, no backup made: {copy_error}; "
                    f"the domain runs on its own images",
                    *outcome.problems,
                ]
            )
        )


def _resume_if_paused_by_io_error(
    domain: Domain, overlays: dict[str, str], outcome: Outcome
) -> None:
    """A full overlay filesystem makes QEMU pause the guest; once the merge
    has put the disks back on their images, the guest can go on."""
    if not domain.is_active() or not domain.paused_by_io_error():
        return
    domain.resume()
    places = ", ".join(sorted({os.path.dirname(p) for p in overlays.values()}))
    outcome.problems.append(
        f"{domain.name}: QEMU paused the guest during the backup because a write failed "
        f"(the filesystem of the overlays, {places}, is probably full); it was merged back "
        f"and resumed, its pending writes retried; raise overlay_reserve or free space there"
    )


def _runs_on_any(domain: Domain, overlays: dict[str, str]) -> bool:
    try:
        xml = domain.xml() if domain.is_active() else domain.xml(inactive=True)
    except HypervisorError:
        return True  # cannot tell: let the merge look closer
    return bool(referenced_paths(xml) & set(overlays.values()))


def merge(
    domain: Domain,
    disks: list[Disk],
    overlays: dict[str, str],
    settings: Settings,
    journal: journals.Journal,
) -> float:
    """Bring every overlay back into its disk, verify, delete the overlays.

    Returns the monotonic time at which the domain was verified back on
    its own images (before the overlays are deleted).

    Runs as a critical section: a SIGTERM arriving meanwhile is acted on
    once the domain is back on its images. Raises OverlayLeftError, naming
    the state and the repair, when a disk could not be brought back.
    """
    with interrupts.critical():
        journals.write(journal.at(journals.MERGING))
        try:
            if not domain.is_active():
                _merge_offline(domain)
                back_on_images = time.monotonic()
            elif settings.merge == "pull":
                _merge_by_pull(domain, disks, overlays, settings)
                back_on_images = time.monotonic()
            else:
                back_on_images = _merge_by_commit(domain, disks, overlays, settings, journal)
        except HypervisorError as error:
            raise OverlayLeftError(
                f"{domain.name}: the merge of {', '.join(overlays)} failed ({error}); the "
                f"domain may still use the overlays {', '.join(overlays.values())}; nothing is "
                f"lost, do not delete them: run `backupninja-kvm recover {domain.name}` "
                f"(journal {journals.journal_path(domain.uuid)})"
            ) from None
        journals.remove(domain.uuid)
        log.info("%s: merged %s by %s", domain.name, ", ".join(overlays), settings.merge)
    return back_on_images


def _merge_offline(domain: Domain) -> None:
    """The domain was shut down during the backup: merge with qemu-img."""
    log.warning(
        "%s: the domain was shut down during the backup; merging its overlays offline",
        domain.name,
    )
    done = recovery.recover_domain(domain, interrupted=False)
    log.info("%s: %s", domain.name, "; ".join(done))


def _merge_by_commit(
    domain: Domain,
    disks: list[Disk],
    overlays: dict[str, str],
    settings: Settings,
    journal: journals.Journal,
) -> float:
    # One journal write before the jobs start and one after every pivot:
    # each costs an fsync while the VM is still on its overlays.
    for target in overlays:
        journal = journal.with_disk(target, journals.DISK_MERGING)
    journals.write(journal)
    for target, overlay in overlays.items():
        recovery.start_commit(domain, target, overlay, settings.bandwidth)
    faults.checkpoint("mid-merge")
    for target, overlay in overlays.items():
        recovery.wait_ready_and_pivot(
            domain, target, overlay, settings.merge_timeout, settings.bandwidth
        )
        journal = journal.with_disk(target, journals.DISK_MERGED)
    faults.checkpoint("after-pivot")
    _verify_tops(domain, {d.target: d.path for d in disks}, overlays)
    back_on_images = time.monotonic()
    journals.write(journal.at(journals.MERGED))
    faults.checkpoint("before-delete")
    for target, overlay in overlays.items():
        try:
            recovery.delete_overlay(domain, target, overlay)
        except OSError as error:
            log.warning(
                "%s: %s: merged, but the overlay %s could not be deleted: %s",
                domain.name,
                target,
                overlay,
                error.strerror,
            )
    return back_on_images


def _merge_by_pull(
    domain: Domain, disks: list[Disk], overlays: dict[str, str], settings: Settings
) -> None:
    # One disk after the other: QEMU 7.2 was seen to crash with two pulls at once.
    for disk in disks:
        overlay = overlays[disk.target]
        try:
            # Pull only the layer we froze; a template below it stays shared.
            domain.start_pull(disk.target, disk.backing, settings.bandwidth)
        except HypervisorError as error:
            raise recovery.left_on_overlay(
                domain, disk.target, overlay, f"pull refused: {error}"
            ) from None
        faults.checkpoint("mid-merge")
        if not recovery.wait_for_pull(domain, disk.target, settings.merge_timeout):
            raise recovery.left_on_overlay(
                domain, disk.target, overlay, f"pull not done within {settings.merge_timeout} s"
            )
    faults.checkpoint("after-pivot")
    # After a pull the overlay *is* the disk; the frozen image is unused.
    live = domain.xml()
    for disk in disks:
        if disk.path in referenced_paths(live):
            raise recovery.left_on_overlay(
                domain, disk.target, overlays[disk.target], "the pull did not detach the image"
            )
        log.info(
            "%s: %s now runs on %s (merge = pull); %s is no longer used",
            domain.name,
            disk.target,
            overlays[disk.target],
            disk.path,
        )
    faults.checkpoint("before-delete")


def _verify_tops(domain: Domain, bases: dict[str, str | None], overlays: dict[str, str]) -> None:
    """The live and the persistent XML show each original image on top, no mirror."""
    views = [("live", domain.xml())]
    if domain.is_persistent():
        views.append(("persistent", domain.xml(inactive=True)))
    for view, xml in views:
        by_target = {d.target: d for d in parse_disks(xml)}
        for target, base in bases.items():
            disk = by_target.get(target)
            if disk is None or disk.path != base or disk.mirror:
                shown = disk.path if disk else "nothing"
                raise recovery.left_on_overlay(
                    domain,
                    target,
                    overlays[target],
                    f"the {view} XML shows {shown} on top instead of {base}",
                )
