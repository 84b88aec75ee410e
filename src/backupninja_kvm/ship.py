"""Ship: copy the definition and every file of the plan into the set, while
the domain runs on its overlays (or, shut off, checked unchanged)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from backupninja_kvm import destination, faults, machine, preflight, setinfo
from backupninja_kvm.errors import DomainError, TransferError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import Plan, SetFile
from backupninja_kvm.progress import Board, Progress
from backupninja_kvm.report import human_bytes, log, seconds


def write_definition(domain: Domain, backup_set: destination.AnySet) -> None:
    """Save the definition a restore needs, console passwords included (the
    set is 0700, the file 0600). libvirt secrets (LUKS keys) are not in it."""
    persistent = domain.is_persistent()
    xml = domain.xml(inactive=persistent, secure=True)
    backup_set.write_file("domain.xml", xml)


def write_set_info(
    domain: Domain,
    plan: Plan,
    backup_set: destination.AnySet,
    outcome: Outcome,
    tracking: dict[str, setinfo.Tracking] | None = None,
) -> None:
    """Write set.json: which file is which disk or layer, where each was,
    its format and size, the freeze instant and its consistency; with
    changed blocks, how each disk's image was made (*tracking*, by name)."""
    tracking = tracking or {}
    if not outcome.live:
        consistency = "shut-off"
    else:
        consistency = "quiesced" if outcome.quiesced is not None else "crash-consistent"
    info = setinfo.SetInfo(
        plan.name,
        domain.uuid,
        setinfo.utc_text(outcome.freeze_time or time.time()),
        consistency,
        tuple(
            setinfo.SetImage(
                f.name,
                f.target,
                f.role,
                f.source,
                f.format,
                f.virtual_size,
                f.backing,
                f.data_file,
                tracking.get(f.name),
            )
            for f in [*plan.files, *plan.state]
        ),
    )
    try:
        backup_set.write_file(setinfo.SET_INFO, info.to_json())
    except (OSError, TransferError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise DomainError(
            f"{plan.name}: cannot write {setinfo.SET_INFO} into {backup_set.partial_path}: "
            f"{reason}; no set made, the domain runs on its own images"
        ) from None


class _CopyStopped(Exception):
    """Another disk's copy failed, or we were interrupted: stop this one."""


def copy_disks(
    plan: Plan, backup_set: destination.AnySet, outcome: Outcome, skip: set[str] | None = None
) -> None:
    """Copy every file of the plan (each disk's top, its own backing layers,
    data files) into the set, side by side; but those named in *skip*
    (made from changed blocks).

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

    files = [f for f in plan.files if f.name not in (skip or set())]
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
    outcome.copied.update(copied)
    outcome.remote = isinstance(backup_set, destination.RemoteBackupSet)
    outcome.copy_seconds = time.monotonic() - started


def copy_state(plan: Plan, backup_set: destination.AnySet, outcome: Outcome) -> None:
    """Copy the machine's state besides its disks (``plan.state``: NVRAM,
    TPM, boot files) into the set, through the set's ``copy_image`` as the
    images go; each file's size is recorded in the plan for set.json.

    Called right after the freeze, before the disks' copy: these files are
    not part of the disk-only snapshot (libvirt cannot take them with it),
    so the closest the hypervisor allows is a copy a few milliseconds after
    it. The variable store is one that QEMU writes in place (pflash) when
    the guest sets a variable, and swtpm replaces its state file by a
    rename: each copy is whole and as of its own instant, which a guest
    sees like a power cut then (OVMF's variable store is written to survive
    one; a TPM's volatile state, its PCRs and sessions, is lost as at a
    power cut). Raises OSError or TransferError, as a disk's copy does.
    """
    started = time.monotonic()
    copied = []
    for item in plan.state:
        if item.role == machine.TPM:
            with tempfile.TemporaryDirectory(prefix="bnkvm-tpm-") as folder:
                packed = os.path.join(folder, item.name)
                machine.pack_tpm(item.source, packed)
                size = os.path.getsize(packed)
                sent = backup_set.copy_image(packed, item.name, lambda _done: None)
        else:
            size = os.path.getsize(item.source)
            sent = backup_set.copy_image(item.source, item.name, lambda _done: None)
        outcome.bytes_copied += sent
        copied.append(dataclasses.replace(item, virtual_size=size))
        log.debug("%s: copied its %s %s (%s)", plan.name, item.role, item.source, human_bytes(size))
    plan.state = copied
    if copied:
        log.info(
            "%s: machine state copied (%s) in %s",
            plan.name,
            ", ".join(f.role for f in copied),
            seconds(time.monotonic() - started),
        )


def copy_shut_off(
    domain: Domain, plan: Plan, backup_set: destination.AnySet, outcome: Outcome
) -> None:
    """Copy the images of a shut-off domain: nothing writes them, unless it starts."""
    before = {f.name: _signature(f.source) for f in plan.files}
    try:
        copy_state(plan, backup_set, outcome)
        copy_disks(plan, backup_set, outcome)
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
