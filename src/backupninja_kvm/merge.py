"""Merge: bring each overlay back into its disk (an active shallow commit and
a pivot, a pull, or qemu-img offline), verify the chains, delete the overlays,
keep the record of the images our pulls made. Used by the backup and by
recovery alike; nothing here decides what an interrupted run left."""

from __future__ import annotations

import json
import os
import subprocess
import time
from functools import partial
from typing import Protocol

from backupninja_kvm import faults
from backupninja_kvm import journal as journals
from backupninja_kvm.disks import Disk, parse_disks, referenced_paths, top_paths, with_disk_source
from backupninja_kvm.errors import HypervisorError, OverlayLeftError
from backupninja_kvm.hypervisor import ERR_BLOCK_COPY_ACTIVE, ERR_NO_DOMAIN, Domain, wait_until
from backupninja_kvm.journal import DiskEntry, Journal
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.progress import Progress
from backupninja_kvm.report import log
from backupninja_kvm.transfer import is_block_device


class MergeOptions(Protocol):
    """How to merge: an action file's Settings, or what a freeze recorded."""

    @property
    def merge(self) -> str: ...  # commit or pull

    @property
    def merge_timeout(self) -> int: ...

    @property
    def bandwidth(self) -> int: ...


def merge_by_commit(
    domain: Domain,
    disks: list[Disk],
    overlays: dict[str, str],
    settings: MergeOptions,
    journal: journals.Journal,
) -> float:
    # One journal write before the jobs start and one after every pivot
    # (each an fsync, the disks not pivoted yet still on their overlays): a
    # repair then knows which disks were merged, and deletes their overlays
    # without having to prove it by comparing the images.
    check_frozen_chains(domain, journal)
    for target in overlays:
        journal = journal.with_disk(target, journals.DISK_MERGING)
    journals.write(journal)
    bandwidths = {}  # what each commit runs with: a refused value is not tried again
    for target, overlay in overlays.items():
        bandwidths[target] = start_commit(domain, target, overlay, settings.bandwidth)
    faults.checkpoint("mid-merge")
    for target, overlay in overlays.items():
        wait_ready_and_pivot(domain, target, overlay, settings.merge_timeout, bandwidths[target])
        journal = journal.with_disk(target, journals.DISK_MERGED)
        journals.write(journal)
    faults.checkpoint("after-pivot")
    verify_tops(domain, journal, {e.target: e.base for e in journal.disks})
    back_on_images = time.monotonic()
    journals.write(journal.at(journals.MERGED))
    faults.checkpoint("before-delete")
    for target, overlay in overlays.items():
        try:
            delete_overlay(domain, target, overlay)
        except OSError as error:
            log.warning(
                "%s: %s: merged, but the overlay %s could not be deleted: %s",
                domain.name,
                target,
                overlay,
                error.strerror,
            )
    return back_on_images


def check_frozen_chains(domain: Domain, journal: journals.Journal) -> None:
    """Before merging: each of our overlays still sits on the base the
    journal recorded, so that a shallow commit writes into that base only and
    a pull copies that base only."""
    live = {d.target: d for d in parse_disks(domain.xml())}
    for entry in journal.disks:
        disk = live.get(entry.target)
        if disk is not None and disk.path == entry.overlay and disk.backing != entry.base:
            raise left_on_overlay(
                domain,
                entry.target,
                entry.overlay,
                f"its backing file is now {disk.backing}, not {entry.base} as recorded before "
                f"the freeze; nothing was merged",
            )


