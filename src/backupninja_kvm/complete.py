"""Complete: make the set restore on its own (header fixes on the copies),
then flush, checksum, rename and point ``latest`` at it, prune, and delete
the images earlier pulls made that this set supersedes."""

from __future__ import annotations

import os
import time

from backupninja_kvm import destination, images, merge
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import INFO
from backupninja_kvm.errors import DomainError, TransferError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import Plan
from backupninja_kvm.report import log


def fix_headers(plan: Plan, backup_set: destination.AnySet) -> None:
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


def complete_set(
    domain: Domain,
    plan: Plan,
    settings: Settings,
    backup_set: destination.AnySet,
    outcome: Outcome,
) -> None:
    """Turn the partial set, copied and fixed, into a complete one, then
    prune. Raises DomainError (the set discarded) when it cannot be
    completed; a failed pruning is a Warning."""
    name = plan.name
    domain_dir = backup_set.domain_dir
    completing = time.monotonic()
    try:
        outcome.set_path = backup_set.complete()
        if isinstance(backup_set, destination.BackupSet):
            outcome.hashed = dict(backup_set.hashed)
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
    # Nor does a set that fails its verification ([dest] verify = yes), or
    # does not boot ([dest] rehearse = yes).
    damaged = settings.verify and not verify_new_set(backup_set, outcome)
    if not damaged and settings.rehearse and isinstance(backup_set, destination.BackupSet):
        damaged = not rehearse_new_set(backup_set, settings, outcome)
    try:
        removed = [] if lacking or damaged else backup_set.prune(settings.retention())
        if damaged:
            log.warning(
                "%s: no old set was removed, and no image an earlier pull left: this set "
                "failed its %s (see the Error)",
                name,
                "rehearsal" if outcome.rehearsed is False else "verification",
            )
        elif lacking:
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
        log.info(
            "%s: removed %d old set(s) that %s does not keep: %s",
            name,
            len(removed),
            settings.retention().describe(),
            ", ".join(removed),
        )
    if not damaged:
        merge.delete_superseded_pulls(domain)  # the set holds what they held
    outcome.complete_seconds = time.monotonic() - completing
    outcome.flush_seconds = backup_set.flush_seconds


def rehearse_new_set(
    backup_set: destination.BackupSet, settings: Settings, outcome: Outcome
) -> bool:
    """[dest] rehearse = yes: boot the set just completed as a throwaway
    guest. Returns False only when it did not boot (an Error); a rehearsal
    that cannot be tried (no agent channel and no rehearse_pattern, ...) is
    a Warning and judges nothing."""
    from backupninja_kvm import rehearse
    from backupninja_kvm.errors import HypervisorError

    try:
        result = rehearse.rehearse_set(
            backup_set.final_path,
            settings.uri,
            settings.rehearse_timeout,
            settings.rehearse_pattern or None,
        )
    except (rehearse.RehearseError, HypervisorError) as error:
        log.warning("%s: the new set was not rehearsed: %s", backup_set.domain, error)
        return True
    outcome.rehearsed = result.ok
    outcome.rehearse_seconds = result.seconds
    if result.ok:
        log.info("%s", result.summary)
        return True
    outcome.problems.append(
        f"{result.summary}; the set is complete, but not proven to boot: rehearse it by hand "
        f"(`backupninja-kvm rehearse {backup_set.final_path}`) to see why"
    )
    return False


def verify_new_set(backup_set: destination.AnySet, outcome: Outcome) -> bool:
    """[dest] verify = yes: verify the set just completed (the domain is
    back on its own images by now) and keep the result in it. Returns
    whether it passed; a damaged set is an Error of the domain."""
    from backupninja_kvm import verify
    from backupninja_kvm.sets import SetRef

    remote = backup_set.remote if isinstance(backup_set, destination.RemoteBackupSet) else None
    path = os.path.join(backup_set.domain_dir, backup_set.stamp)
    ref = SetRef(backup_set.domain, backup_set.stamp, path, remote)
    try:
        found = verify.verify_set(ref)
    except TransferError as error:
        outcome.problems.append(f"{ref.short}: the set could not be verified: {error}")
        return False
    problem = verify.record(ref, found)
    if problem:
        log.warning("%s: %s", ref.domain, problem)
    if found.ok:
        outcome.verified = True
        log.info("%s", found.summary())
        return True
    outcome.problems.append(
        f"{found.summary()}; check the destination's storage, then `backupninja-kvm "
        f"verify --all` its other sets"
    )
    return False
