"""The hypervisor boundary: the only module that imports libvirt.

Everything else gets plain data (XML text, names, job states). libvirt's own
error printing is silenced; every ``libvirtError`` becomes a HypervisorError
with libvirt's message and code, where it happens.
"""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from backupninja_kvm.disks import parse_disks, referenced_paths
from backupninja_kvm.errors import HypervisorError
from backupninja_kvm.report import log

libvirt.registerErrorHandler(lambda _context, _error: None, None)

ERR_NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN
ERR_OPERATION_INVALID = libvirt.VIR_ERR_OPERATION_INVALID
ERR_BLOCK_COPY_ACTIVE = getattr(libvirt, "VIR_ERR_BLOCK_COPY_ACTIVE", 83)
# libvirt itself refused a definition (before QEMU was asked to run it).
DEFINITION_REFUSED = frozenset(
    {
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_XML_DETAIL,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        libvirt.VIR_ERR_NO_SUPPORT,
    }
)


def _translate(error: libvirt.libvirtError, what: str) -> HypervisorError:
    message = error.get_error_message() or str(error)
    return HypervisorError(f"{what}: {message}", error.get_error_code(), message)


@dataclass(frozen=True)
class DomainSummary:
    name: str
    uuid: str
    active: bool
    persistent: bool


@dataclass(frozen=True)
class BlockJob:
    """State of a block job on one disk."""

    kind: str  # commit, active-commit, pull, copy, unknown
    current: int
    end: int


_JOB_KINDS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
}


_event_loop_lock = threading.Lock()
_event_loop: threading.Thread | None = None