def merge_by_pull(
    domain: Domain,
    disks: list[Disk],
    overlays: dict[str, str],
    settings: MergeOptions,
    journal: journals.Journal,
) -> None:
    check_frozen_chains(domain, journal)
    # One disk after the other: QEMU 7.2 was seen to crash with two pulls at once.
    for disk in disks:
        overlay = overlays[disk.target]
        try:
            # Pull only the layer we froze; a template below it stays shared.
            domain.start_pull(disk.target, disk.backing, settings.bandwidth)
        except HypervisorError as error:
            raise left_on_overlay(domain, disk.target, overlay, f"pull refused: {error}") from None
        faults.checkpoint("mid-merge")
        if not wait_for_pull(domain, disk.target, settings.merge_timeout):
            raise left_on_overlay(
                domain, disk.target, overlay, f"pull not done within {settings.merge_timeout} s"
            )
    faults.checkpoint("after-pivot")
    # After a pull the overlay *is* the disk, on the frozen image's own
    # backing file (a template) if it had one; the frozen image is unused.
    verify_tops(domain, journal, overlays)
    live = domain.xml()
    for disk in disks:
        if disk.path in referenced_paths(live):
            raise left_on_overlay(
                domain, disk.target, overlays[disk.target], "the pull did not detach the image"
            )
    record = update_pull_record(domain, {d.path for d in disks if d.path}, set(overlays.values()))
    for disk in disks:
        if disk.path in record.made:
            log.info(
                "%s: %s now runs on %s (merge = pull); %s, made by the pull of an earlier "
                "backup, is deleted once the set is complete",
                domain.name,
                disk.target,
                overlays[disk.target],
                disk.path,
            )
        else:
            log.warning(
                "%s: %s now runs on %s (merge = pull); %s is no longer used; kept, delete it "
                "once checked",
                domain.name,
                disk.target,
                overlays[disk.target],
                disk.path,
            )
    faults.checkpoint("before-delete")


def verify_tops(domain: Domain, journal: journals.Journal, expected: dict[str, str]) -> None:
    """After the merge: the live XML shows the *expected* image on top of each
    disk, with the base's own backing file below it after a pull, and no
    mirror; the persistent XML too, for the disks it defined on their base
    before the freeze (a disk hot-plugged live only, a pending `--config`
    change or an edited definition is not ours to check).
    """
    live = {d.target: d for d in parse_disks(domain.xml())}
    persistent = (
        {d.target: d for d in parse_disks(domain.xml(inactive=True))}
        if domain.is_persistent()
        else {}
    )
    for entry in journal.disks:
        want = expected[entry.target]
        disk = live.get(entry.target)
        if disk is not None and (disk.mirror or (disk.path == entry.overlay != want)):
            raise left_on_overlay(
                domain,
                entry.target,
                entry.overlay,
                "a block job is still attached" if disk.mirror else "the merge did not pivot",
            )
        if disk is None or disk.path != want:
            # Neither merged nor on our overlay: someone else changed the disk.
            shown = f"runs on {disk.path}" if disk else "is gone from the live definition"
            raise OverlayLeftError(
                f"{domain.name}: after the merge, disk {entry.target} {shown}, not on {want}; "
                f"{entry.overlay} is kept; check `virsh domblklist {domain.name}` and delete "
                f"{entry.overlay} once nothing uses it (journal "
                f"{journals.journal_path(domain.uuid)})"
            )
        if want == entry.overlay and disk.backing != entry.base_backing:
            raise left_on_overlay(
                domain,
                entry.target,
                entry.overlay,
                f"after the pull its backing file is {disk.backing}, not {entry.base_backing}",
            )
        if entry.persistent_base != entry.base or not persistent:
            continue
        defined = persistent.get(entry.target)
        if defined is None or defined.path != want:
            named = defined.path if defined else "no such disk"
            raise OverlayLeftError(
                f"{domain.name}: disk {entry.target} runs on {want} now, but its persistent "
                f"definition shows {named} instead (it showed {entry.base} before the backup): "
                f"it would boot from there; {entry.overlay} is kept; check `virsh dumpxml "
                f"--inactive {domain.name}`, fix it with `virsh edit {domain.name}`, then "
                f"delete {entry.overlay} if nothing uses it"
            )


