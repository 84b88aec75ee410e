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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from backupninja_kvm import destination, faults, images, interrupts, preflight, recovery
from backupninja_kvm import journal as journals
from backupninja_kvm import merge as merges
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import (
    INFO,
    WARNING,
    Disk,
    overlay_paths,
    parse_disks,
    referenced_paths,
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
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import (
    Plan,
    SetFile,
    check_space,
    make_plan,
    nothing_to_back_up,
    open_set,
    refuse_unsafe_chains,
    report_skipped,
)
from backupninja_kvm.progress import Board, Progress
from backupninja_kvm.quiesce import filesystems_frozen, quiesce_wanted
from backupninja_kvm.report import human_bytes, log, seconds

# Called right after the freeze, before the copy, while the domain runs on its
# overlays, with the domain and {target: overlay path}. Tests use it to write
# into the guest during the backup window.
WindowHook = Callable[[Domain, dict[str, str]], None]


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
    plan = make_plan(domain, settings.backing)
    name = plan.name
    if not plan.disks:
        raise DomainError(nothing_to_back_up(plan))
    unsaved = [report_skipped(name, skipped) for skipped in plan.skipped]
    refuse_unsafe_chains(plan)
    for level, note in plan.notes:
        (log.warning if level == WARNING else log.info)("%s", note)

    quiesce = quiesce_wanted(plan, settings)
    backup_set = open_set(settings, name, stamp)
    domain_dir = backup_set.domain_dir
    overlays = overlay_paths(plan.disks, backup_set.stamp, settings.overlaydir, name)
    check_space(plan, settings, overlays, backup_set)

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
    outcome.problems += [text for text in unsaved if text]
    try:
        if plan.active:
            _back_up_running(
                domain, plan, settings, quiesce, overlays, backup_set, outcome, window_hook
            )
        else:
            outcome.live = False
            _back_up_shut_off(domain, plan, backup_set, outcome)
        _fix_headers(plan, backup_set, outcome)
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
    # A set that lacks a disk's data (skipped with a Warning or an Error)
    # never replaces the sets that may hold it: nothing is pruned until the
    # sets are whole again (or the administrator leaves the disk out).
    lacking = [s.disk.target for s in plan.skipped if s.level != INFO]
    try:
        removed = [] if lacking else backup_set.prune(settings.keep)
        if lacking:
            log.warning(
                "%s: no old set was removed: this set lacks %s (see above), and older sets "
                "may hold it; remove them by hand once checked",
                name,
                ", ".join(lacking),
            )
        for old in backup_set.remove_stale_partials():
            log.warning("%s: removed the incomplete set %s left by an earlier run", name, old)
    except (OSError, TransferError) as error:
        removed = []
        log.warning("%s: the set is complete, but pruning old sets failed: %s", name, error)
    if removed:
        log.info("%s: removed %d old set(s) beyond keep = %d", name, len(removed), settings.keep)
    merges.delete_superseded_pulls(domain)  # the set holds what they held
    outcome.complete_seconds = time.monotonic() - completing
    outcome.flush_seconds = backup_set.flush_seconds
    return outcome


def _fix_headers(plan: Plan, backup_set: destination.AnySet, outcome: Outcome) -> None:
    """Make the copies in the set refer to each other (backing files, data
    files) by relative names, so that the set restores on its own. Runs on
    the copies only, after the merge. On a remote destination this needs
    qemu-img there; without it, each copy keeps the names of the domain's
    own files, which a Warning says with the command to run on a restore."""
    failed: set[str] = set()
    for fix in plan.fixes:
        if fix.image in failed:
            # Its data file is still the domain's: qemu-img would open that one.
            log.warning(
                "%s: %s: did not %s in the set; after a restore, run `qemu-img %s`",
                plan.name,
                fix.target,
                fix.what,
                " ".join(fix.argv),
            )
            continue
        try:
            if isinstance(backup_set, destination.RemoteBackupSet):
                backup_set.remote.run(
                    'cd "$1" && shift && exec qemu-img "$@"', backup_set.partial_path, *fix.argv
                )
            else:
                images.run_in(backup_set.partial_path, list(fix.argv))
        except (TransferError, images.ImageError) as error:
            failed.add(fix.image)
            log.warning(
                "%s: %s: could not %s in the set (%s); after a restore, run "
                "`qemu-img %s` in the set's folder",
                plan.name,
                fix.target,
                fix.what,
                error,
                " ".join(fix.argv),
            )


def _write_definition(domain: Domain, backup_set: destination.AnySet) -> None:
    """Save the definition a restore needs, console passwords included (the
    set is 0700, the file 0600). libvirt secrets (LUKS keys) are not in it."""
    persistent = domain.is_persistent()
    xml = domain.xml(inactive=persistent, secure=True)
    backup_set.write_file("domain.xml", xml)


class _CopyStopped(Exception):
    """Another disk's copy failed, or we were interrupted: stop this one."""


def _copy_disks(plan: Plan, backup_set: destination.AnySet, outcome: Outcome) -> None:
    """Copy every file of the plan (each disk's top, its own backing layers,
    data files) into the set, side by side.

    Files are copied in parallel (one thread each, at most 4): measured
    about twice as fast as one after the other here, and the time on the
    overlay is the copy's. A failure or a signal stops the other copies at
    their next chunk; the first error is raised.
    """
    started = time.monotonic()
    board = Board()
    stop = threading.Event()
    copied: dict[str, int] = {}

    def copy_one(item: SetFile, progress: Progress) -> None:
        def update(done: int) -> None:
            if stop.is_set():
                raise _CopyStopped()
            progress.update(done)

        file_started = time.monotonic()
        copied[item.name] = backup_set.copy_image(item.source, item.name, update)
        progress.finish()
        log.debug(
            "%s: %s: %s from %s in %s",
            plan.name,
            item.target,
            f"sent {human_bytes(copied[item.name])} over the wire"
            if isinstance(backup_set, destination.RemoteBackupSet)
            else f"copied {human_bytes(copied[item.name])} of data",
            item.source,
            seconds(time.monotonic() - file_started),
        )

    files = plan.files
    tops = {d.path for d in plan.disks}
    progresses = {
        f.name: board.add(
            f"{plan.name}: {f.target}: copy" + ("" if f.source in tops else f" {f.name}"),
            preflight.allocated_bytes(f.source),
        )
        for f in files
    }
    pool = ThreadPoolExecutor(max_workers=min(len(files), 4) or 1)
    futures = [pool.submit(copy_one, f, progresses[f.name]) for f in files]
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
        board.close()  # later log lines go below it
    outcome.bytes_copied += sum(copied.values())
    outcome.remote = isinstance(backup_set, destination.RemoteBackupSet)
    outcome.copy_seconds = time.monotonic() - started


def _back_up_shut_off(
    domain: Domain, plan: Plan, backup_set: destination.AnySet, outcome: Outcome
) -> None:
    """Copy the images of a shut-off domain: nothing writes them, unless it starts."""
    before = {f.name: _signature(f.source) for f in plan.files}
    try:
        _copy_disks(plan, backup_set, outcome)
    except TransferError as error:
        backup_set.discard()
        raise DomainError(f"{plan.name}: {error}") from None
    changed = [f.name for f in plan.files if _signature(f.source) != before[f.name]]
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
    """Repair what an interrupted earlier run left, before anything else.

    The repair is a merge: a signal waits until it is done (or has failed).
    Raises DomainError when the domain runs on its own images but was not
    repaired, OverlayLeftError (with the state found) when it may not.
    """
    try:
        with interrupts.critical():
            repaired = recovery.recover_domain(domain, settings.merge_timeout, settings.bandwidth)
            if repaired:
                log.warning(
                    "%s: repaired what an interrupted backup left: %s",
                    domain.name,
                    "; ".join(repaired),
                )
    except journals.JournalError as error:
        raise DomainError(
            f"{domain.name}: {error}; remove it once checked; domain skipped"
        ) from None
    except (OverlayLeftError, DomainError):
        raise
    except Exception as error:  # a bug, or libvirt-python: never hide the state
        raise _repair_failed(domain, error) from None


def _repair_failed(domain: Domain, error: Exception) -> DomainError | OverlayLeftError:
    """The error to report when the repair before the backup failed with
    *error*, saying the state found afterwards."""
    why = merges.describe_error(error)
    journal = journals.journal_path(domain.uuid)
    in_use = merges.overlays_in_use(domain)
    if in_use == []:
        return DomainError(
            f"{domain.name}: the repair of what an interrupted backup left failed ({why}); "
            f"the domain runs on its own images, its journal {journal} is left: run "
            f"`backupninja-kvm recover {domain.name}`; domain skipped"
        )
    state = (
        f"it still runs on the overlay(s) {', '.join(in_use)}"
        if in_use
        else "its state could not be read, it may still run on an overlay"
    )
    return OverlayLeftError(
        f"{domain.name}: the repair of what an interrupted backup left failed ({why}); "
        f"{state}; nothing is lost, do not delete them: run `backupninja-kvm recover "
        f"{domain.name}` (journal {journal}); domain skipped"
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

    defined = (
        {d.target: d.path for d in parse_disks(domain.xml(inactive=True))}
        if domain.is_persistent()
        else {}
    )
    journal = journals.Journal(
        name,
        domain.uuid,
        journals.FROZEN,
        settings.merge,
        tuple(
            journals.DiskEntry(
                d.target,
                d.path or "",
                d.format or "raw",
                overlays[d.target],
                base_backing=d.backing,
                persistent_base=defined.get(d.target),
            )
            for d in plan.disks
        ),
        quiesce=quiesce,
        partial=backup_set.partial_path,
        partial_host=backup_set.remote.label
        if isinstance(backup_set, destination.RemoteBackupSet)
        else "",
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
            with interrupts.critical(), filesystems_frozen(domain, quiesce, settings, outcome):
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
        # signal, a bug), the domain goes back onto its images before we go
        # on; a signal arriving from here on waits for that too.
        with interrupts.critical():
            faults.checkpoint("before-merge")
            frozen = frozen or _runs_on_any(domain, overlays)
            if frozen:
                merge_started = time.monotonic()
                back_on_images = merge(domain, plan.disks, overlays, settings, journal)
                outcome.merge_seconds = back_on_images - merge_started
                outcome.overlay_seconds = back_on_images - frozen_at
                merges.resume_if_paused_by_io_error(domain, overlays, outcome)
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
        journal = journal.at(journals.MERGING)  # never back to FROZEN from here on
        journals.write(journal)
        try:
            if not domain.is_active():
                _merge_offline(domain)
                back_on_images = time.monotonic()
            elif settings.merge == "pull":
                merges.merge_by_pull(domain, disks, overlays, settings, journal)
                back_on_images = time.monotonic()
            else:
                back_on_images = merges.merge_by_commit(domain, disks, overlays, settings, journal)
        except (OverlayLeftError, DomainError):
            raise
        except Exception as error:  # a bug, or libvirt-python: no traceback hides the overlays
            raise merges.merge_failed(domain, overlays, error) from None
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