def _start_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread, once per process.

    It must be registered before a connection is opened for that connection
    to deliver events; block job events let a merge go on the moment QEMU
    is ready instead of at the next poll.
    """
    global _event_loop
    with _event_loop_lock:
        if _event_loop is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop.start()


class Hypervisor:
    """A libvirt connection, reopened when libvirtd restarts under us.

    ``job_changed`` is set whenever libvirt reports a block job event
    (started, ready, completed, failed, cancelled) on any domain.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.job_changed = threading.Event()
        self._callback: int | None = None
        _start_event_loop()
        try:
            self._connection = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise _translate(error, f"cannot connect to libvirt at {uri}") from None
        self._watch_block_jobs()

    def _watch_block_jobs(self) -> None:
        def on_block_job(_connection, _domain, _disk, _kind, _status, _opaque) -> None:
            self.job_changed.set()

        try:
            self._callback = self._connection.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, on_block_job, None
            )
        except libvirt.libvirtError:
            self._callback = None  # polling alone still works

    def close(self) -> None:
        try:
            if self._callback is not None:
                self._connection.domainEventDeregisterAny(self._callback)
        except libvirt.libvirtError:
            pass
        try:
            self._connection.close()
        except libvirt.libvirtError:
            pass

    def alive(self) -> bool:
        try:
            return bool(self._connection.isAlive())
        except libvirt.libvirtError:
            return False

    def reconnect(self, timeout: float = 120) -> None:
        """Open the connection again, waiting up to *timeout* s for libvirtd."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._connection = libvirt.open(self.uri)
                self._watch_block_jobs()
                return
            except libvirt.libvirtError as error:
                if time.monotonic() > deadline:
                    raise _translate(error, f"cannot reconnect to libvirt at {self.uri}") from None
                time.sleep(0.5)

    def list_domains(self) -> list[DomainSummary]:
        try:
            domains = self._connection.listAllDomains(0)
        except libvirt.libvirtError as error:
            raise _translate(error, "cannot list domains") from None
        summaries = []
        for d in domains:
            try:
                summaries.append(
                    DomainSummary(
                        d.name(), d.UUIDString(), bool(d.isActive()), bool(d.isPersistent())
                    )
                )
            except libvirt.libvirtError as error:
                if error.get_error_code() == ERR_NO_DOMAIN:
                    continue  # a transient domain that stopped since the listing: gone
                raise _translate(error, "cannot list domains") from None
        return sorted(summaries, key=lambda d: d.name)

    def paths_of_other_domains(self, uuid: str) -> dict[str, set[str]]:
        """name -> every file the disks of each domain other than *uuid* refer
        to, in its live XML (when running) and its persistent XML (when
        defined): tops, the backing layers libvirt shows, block job mirrors.
        A domain that vanishes meanwhile is left out."""
        try:
            handles = self._connection.listAllDomains(0)
        except libvirt.libvirtError as error:
            raise _translate(error, "cannot list domains") from None
        paths: dict[str, set[str]] = {}
        for handle in handles:
            try:
                if handle.UUIDString() == uuid:
                    continue
                found: set[str] = set()
                if handle.isActive():
                    found |= referenced_paths(handle.XMLDesc(0))
                if handle.isPersistent():
                    found |= referenced_paths(handle.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                paths[handle.name()] = found
            except libvirt.libvirtError:
                continue
        return paths

    def domain(self, name: str) -> Domain:
        try:
            return Domain(self, self._connection.lookupByName(name))
        except libvirt.libvirtError as error:
            raise _translate(error, f"domain {name}") from None

    def domain_by_uuid(self, uuid: str) -> Domain:
        try:
            return Domain(self, self._connection.lookupByUUIDString(uuid))
        except libvirt.libvirtError as error:
            raise _translate(error, f"domain {uuid}") from None

    def find_domain(self, name: str = "", uuid: str = "") -> Domain | None:
        """The domain named *name*, else the one with *uuid*; None when
        libvirt knows neither."""
        for lookup, key in ((self._connection.lookupByName, name), (self._lookup_uuid, uuid)):
            if not key:
                continue
            try:
                return Domain(self, lookup(key))
            except libvirt.libvirtError as error:
                if error.get_error_code() != ERR_NO_DOMAIN:
                    raise _translate(error, f"domain {key}") from None
        return None

    def define(self, xml: str) -> Domain:
        """Define a persistent domain from *xml*; returns it."""
        try:
            return Domain(self, self._connection.defineXML(xml))
        except libvirt.libvirtError as error:
            raise _translate(error, "define") from None

    def start_transient(self, xml: str) -> Domain:
        """Start a transient domain from *xml*, which libvirt destroys when
        this connection closes (also when this process dies): a throwaway
        guest. HypervisorError's code is in DEFINITION_REFUSED when libvirt
        refused the definition, else QEMU failed to start it."""
        try:
            handle = self._connection.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
        except libvirt.libvirtError as error:
            raise _translate(error, "start of a transient domain") from None
        return Domain(self, handle)

    def _lookup_uuid(self, uuid: str) -> libvirt.virDomain:
        return self._connection.lookupByUUIDString(uuid)


class Domain:
    """One libvirt domain; disks are named by their target (vda...).

    A call that fails because libvirtd went away is retried once on a new
    connection: a restart of libvirtd does not stop the VM or its block jobs.
    """

    def __init__(self, hypervisor: Hypervisor, handle: libvirt.virDomain) -> None:
        self._hypervisor = hypervisor
        self._handle = handle
        self.name: str = handle.name()
        self.uuid: str = handle.UUIDString()

    def _call(self, what: str, method: str, *args):
        for attempt in (1, 2):
            try:
                return getattr(self._handle, method)(*args)
            except libvirt.libvirtError as error:
                if attempt == 2 or self._hypervisor.alive():
                    raise _translate(error, f"{self.name}: {what}") from None
                log.warning(
                    "%s: lost the connection to libvirt during %s (%s); reconnecting",
                    self.name,
                    what,
                    error.get_error_message(),
                )
                self._hypervisor.reconnect()
                try:
                    self._handle = self._hypervisor._lookup_uuid(self.uuid)
                except libvirt.libvirtError as lookup_error:
                    raise _translate(lookup_error, f"{self.name}: {what}") from None
        raise AssertionError("unreachable")

    def is_active(self) -> bool:
        return bool(self._call("state", "isActive"))

    def paths_of_other_domains(self) -> dict[str, set[str]]:
        """name -> the files every other domain's disks refer to (see
        Hypervisor.paths_of_other_domains)."""
        return self._hypervisor.paths_of_other_domains(self.uuid)

    def is_persistent(self) -> bool:
        return bool(self._call("state", "isPersistent"))

    def is_gone_or_stopped(self) -> bool:
        """True when the domain stopped; a transient one is then gone."""
        try:
            return not self._handle.isActive()
        except libvirt.libvirtError as error:
            if error.get_error_code() == ERR_NO_DOMAIN:
                return True
            raise _translate(error, f"{self.name}: state") from None

    def destroy(self) -> None:
        """Stop it at once (the guest is not asked); already stopped or gone is fine."""
        try:
            self._handle.destroy()
        except libvirt.libvirtError as error:
            if error.get_error_code() in (ERR_NO_DOMAIN, ERR_OPERATION_INVALID):
                return
            raise _translate(error, f"{self.name}: destroy") from None

    def agent_ping(self, timeout: int = 5) -> str:
        """Ask the guest agent for a ``guest-ping``, waiting up to *timeout*
        seconds: "" when it answered, else why not (libvirt's message: not
        connected, not responding)."""
        try:
            libvirt_qemu.qemuAgentCommand(
                self._handle, json.dumps({"execute": "guest-ping"}), timeout, 0
            )
        except libvirt.libvirtError as error:
            return error.get_error_message() or str(error)
        return ""

    def is_paused(self) -> bool:
        state, _reason = self._call("state", "state")
        return state == libvirt.VIR_DOMAIN_PAUSED

    def paused_by_io_error(self) -> bool:
        """True when QEMU paused the guest because a write failed (e.g. ENOSPC)."""
        state, reason = self._call("state", "state")
        return state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR

    def resume(self) -> None:
        self._call("resume", "resume")

    def start(self) -> None:
        self._call("start", "create")

    def id(self) -> int:
        return int(self._call("id", "ID"))

    def xml(self, inactive: bool = False, secure: bool = False) -> str:
        """The domain's XML; *secure* keeps what libvirt hides by default
        (VNC/SPICE passwords), for a definition that restores as it was."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        if secure:
            flags |= libvirt.VIR_DOMAIN_XML_SECURE
        return self._call("read XML", "XMLDesc", flags)

    def create_overlays(self, snapshot_xml: str) -> None:
        """One atomic, disk-only, external snapshot without libvirt metadata."""
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        )
        self._call("create snapshot", "snapshotCreateXML", snapshot_xml, flags)

    def start_commit(self, target: str, bandwidth_mib: int = 0) -> None:
        """Active, shallow commit of the top layer into the layer below it.

        SHALLOW matters: without it libvirt commits into the *bottom* of the
        chain, rewriting a template image that other VMs may share.
        """
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        self._call(
            f"block commit of {target}",
            "blockCommit",
            target,
            None,
            None,
            bandwidth_mib,
            flags,
        )

    def start_pull(self, target: str, base: str | None, bandwidth_mib: int = 0) -> None:
        """Pull the layers above *base* (everything when None) into the top image."""
        if base is None:
            self._call(f"block pull of {target}", "blockPull", target, bandwidth_mib, 0)
        else:
            self._call(
                f"block pull of {target}",
                "blockRebase",
                target,
                base,
                bandwidth_mib,
                0,
            )

    def block_job(self, target: str) -> BlockJob | None:
        info = self._call(f"block job of {target}", "blockJobInfo", target, 0)
        if not info:
            return None
        return BlockJob(_JOB_KINDS.get(info.get("type"), "unknown"), info["cur"], info["end"])

    @property
    def job_changed(self) -> threading.Event:
        """Set by libvirt's block job events (any domain): wakes wait_until."""
        return self._hypervisor.job_changed

    def job_finished(self, target: str) -> bool:
        return self.block_job(target) is None

    def mirror_ready(self, target: str) -> bool:
        """True when the live XML shows the job on *target* ready to pivot."""
        return any(d.target == target and d.mirror_ready for d in parse_disks(self.xml()))

    def set_agent_timeout(self, seconds: int | None) -> None:
        """How long libvirt waits for the guest agent's answers; None: libvirt's
        default, which waits without limit."""
        value = libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT if seconds is None else seconds
        self._call("guest agent timeout", "agentSetResponseTimeout", value, 0)

    def fs_freeze(self) -> int:
        """Freeze the guest's filesystems (guest agent); returns how many."""
        return int(self._call("freeze of the guest's filesystems", "fsFreeze", None, 0))

    def fs_thaw(self) -> int:
        """Thaw the guest's filesystems; returns how many were frozen."""
        return int(self._call("thaw of the guest's filesystems", "fsThaw", None, 0))

    def redefine(self, xml: str) -> None:
        """Replace the persistent definition (the domain must keep its name and UUID)."""
        try:
            self._hypervisor._connection.defineXML(xml)
        except libvirt.libvirtError as error:
            raise _translate(error, f"{self.name}: define") from None

    def pivot(self, target: str) -> None:
        self._call(
            f"pivot of {target}",
            "blockJobAbort",
            target,
            libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
        )

    def abort_job(self, target: str) -> None:
        self._call(f"abort block job of {target}", "blockJobAbort", target, 0)

    def run_id(self) -> int:
        """libvirt's id of the running QEMU process (a new one at each start)."""
        return int(self._call("id", "ID"))

    def checkpoints(self) -> list[str]:
        """The names of the domain's libvirt checkpoints, ours and others'."""
        return [c.getName() for c in self._call("checkpoint list", "listAllCheckpoints", 0)]

    def create_checkpoint(self, xml: str) -> None:
        """Start a checkpoint: a persistent dirty bitmap in each disk it names."""
        self._call("checkpoint", "checkpointCreateXML", xml, 0)

    def checkpoint_sizes(self, name: str) -> dict[str, int | None]:
        """target -> bytes changed since checkpoint *name*, as libvirt
        counts them; None for a disk of the checkpoint whose bitmap is not
        consistent (libvirt then reports no size). HypervisorError when the
        checkpoint does not exist."""
        checkpoint = self._call(f"checkpoint {name}", "checkpointLookupByName", name, 0)
        try:
            xml = checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        except libvirt.libvirtError as error:
            raise _translate(error, f"{self.name}: checkpoint {name}") from None
        sizes: dict[str, int | None] = {}
        try:
            for disk in ET.fromstring(xml).findall("./disks/disk"):
                if disk.get("checkpoint") == "bitmap":
                    size = disk.get("size")
                    sizes[disk.get("name", "")] = int(size) if size is not None else None
        except (ET.ParseError, ValueError) as error:
            raise HypervisorError(
                f"{self.name}: checkpoint {name}: unreadable XML: {error}"
            ) from None
        return sizes

    def delete_checkpoint(self, name: str) -> None:
        """Delete checkpoint *name* and its bitmaps; where a bitmap is
        already gone (an image replaced, a restore), only libvirt's record."""
        checkpoint = self._call(f"checkpoint {name}", "checkpointLookupByName", name, 0)
        try:
            checkpoint.delete(0)
        except libvirt.libvirtError as error:
            # Only a bitmap that is really gone makes the record alone go:
            # any other failure (a shut-off domain, a busy job) leaves both
            # for the next try, never a bitmap that nothing would remove.
            if "not found" not in (error.get_error_message() or ""):
                raise _translate(error, f"{self.name}: delete of checkpoint {name}") from None
            try:
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError as second:
                raise _translate(second, f"{self.name}: delete of checkpoint {name}") from None


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    first: float = 0.005,
    longest: float = 0.25,
    wake: threading.Event | None = None,
) -> bool:
    """Poll *condition* until true or *timeout* seconds pass.

    Every 5-20 ms for the first two seconds (a merge of a night's writes is
    often ready in well under a second, and every poll late is time on the
    overlay), then backing off to *longest*. When *wake* is set meanwhile
    (a libvirt event), the condition is checked again at once.
    """
    started = time.monotonic()
    deadline = started + timeout
    interval = first
    while True:
        if wake is not None:
            wake.clear()  # before the check: an event during it is not lost
        if condition():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        pause = min(interval, max(0.0, deadline - now))
        if wake is not None:
            wake.wait(pause)
        else:
            time.sleep(pause)
        interval = min(interval * 2, longest if now - started > 2 else 0.02)