def resume_if_paused_by_io_error(
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


def merge_failed(domain: Domain, overlays: dict[str, str], error: Exception) -> OverlayLeftError:
    """The error for a merge that failed with *error* (a HypervisorError, or
    anything else escaping from libvirt-python or a bug), naming the state."""
    name = domain.name
    journal = journals.journal_path(domain.uuid)
    files = ", ".join(overlays.values())
    text = f"{name}: the merge of {', '.join(overlays)} failed ({describe_error(error)}); "
    if isinstance(error, HypervisorError) and error.code == ERR_NO_DOMAIN:
        return OverlayLeftError(
            text + f"the domain no longer exists (destroyed during the backup?): the guest's "
            f"last writes are only in the overlays {files}; do not delete them and do not "
            f"start the domain again before they are merged: run `backupninja-kvm recover "
            f"{name}`, which commits them offline into the images named in the journal {journal}"
        )
    in_use = overlays_in_use(domain)
    if in_use:
        state = f"the domain still runs on the overlay(s) {', '.join(in_use)}"
    elif in_use == []:
        state = f"the domain shows its own images on top, but the merge was not verified ({files})"
    else:
        state = f"the domain may still use the overlays {files}"
    return OverlayLeftError(
        text + f"{state}; nothing is lost, do not delete them: run "
        f"`backupninja-kvm recover {name}` (journal {journal})"
    )


def describe_error(error: Exception) -> str:
    if isinstance(error, HypervisorError | OSError | journals.JournalError):
        return str(error)
    return f"{type(error).__name__}: {error}"  # not ours: name it, it is a bug


def left_on_overlay(domain: Domain, target: str, overlay: str, why: str) -> OverlayLeftError:
    hint = ""
    if "Permission denied" in why:
        # libvirt 9.0 may regenerate a running VM's AppArmor profile with a
        # deny-write rule for its backing files, so the commit cannot write.
        hint = (
            " (on an AppArmor host, the VM's profile may deny writing its own image now "
            "that it is a backing file: check `dmesg | grep apparmor` and the profile in "
            "/etc/apparmor.d/libvirt/, keep overlaydir empty)"
        )
    return OverlayLeftError(
        f"{domain.name}: disk {target} is still running on the overlay {overlay} ({why}){hint}; "
        f"nothing is lost, but the overlay grows until merged: run "
        f"`backupninja-kvm recover {domain.name}`, or by hand `virsh blockcommit "
        f"{domain.name} {target} --active --shallow --pivot --wait`, then delete {overlay}"
    )


def start_commit(domain: Domain, target: str, overlay: str, bandwidth: int) -> int:
    """Start the active commit of *target*; returns the bandwidth it runs with.

    A commit refused with the configured bandwidth (libvirt's own limit, or
    libvirt-python's OverflowError for a value beyond a C long) is started
    once more without a limit, with a warning: a bad value must never keep
    a VM on its overlay.
    """
    try:
        domain.start_commit(target, bandwidth)
        return bandwidth
    except (HypervisorError, OverflowError) as error:
        if not bandwidth:
            raise left_on_overlay(domain, target, overlay, f"commit refused: {error}") from None
        refusal = str(error) if isinstance(error, HypervisorError) else repr(error)
    log.warning(
        "%s: %s: the commit with bandwidth = %s MiB/s was refused (%s); committing "
        "without a bandwidth limit instead",
        domain.name,
        target,
        bandwidth,
        refusal,
    )
    try:
        domain.start_commit(target, 0)
    except HypervisorError as error:
        raise left_on_overlay(domain, target, overlay, f"commit refused: {error}") from None
    return 0


def commit_and_pivot(
    domain: Domain, target: str, overlay: str, timeout: int, bandwidth: int
) -> None:
    bandwidth = start_commit(domain, target, overlay, bandwidth)
    wait_ready_and_pivot(domain, target, overlay, timeout, bandwidth)


def wait_ready_and_pivot(
    domain: Domain, target: str, overlay: str, timeout: int, bandwidth: int
) -> None:
    """Wait for the active commit on *target* to be ready, then pivot.

    A job not ready in time is aborted and started once more; a pivot refused
    as not ready yet is retried after waiting again.
    """
    for attempt in (1, 2):
        progress = Progress(f"{domain.name}: {target}: commit", 0)
        ready = wait_until(
            partial(_commit_ready, domain, target, progress), timeout, wake=domain.job_changed
        )
        progress.finish()
        if not ready:
            log.warning(
                "%s: %s: commit not ready after %d s (attempt %d)",
                domain.name,
                target,
                timeout,
                attempt,
            )
            try:
                domain.abort_job(target)
                wait_until(partial(domain.job_finished, target), 30, wake=domain.job_changed)
                if attempt == 1:
                    bandwidth = start_commit(domain, target, overlay, bandwidth)
                    continue
            except HypervisorError as error:
                raise left_on_overlay(domain, target, overlay, str(error)) from None
            raise left_on_overlay(domain, target, overlay, f"commit not ready within {timeout} s")
        try:
            domain.pivot(target)
        except HypervisorError as error:
            if error.code == ERR_BLOCK_COPY_ACTIVE and attempt == 1:
                continue
            raise left_on_overlay(domain, target, overlay, f"pivot failed: {error}") from None
        if not wait_until(partial(domain.job_finished, target), 30, wake=domain.job_changed):
            raise left_on_overlay(domain, target, overlay, "job still present after pivot")
        return


def _commit_ready(domain: Domain, target: str, progress: Progress) -> bool:
    job = domain.block_job(target)
    if job is not None:
        progress.total = max(job.end, 1)
        progress.update(job.current)
    return domain.mirror_ready(target)


def wait_for_pull(domain: Domain, target: str, timeout: int) -> bool:
    """Wait until the pull on *target* is done; False after *timeout* s."""
    progress = Progress(f"{domain.name}: {target}: pull", 0)

    def finished() -> bool:
        job = domain.block_job(target)
        if job is None:
            return True
        progress.total = max(job.end, 1)
        progress.update(job.current)
        return False

    done = wait_until(finished, timeout, wake=domain.job_changed)
    progress.finish()
    return done


def commit_offline(domain: Domain, entry: DiskEntry) -> None:
    """Merge the overlay of a shut-off domain into its base and point the
    definition back at the base."""
    result = subprocess.run(
        # The base named explicitly: only into the image the journal recorded.
        ["qemu-img", "commit", "-q", "-f", "qcow2", "-b", entry.base, entry.overlay],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise left_on_overlay(
            domain, entry.target, entry.overlay, f"qemu-img commit failed: {result.stderr.strip()}"
        )
    base_format = entry.base_format
    if base_format == "unknown":
        base_format = image_info(entry.base).get("format", "raw")
    xml = with_disk_source(
        domain.xml(inactive=True),
        entry.target,
        entry.base,
        base_format,
        block=is_block_device(entry.base),
    )
    domain.redefine(xml)


def image_info(path: str) -> dict:
    """``qemu-img info`` of one image (no lock taken), {} when it cannot tell."""
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True
    )
    try:
        return json.loads(result.stdout) if result.returncode == 0 else {}
    except ValueError:
        return {}


def chain_references(domain: Domain) -> set[str]:
    """Every file a chain of the domain refers to: the live and the persistent
    XML, and the backing chain of each top image as qemu-img reads it (a
    definition of a shut-off domain does not describe its backing files)."""
    xmls = [domain.xml()] if domain.is_active() else []
    if domain.is_persistent():
        xmls.append(domain.xml(inactive=True))
    referenced: set[str] = set()
    for xml in xmls:
        referenced |= referenced_paths(xml)
        for disk in parse_disks(xml):
            if disk.path and disk.source_type == "file":
                referenced |= backing_chain(disk.path)
    return referenced


def backing_chain(path: str) -> set[str]:
    """The files of *path*'s backing chain (``qemu-img info --backing-chain``)."""
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
        capture_output=True,
        text=True,
    )
    try:
        layers = json.loads(result.stdout) if result.returncode == 0 else []
    except ValueError:
        return set()
    files: set[str] = set()
    for layer in layers if isinstance(layers, list) else []:
        for key in ("filename", "full-backing-filename"):
            if isinstance(layer.get(key), str):
                files.add(layer[key])
    return files


