"""Freeze: the journal that makes the overlays ours, then one disk-only
snapshot of every disk (quiesced when wanted) that puts the chosen ones on
their overlays."""

from __future__ import annotations

import os
import time

from backupninja_kvm import destination, interrupts
from backupninja_kvm import journal as journals
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import Disk, parse_disks, referenced_paths, snapshot_xml
from backupninja_kvm.errors import DomainError, HypervisorError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import Plan
from backupninja_kvm.quiesce import filesystems_frozen
from backupninja_kvm.report import log, seconds


def new_journal(
    domain: Domain,
    plan: Plan,
    settings: Settings,
    quiesce: bool,
    overlays: dict[str, str],
    backup_set: destination.AnySet | None,
    view: str = "",
) -> journals.Journal:
    """The journal of the freeze about to be taken (the caller writes it):
    each disk's base, its backing file and persistent definition as they are
    now, and its overlay; the set being written (stage = full) or the view
    that will expose the frozen images (stage = freeze). Raises DomainError,
    discarding the set, when an overlay's file already exists."""
    name = plan.name
    for target, path in overlays.items():
        if os.path.lexists(path):
            if backup_set is not None:
                backup_set.discard()
            raise DomainError(f"{name}: {target}: overlay {path} already exists; domain skipped")

    defined = (
        {d.target: d.path for d in parse_disks(domain.xml(inactive=True))}
        if domain.is_persistent()
        else {}
    )
    return journals.Journal(
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
        partial=backup_set.partial_path if backup_set is not None else "",
        partial_host=backup_set.remote.label
        if isinstance(backup_set, destination.RemoteBackupSet)
        else "",
        view=view,
    )


def freeze(
    domain: Domain,
    all_disks: list[Disk],
    overlays: dict[str, str],
    quiesce: bool,
    settings: Settings,
    outcome: Outcome,
    frozen_at: float,
) -> None:
    """Take the snapshot: *all_disks* (the live XML's, every one listed, see
    ``snapshot_xml``) with *overlays* for the chosen ones, the guest's
    filesystems frozen around it when *quiesce*. Call with the journal
    written. Raises DomainError when libvirt refused the snapshot."""
    name = domain.name
    try:
        # A signal waits until the guest is thawed.
        with interrupts.critical(), filesystems_frozen(domain, quiesce, settings, outcome):
            domain.create_overlays(snapshot_xml(all_disks, overlays))
    except HypervisorError as error:
        raise DomainError(f"{name}: could not freeze the disks: {error}") from None
    outcome.freeze_seconds = time.monotonic() - frozen_at
    outcome.freeze_time = time.time()
    log.info(
        "%s: froze %s in %s%s",
        name,
        ", ".join(overlays),
        seconds(time.monotonic() - frozen_at),
        "" if outcome.quiesced is None else f", {outcome.quiesced} guest filesystem(s) quiesced",
    )


def runs_on_any(domain: Domain, overlays: dict[str, str]) -> bool:
    try:
        xml = domain.xml() if domain.is_active() else domain.xml(inactive=True)
    except HypervisorError:
        return True  # cannot tell: let the merge look closer
    return bool(referenced_paths(xml) & set(overlays.values()))
