"""The full stage, for one domain: plan, freeze, ship, merge, complete.

Each phase has its module (``plan``, ``quiesce``, ``freeze``, ``ship``,
``merge``, ``complete``; ``recovery`` repairs first); this one only puts them
in order. The hypervisor is reached only through ``hypervisor.Domain``.

Between the freeze and the merge, only the copy runs. Whatever happens during
the copy, the merge still runs; checksums, the manifest and pruning come after.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from backupninja_kvm import (
    changed,
    complete,
    destination,
    faults,
    freeze,
    interrupts,
    recovery,
    ship,
)
from backupninja_kvm import journal as journals
from backupninja_kvm import merge as merges
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import Disk, overlay_paths, parse_disks
from backupninja_kvm.errors import DomainError, HypervisorError, OverlayLeftError, TransferError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.lock import domain_lock
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import Plan, block_refusal, check_space, checked_plan, open_set
from backupninja_kvm.quiesce import quiesce_wanted
from backupninja_kvm.report import log

# Called right after the freeze and the machine state's copy, before the
# disks' copy, while the domain runs on its overlays, with the domain and
# {target: overlay path}. Tests use it to write into the guest during the
# backup window.
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
    recovery.recover_before_backup(domain, settings)
    plan, unsaved = checked_plan(
        domain, settings.backing, block_refusal(settings), settings.exclude_disks
    )
    name = plan.name

    quiesce = quiesce_wanted(plan, settings)
    backup_set = open_set(settings, name, stamp)
    domain_dir = backup_set.domain_dir
    overlays = overlay_paths(plan.disks, backup_set.stamp, settings.overlaydir, name)
    check_space(plan, settings, overlays, backup_set)

    try:
        backup_set.begin()
        ship.write_definition(domain, backup_set)
    except destination.SetExists as error:
        raise DomainError(f"{name}: {error}; domain skipped") from None
    except OSError as error:
        backup_set.discard()
        raise DomainError(f"{name}: cannot write to {domain_dir}: {error.strerror}") from None
    except TransferError as error:
        backup_set.discard()
        raise DomainError(f"{name}: cannot write to {domain_dir}: {error}") from None

    outcome = Outcome(name, disks=[d.target for d in plan.disks], merge=settings.merge)
    outcome.problems += unsaved
    night = None
    try:
        if plan.active:
            night = _prepare_changes(domain, plan, settings, backup_set)
            _back_up_running(
                domain, plan, settings, quiesce, overlays, backup_set, outcome, window_hook, night
            )
        else:
            outcome.live = False
            outcome.freeze_time = time.time()
            ship.copy_shut_off(domain, plan, backup_set, outcome)
        complete.fix_headers(plan, backup_set)
        _strip_bitmaps(plan, backup_set)
        tracking = _record_changes(night, backup_set, outcome) if night else {}
        ship.write_set_info(domain, plan, backup_set, outcome, tracking)
        complete.complete_set(domain, plan, settings, backup_set, outcome)
    except BaseException:
        backup_set.discard()  # failed or interrupted: never leave a half set behind
        if night is not None and night.started:
            with interrupts.critical():
                _finish_changes(domain, night, complete=False)
        raise
    if night is not None:
        faults.checkpoint("before-checkpoint-delete")
        _finish_changes(domain, night, complete=True)
    return outcome


def _prepare_changes(
    domain: Domain, plan: Plan, settings: Settings, backup_set: destination.AnySet
) -> changed.Night | None:
    try:
        return changed.prepare(domain, plan, settings, backup_set)
    except (HypervisorError, TransferError, OSError) as error:
        reason = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) else error
        log.info("%s: changed blocks: %s; whole copies", plan.name, reason)
    changed.discard_clones(plan, backup_set)  # the whole copies take their place
    return None


def _record_changes(night: changed.Night, backup_set: destination.AnySet, outcome: Outcome) -> dict:
    try:
        return changed.record(night, backup_set, outcome)
    except (OSError, TransferError) as error:
        raise DomainError(
            f"{night.domain}: cannot read the set's images in {backup_set.partial_path}: "
            f"{getattr(error, 'strerror', None) or error}; no set made, the domain runs on "
            f"its own images"
        ) from None


def _strip_bitmaps(plan: Plan, backup_set: destination.AnySet) -> None:
    try:
        changed.strip_bitmaps(plan, backup_set)
    except TransferError as error:
        raise DomainError(
            f"{plan.name}: {error}; no set made, the domain runs on its own images"
        ) from None


def _finish_changes(domain: Domain, night: changed.Night, complete: bool) -> None:
    try:
        changed.finish(domain, night, complete)
    except HypervisorError as error:
        log.warning(
            "%s: checkpoints: %s; the next night deletes those no set needs", night.domain, error
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
    night: changed.Night | None = None,
) -> None:
    name = plan.name
    if not plan.disks:
        return
    journal = freeze.new_journal(domain, plan, settings, quiesce, overlays, backup_set)
    all_disks = parse_disks(domain.xml())
    frozen_at = time.monotonic()
    frozen = copied = False
    copy_error: Exception | None = None
    journals.write(journal)
    try:
        faults.checkpoint("after-journal")
        if night is not None:
            changed.start_checkpoint(domain, night, all_disks)
            faults.checkpoint("after-checkpoint")
        freeze.freeze(domain, all_disks, overlays, quiesce, settings, outcome, frozen_at)
        frozen = True
        faults.checkpoint("after-freeze")
        ship.copy_state(plan, backup_set, outcome)  # first: the closest to the freeze instant
        if window_hook:
            hook_started = time.monotonic()
            window_hook(domain, overlays)
            outcome.hook_seconds = time.monotonic() - hook_started
        if night is not None:
            changed.copy_changes(night, backup_set, outcome)
        ship.copy_disks(plan, backup_set, outcome, skip=night.changed_names() if night else set())
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
            frozen = frozen or freeze.runs_on_any(domain, overlays)
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


def merge(
    domain: Domain,
    disks: list[Disk],
    overlays: dict[str, str],
    settings: merges.MergeOptions,
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