def delete_overlay(domain: Domain, target: str, overlay: str) -> None:
    """Delete an overlay file, only when no chain (live or persistent XML,
    backing chains) refers to it."""
    if overlay in chain_references(domain):
        raise left_on_overlay(domain, target, overlay, "a chain still references it")
    try:
        os.unlink(overlay)
    except FileNotFoundError:
        pass


def overlays_in_use(domain: Domain) -> list[str] | None:
    """The overlays of ours that the domain's live or persistent XML still
    shows: those named in its journal (without one, none is ours). None
    when that cannot be read."""
    try:
        journal = journals.read(domain.uuid)
        xmls = [domain.xml()] if domain.is_active() else []
        if domain.is_persistent():
            xmls.append(domain.xml(inactive=True))
    except (HypervisorError, journals.JournalError):
        return None
    found: set[str] = set()
    if journal is None:
        return []  # only a journal makes a layer ours
    for xml in xmls:
        found |= referenced_paths(xml) & {d.overlay for d in journal.disks}
    return sorted(found)


def delete_superseded_pulls(domain: Domain) -> None:
    """Delete the images our pulls made that a later pull superseded, once
    no chain uses them; call when the set is complete (it holds what they
    held).

    Only an image recorded as made by our pull is deleted: the
    administrator's own image, even with a tagged name, never is.
    """
    try:
        record = journals.read_pulled(domain.uuid)
    except journals.JournalError as error:
        log.warning("%s: %s; no superseded image deleted", domain.name, error)
        return
    if not record.superseded:
        return
    try:
        referenced = chain_references(domain)
    except HypervisorError as error:
        log.warning(
            "%s: cannot read its chains (%s); no superseded image deleted", domain.name, error
        )
        return
    kept = set()
    for image in sorted(record.superseded):
        if image in referenced:
            kept.add(image)
            continue
        try:
            os.unlink(image)
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning(
                "%s: could not delete %s, an image superseded by merge = pull: %s",
                domain.name,
                image,
                error.strerror,
            )
            kept.add(image)
            continue
        log.info("%s: deleted %s, superseded by the pull (merge = pull)", domain.name, image)
    journals.write_pulled(domain.uuid, journals.Pulled(record.made, frozenset(kept)))


