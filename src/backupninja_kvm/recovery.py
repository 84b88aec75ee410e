"""Recovery: bring a domain back onto its own images after an interrupted backup.

``decide`` is a pure function of one disk's journal entry and its observed
state (live chain, block job, persistent XML, overlay file); it returns the
steps that bring the disk back, or a refusal that touches nothing. Running
it again on the state it leaves yields no step: recovery is idempotent.
``recover_domain`` observes, decides and carries the steps out with the
merge's own primitives (``merge.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from backupninja_kvm import interrupts
from backupninja_kvm import journal as journals
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import parse_disks, referenced_paths
from backupninja_kvm.errors import DomainError, HypervisorError, OverlayLeftError
from backupninja_kvm.hypervisor import ERR_NO_DOMAIN, Domain, Hypervisor
from backupninja_kvm.journal import DISK_MERGED, DiskEntry, Journal
from backupninja_kvm.merge import (
    commit_and_pivot,
    commit_offline,
    delete_overlay,
    describe_error,
    image_info,
    left_on_overlay,
    overlays_in_use,
    record_finished_pulls,
    wait_for_pull,
    wait_ready_and_pivot,
)
from backupninja_kvm.quiesce import thaw_left_frozen
from backupninja_kvm.report import log

# Step kinds
PIVOT = "pivot"  # an active commit job exists: wait until ready, pivot
WAIT_PULL = "wait-pull"  # a pull job runs: let it finish, the overlay becomes the disk
COMMIT = "commit"  # running on the overlay: active shallow commit, then pivot
COMMIT_OFFLINE = "commit-offline"  # shut off on the overlay: qemu-img commit, fix the XML
DELETE = "delete"  # the overlay file exists and nothing references it
REFUSE = "refuse"  # unexpected: touch nothing, say what was found


@dataclass(frozen=True)
class DiskState:
    """What one disk looks like now."""

    target: str
    active: bool
    live_top: str | None  # None when the domain is shut off
    live_backing: str | None
    job: str | None  # active-commit, commit, pull, copy... or None
    persistent_top: str | None  # None for a transient domain
    overlay_exists: bool
    overlay_backing: str | None = None  # the overlay file's own backing file


@dataclass(frozen=True)
class Step:
    kind: str
    target: str
    detail: str = ""


def decide(entry: DiskEntry, state: DiskState, merge: str = "commit") -> list[Step]:
    """The steps that bring one disk back onto its base, in order.

    Only the overlay the journal names is ever merged, and only into the base
    it recorded before the freeze: any other chain is refused, untouched.
    """
    target, base, overlay = entry.target, entry.base, entry.overlay
    tops = {state.live_top, state.persistent_top} - {None}
    if state.job is not None:
        if state.job == "active-commit" and state.live_top == overlay:
            if state.live_backing != base:
                return [
                    Step(
                        REFUSE,
                        target,
                        f"a commit of {overlay} runs into {state.live_backing}, "
                        f"not into {base} as the journal says",
                    )
                ]
            return [Step(PIVOT, target), Step(DELETE, target)]
        if state.job == "pull" and state.live_top == overlay:
            return [Step(WAIT_PULL, target)]
        return [Step(REFUSE, target, f"a {state.job} block job runs on {state.live_top}, not ours")]
    if state.active and state.live_top == overlay:
        if state.live_backing == base:
            return [Step(COMMIT, target), Step(DELETE, target)]
        if merge == "pull" and state.live_backing == entry.base_backing:
            return []  # a finished pull: the overlay is the disk now, on the base's own backing
        return [
            Step(
                REFUSE,
                target,
                f"{overlay} is on top but its backing file is {state.live_backing}, "
                f"not {base} as the journal says",
            )
        ]
    if state.active and state.live_top not in (base, overlay):
        if state.live_backing == overlay:
            return [Step(REFUSE, target, f"a foreign layer {state.live_top} sits on our overlay")]
        if overlay in tops:
            return [Step(REFUSE, target, f"the chain shows {state.live_top} on top")]
    if not state.active and state.persistent_top == overlay:
        if not state.overlay_exists:
            return [Step(REFUSE, target, f"the definition uses {overlay}, which is missing")]
        if state.overlay_backing == base:
            return [Step(COMMIT_OFFLINE, target), Step(DELETE, target)]
        if merge == "pull" and state.overlay_backing == entry.base_backing:
            return []  # a finished pull: the overlay is the disk now, on the base's own backing
        return [
            Step(
                REFUSE,
                target,
                f"{overlay} has the backing file {state.overlay_backing}, not {base}",
            )
        ]
    if state.overlay_exists and overlay not in tops and state.live_backing != overlay:
        return [Step(DELETE, target)]
    return []


def observe(domain: Domain, entry: DiskEntry) -> DiskState:
    active = domain.is_active()
    live = {d.target: d for d in parse_disks(domain.xml())} if active else {}
    persistent_top = None
    if domain.is_persistent():
        persistent = {d.target: d for d in parse_disks(domain.xml(inactive=True))}
        if entry.target in persistent:
            persistent_top = persistent[entry.target].path
    disk = live.get(entry.target)
    job = domain.block_job(entry.target) if active and disk is not None else None
    return DiskState(
        target=entry.target,
        active=active,
        live_top=disk.path if disk else None,
        live_backing=disk.backing if disk else None,
        job=job.kind if job else None,
        persistent_top=persistent_top,
        overlay_exists=os.path.lexists(entry.overlay),
        overlay_backing=image_info(entry.overlay).get("full-backing-filename")
        if not active and os.path.exists(entry.overlay)
        else None,
    )


def recover_domain(
    domain: Domain, timeout: int = 600, bandwidth: int = 0, interrupted: bool = True
) -> list[str]:
    """Repair a domain left by an interrupted backup; returns what was done.

    Raises OverlayLeftError when the domain still runs on an overlay of ours
    that recovery may not touch. Only what a journal names is touched: without
    a journal there is nothing of ours (a disk named like our overlay, such as
    the one a finished ``merge = pull`` leaves, is the domain's own disk).
    """
    journal = journals.read(domain.uuid)
    if journal is None:
        return []
    done: list[str] = take_down_view(journal)
    if journal.quiesce and domain.is_active():
        done += thaw_left_frozen(domain)
    refusals: list[str] = []
    for entry in journal.disks:
        steps = decide(entry, observe(domain, entry), journal.merge)
        # An overlay that no chain uses any more, of a disk whose merge was
        # not verified: either merged (by its commit, or by hand), or the
        # domain came back on its own image and the guest's writes since the
        # freeze exist only there. Decided per disk, from what the journal
        # says of that disk, whatever the phase (a backup that saw its domain
        # vanish leaves "merging").
        merge_unverified = journal.phase != journals.MERGED and entry.state != journals.DISK_MERGED
        if merge_unverified and [step.kind for step in steps] == [DELETE]:
            unmerged = unmerged_writes(entry)
            if unmerged:
                refusals.append(f"{entry.target}: {unmerged}")
                continue
        for step in steps:
            if step.kind == REFUSE:
                refusals.append(f"{entry.target}: {step.detail}")
                break
            done.append(_carry_out(domain, entry, step, timeout, bandwidth))
    if refusals:
        raise OverlayLeftError(
            f"{domain.name}: recovery touched nothing on "
            + "; ".join(refusals)
            + f" (journal {journals.journal_path(domain.uuid)}); check `virsh domblklist "
            f"{domain.name}` and merge by hand"
        )
    if journal.merge == "pull":
        done += record_finished_pulls(domain, journal)
    journals.remove(domain.uuid)
    if interrupted:
        done += remove_partial(journal)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(journal.started))
        done.append(
            f"closed the journal of the backup interrupted in phase {journal.phase} "
            f"(pid {journal.pid}, started {started})"
        )
    return done


def recover_before_backup(domain: Domain, settings: Settings) -> None:
    """Repair what an interrupted earlier run left, before anything else.

    The repair is a merge: a signal waits until it is done (or has failed).
    Raises DomainError when the domain runs on its own images but was not
    repaired, OverlayLeftError (with the state found) when it may not.
    """
    try:
        with interrupts.critical():
            repaired = recover_domain(domain, settings.merge_timeout, settings.bandwidth)
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
    why = describe_error(error)
    journal = journals.journal_path(domain.uuid)
    in_use = overlays_in_use(domain)
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


def _carry_out(domain: Domain, entry: DiskEntry, step: Step, timeout: int, bandwidth: int) -> str:
    target, overlay = entry.target, entry.overlay
    if step.kind == COMMIT:
        commit_and_pivot(domain, target, overlay, timeout, bandwidth)
        return f"{target}: committed {overlay} and pivoted back to {entry.base}"
    if step.kind == PIVOT:
        wait_ready_and_pivot(domain, target, overlay, timeout, bandwidth)
        return f"{target}: pivoted the pending commit back to {entry.base}"
    if step.kind == WAIT_PULL:
        if not wait_for_pull(domain, target, timeout):
            raise left_on_overlay(domain, target, overlay, f"pull not done within {timeout} s")
        return f"{target}: let the pull finish; the disk now runs on {overlay}"
    if step.kind == COMMIT_OFFLINE:
        commit_offline(domain, entry)
        return f"{target}: committed {overlay} into {entry.base} offline (domain shut off)"
    if step.kind == DELETE:
        delete_overlay(domain, target, overlay)
        return f"{target}: deleted {overlay}"
    raise AssertionError(step)


def take_down_view(journal: Journal, wait: float = 10.0) -> list[str]:
    """Before any merge of a stage = freeze journal: take its domain's view
    down, so that no ship reads a live image through it afterwards."""
    if not journal.view:
        return []
    from backupninja_kvm import view

    try:
        result = view.take_down(journal.view, journal.domain, wait=wait)
    except view.ViewError as error:
        raise DomainError(f"{journal.domain}: {error}; nothing merged") from None
    done = [forced.describe() + ": a copy it makes may be torn" for forced in result.forced]
    if result.unmounted or result.removed:
        done.append(f"took down its view {os.path.join(journal.view, journal.domain)}")
    return done


def remove_partial(journal: Journal) -> list[str]:
    """Remove the incomplete set that the interrupted backup of *journal*
    was writing; returns what was done. Call only with the domain's lock
    held and the backup that wrote it gone (never during a backup)."""
    path = journal.partial
    if not path or not path.endswith(".partial"):
        return []
    if journal.partial_host:
        return [
            f"the incomplete set {journal.partial_host}:{path} is left on the remote "
            f"destination; the next backup removes it"
        ]
    if os.path.islink(path) or not os.path.isdir(path):
        return []
    shutil.rmtree(path)
    return [f"removed the incomplete set {path}"]


def vanished_journals(hypervisor: Hypervisor) -> tuple[list[Journal], list[str]]:
    """Journals of domains that no longer exist (a transient domain destroyed
    during its backup), and the problems of unreadable ones (uuid: error)."""
    known = {summary.uuid for summary in hypervisor.list_domains()}
    found, problems = [], []
    for uuid in journals.all_journals():
        if uuid in known:
            continue
        try:
            journal = journals.read(uuid)
        except journals.JournalError as error:
            problems.append(f"{uuid}: {error}")
            continue
        if journal is not None:
            found.append(journal)
    return found, problems


def recover_vanished(hypervisor: Hypervisor, journal: Journal) -> list[str]:
    """Merge offline what the backup of a domain that no longer exists left:
    commit each overlay (``qemu-img commit``) into the base its journal
    names, delete it, then the incomplete set and the journal. Returns what
    was done.

    Touches nothing of a disk, and keeps the journal, when the overlay's
    backing file is not the recorded base, or when a running domain, or any
    other process (QEMU's image locks), uses the base or the overlay; raises
    OverlayLeftError saying so after handling the other disks.
    """
    name = journal.domain
    summaries = hypervisor.list_domains()
    if any(summary.uuid == journal.uuid for summary in summaries):
        raise OverlayLeftError(
            f"{name}: the domain with UUID {journal.uuid} exists again; nothing done: "
            f"run `backupninja-kvm recover {name}` again"
        )
    running: set[str] = set()  # files any running domain's chain uses
    defined: set[str] = set()  # files any persistent definition names
    for summary in summaries:
        try:
            other = hypervisor.domain(summary.name)
            if summary.active:
                running |= referenced_paths(other.xml())
            if summary.persistent:
                defined |= referenced_paths(other.xml(inactive=True))
        except HypervisorError as error:
            if error.code != ERR_NO_DOMAIN:
                raise
    done: list[str] = take_down_view(journal)
    refusals: list[str] = []
    for entry in journal.disks:
        try:
            done += _merge_vanished_disk(entry, journal.merge, running, defined)
        except _Refused as refusal:
            refusals.append(f"{entry.target}: {refusal}")
    path = journals.journal_path(journal.uuid)
    if refusals:
        raise OverlayLeftError(
            f"{name} (no longer exists): recovery touched nothing on "
            + "; ".join(refusals)
            + f" (journal {path}); once nothing uses them, run `backupninja-kvm recover "
            f"{journal.uuid}` again, or by hand `qemu-img commit OVERLAY` (it writes into "
            f"its backing file), then delete the overlay and the journal"
        )
    done += remove_partial(journal)
    journals.remove(journal.uuid)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(journal.started))
    done.append(
        f"closed the journal of the backup interrupted in phase {journal.phase} "
        f"(pid {journal.pid}, started {started}); the domain no longer exists"
    )
    return done


class _Refused(Exception):
    """A disk of a vanished domain that recovery may not touch: why."""


def _merge_vanished_disk(
    entry: DiskEntry, merge: str, running: set[str], defined: set[str]
) -> list[str]:
    target, base, overlay = entry.target, entry.base, entry.overlay
    if not os.path.lexists(overlay):
        return []  # deleted after its merge, or never made
    for path in (base, overlay):
        if path in running:
            raise _Refused(f"{path} is in use by a running domain")
    if overlay in defined:
        raise _Refused(f"{overlay} is named by a domain's definition")
    info, problem = _locked_info(overlay)
    if problem:
        raise _Refused(problem)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if merge == "commit" and entry.state == DISK_MERGED:
        # Pivoted back before the domain went away: the base holds every write.
        os.unlink(overlay)
        return [f"{target}: deleted {overlay} (merged before the domain went away)"]
    if merge == "pull" and backing is None:
        raise _Refused(
            f"{overlay} has no backing file any more (a finished pull: it is the disk's "
            f"image now, and {base} is stale)"
        )
    if backing != base:
        raise _Refused(f"{overlay} has the backing file {backing}, not {base} as the journal says")
    _info, problem = _locked_info(base)
    if problem:
        raise _Refused(problem)
    result = subprocess.run(
        ["qemu-img", "commit", "-q", "-f", "qcow2", overlay], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise _Refused(f"qemu-img commit of {overlay} failed: {result.stderr.strip()}")
    os.unlink(overlay)
    return [f"{target}: committed {overlay} into {base} offline (the domain no longer exists)"]


def _locked_info(path: str) -> tuple[dict, str]:
    """``qemu-img info`` taking QEMU's image lock, which fails while a
    process (a VM) has the image open for writing; returns (info, problem)."""
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", path], capture_output=True, text=True
    )
    if result.returncode != 0:
        return {}, f"{path}: {result.stderr.strip() or 'qemu-img info failed'}"
    try:
        return json.loads(result.stdout), ""
    except ValueError:
        return {}, f"{path}: qemu-img info gave no JSON"


def unmerged_writes(entry: DiskEntry) -> str:
    """Why the overlay of *entry* may not simply be deleted, "" when it may.

    A backup interrupted before its merge, whose domain no longer uses the
    overlay: either the overlay was merged by hand, or the domain was created
    again on its own image (a transient domain destroyed and re-created from
    its definition), and the guest's writes since the freeze exist only in
    the overlay. Only when the overlay shows the same bytes as its base were
    they merged.
    """
    overlay, base = entry.overlay, entry.base
    base_format = entry.base_format if entry.base_format != "unknown" else "raw"
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", base_format, overlay, base],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return ""
    why = (
        "holds writes made after the freeze that are not in"
        if result.returncode == 1
        else f"cannot be compared ({result.stderr.strip()}) with"
    )
    return (
        f"{overlay} was never merged and {why} {base}, which the domain runs on again "
        f"(created again from a definition naming its own image?); merging it now would mix "
        f"two histories, so it is kept: copy it if those writes matter (`qemu-img convert -U "
        f"-O qcow2 {overlay} COPY` gives the disk as of the interruption), then delete it "
        f"and run `backupninja-kvm recover` again"
    )
