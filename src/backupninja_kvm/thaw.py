"""Thaw: take down the view of a freeze, check what it exposed, merge back.

Used by ``stage = thaw`` and by the guard (when backupninja ended without
the thaw, or ``max_frozen`` passed) alike, with the domains' locks held.
Everything is said through ``report.log``: one line per domain on success
(how long it was frozen, the overlay's size, the merge method and time), an
Error for each view file that a reader still held (its copy may be torn) or
that changed while exposed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from backupninja_kvm import freeze, recovery, ride, view
from backupninja_kvm import journal as journals
from backupninja_kvm import merge as merges
from backupninja_kvm.backup import merge
from backupninja_kvm.disks import Disk
from backupninja_kvm.errors import DomainError, HypervisorError, OverlayLeftError
from backupninja_kvm.hypervisor import ERR_NO_DOMAIN, Hypervisor
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.preflight import allocated_bytes
from backupninja_kvm.report import human_bytes, log, seconds


@dataclass(frozen=True)
class Options:
    """How to merge (merge.MergeOptions), as the thaw's action file says."""

    merge: str = "commit"
    merge_timeout: int = 600
    bandwidth: int = 0


def options_of(record: ride.Ride) -> Options:
    return Options(record.merge, record.merge_timeout, record.bandwidth)


def thaw_ride(
    hypervisor: Hypervisor, record: ride.Ride, options: Options, wait: float, why: str = ""
) -> tuple[bool, bool]:
    """Thaw every domain of *record*; returns (an Error was said, a Fatal
    was said). *wait*: seconds a reader may still hold a view file before it
    is detached. *why*: said in each domain's line (the guard's reason)."""
    errors = fatal = False
    for exposed in record.domains:
        try:
            errors |= thaw_domain(hypervisor, record, exposed, options, wait, why)
        except OverlayLeftError as error:
            log.critical("%s", error)
            fatal = True
        except (DomainError, HypervisorError, journals.JournalError, OSError) as error:
            log.error("%s: the thaw failed: %s", exposed.name, error)
            errors = True
    return errors, fatal


def thaw_domain(
    hypervisor: Hypervisor,
    record: ride.Ride,
    exposed: ride.Exposed,
    options: Options,
    wait: float,
    why: str = "",
) -> bool:
    """Thaw one domain; returns True when an Error was said. Raises
    OverlayLeftError when it may still run on an overlay."""
    name = exposed.name
    errors = _take_down(record.view, exposed, wait)
    changed = [f for f in exposed.files if ride.signature(f.source) != f.signature]
    for item in changed:
        log.error(
            "%s: %s changed while it was exposed as %s (the domain was started, or the file "
            "written): the copy the ship action made of it may be torn",
            name,
            item.source,
            os.path.join(record.view, name, item.name),
        )
        errors = True
    if not exposed.live:
        log.info(
            "%s: thawed%s: shut off, exposed for %s, its images %s",
            name,
            why,
            seconds(time.time() - exposed.frozen_at),
            "changed" if changed else "unchanged",
        )
        return errors
    try:
        domain = hypervisor.domain_by_uuid(exposed.uuid)
    except HypervisorError as error:
        if error.code != ERR_NO_DOMAIN:
            raise
        left = journals.read(exposed.uuid)
        if left is None:
            log.warning("%s: the domain no longer exists, and no journal is left", name)
            return errors
        done = recovery.recover_vanished(hypervisor, left)
        log.warning("%s (no longer exists): repaired: %s", name, "; ".join(done))
        return errors
    journal = journals.read(exposed.uuid)
    if journal is None:
        log.warning(
            "%s: no journal left: it was merged back already (by `backupninja-kvm recover` "
            "or another run's repair); nothing to thaw",
            name,
        )
        return errors
    overlays = {d.target: d.overlay for d in journal.disks}
    if journal.phase != journals.FROZEN or not freeze.runs_on_any(domain, overlays):
        done = recovery.recover_domain(domain, options.merge_timeout, options.bandwidth)
        log.warning("%s: repaired%s: %s", name, why, "; ".join(done))
        return errors
    journal = replace(journal, merge=options.merge)
    journals.write(journal)
    size = sum(_allocated(path) for path in overlays.values())
    disks = [
        Disk(d.target, "disk", "file", d.base, d.base_format, backing=d.base_backing)
        for d in journal.disks
    ]
    started = time.monotonic()
    frozen_for = time.time() - exposed.frozen_at
    merge(domain, disks, overlays, options, journal)
    merged_in = time.monotonic() - started
    outcome = Outcome(name)
    merges.resume_if_paused_by_io_error(domain, overlays, outcome)
    for problem in outcome.problems:
        log.error("%s", problem)
    log.info(
        "%s: thawed%s: frozen %s, overlay %s, merged by %s in %s",
        name,
        why,
        seconds(frozen_for),
        human_bytes(size),
        options.merge,
        seconds(merged_in),
    )
    return errors or bool(outcome.problems)


def _take_down(view_dir: str, exposed: ride.Exposed, wait: float) -> bool:
    try:
        result = view.take_down(view_dir, exposed.name, wait=wait)
    except view.ViewError as error:
        log.error("%s: %s", exposed.name, error)
        return True
    for forced in result.forced:
        log.error(
            "%s: %s: the copy it makes of the image may be torn (the domain was merged back "
            "while it read)",
            exposed.name,
            forced.describe(),
        )
    return bool(result.forced)


def _allocated(path: str) -> int:
    try:
        return allocated_bytes(path)
    except OSError:
        return 0