def update_pull_record(domain: Domain, frozen: set[str], overlays: set[str]) -> journals.Pulled:
    """Record that pulls moved *domain*'s disks off the *frozen* images onto
    the *overlays*; returns the record as it was before (which tells whether
    a frozen image was made by an earlier pull). When it cannot be read or written,
    a Warning, and an empty record: without it nothing is ever deleted (the
    images pile up, but nothing of the administrator's is taken for ours)."""
    try:
        record = journals.read_pulled(domain.uuid)
        journals.write_pulled(domain.uuid, record.after_pull(frozen, overlays))
        return record
    except (journals.JournalError, OSError) as error:
        log.warning(
            "%s: cannot update the record of the images our pulls made (%s); none of them "
            "will be deleted",
            domain.name,
            error,
        )
        return journals.Pulled()


def record_finished_pulls(domain: Domain, journal: Journal) -> list[str]:
    """An overlay that a pull made the disk is ours for good: record it, so
    that the pull of a later night may delete it once superseded; say what
    became of the image it left."""
    tops: set[str | None] = set()
    if domain.is_active():
        tops |= set(top_paths(domain.xml()).values())
    if domain.is_persistent():
        tops |= set(top_paths(domain.xml(inactive=True)).values())
    pulled = [entry for entry in journal.disks if entry.overlay in tops]
    if not pulled:
        return []
    record = update_pull_record(
        domain, {entry.base for entry in pulled}, {entry.overlay for entry in pulled}
    )
    return [
        f"{entry.target}: the pull had finished, the disk runs on {entry.overlay}; "
        + (
            f"{entry.base}, made by an earlier pull, is deleted after the next complete set"
            if entry.base in record.made
            else f"{entry.base} is no longer used; kept, delete it once checked"
        )
        for entry in pulled
    ]
