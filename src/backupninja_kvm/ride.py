"""The ride record: what a ``stage = freeze`` left for its guard and its thaw.

One JSON file per view under ``STATE_DIR/ride/``, named by a hash of the
view's path, written atomically like the journal. It names the backupninja
run that owns the freeze (pid, start time, boot id), the guard process, the
deadline (``max_frozen``), how to merge (from the thaw's action file), and
each domain exposed in the view with the signature of each exposed file
(inode, size, mtime), so that the thaw can tell a file that changed while
it was shipped.

The per-domain journal stays what makes an overlay ours (``journal``); this
record only says which freeze they belong to. After a guard thawed the
domains itself (backupninja ended without the thaw, or ``max_frozen``
passed), the record keeps the guard's report lines, state ``thawed``, until
the next ``.kvm`` action, ``status`` or ``recover`` relays them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace

from backupninja_kvm import journal as journals

SCHEMA = 1

FREEZING = "freezing"  # the freeze runs: domains are being frozen and exposed
FROZEN = "frozen"  # the guard waits for the thaw, backupninja's end or the deadline
THAWED = "thawed"  # the guard thawed: its report waits for the next run to relay it

Signature = tuple[int, int, int]  # st_ino, st_size, st_mtime_ns


def signature(path: str) -> Signature | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Process:
    """A process as it can be told apart from a later one with the same pid."""

    pid: int
    start: int  # /proc/PID/stat field 22, clock ticks after boot
    boot: str

    @classmethod
    def of(cls, pid: int) -> Process | None:
        start = _start_time(pid)
        return None if start is None else cls(pid, start, boot_id())

    def alive(self) -> bool:
        return self.boot == boot_id() and _start_time(self.pid) == self.start

    def __str__(self) -> str:
        return f"pid {self.pid}"


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if fields[:1] in (["Z"], ["X"]):
        return None  # dead, not reaped yet (a parent that does not wait, such as a bare init)
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ExposedFile:
    name: str  # in VIEW/DOMAIN
    source: str  # the frozen image
    signature: Signature | None


@dataclass(frozen=True)
class Exposed:
    """One domain in the view."""

    name: str
    uuid: str
    live: bool  # frozen on overlays (has a journal); False: shut off, only exposed
    files: tuple[ExposedFile, ...]
    frozen_at: float  # wall clock
    consistency: str  # quiesced or crash-consistent (shut off: clean)


@dataclass(frozen=True)
class Ride:
    view: str
    action: str  # the freeze's action file
    thaw_action: str
    uri: str
    owner: Process  # the backupninja run
    deadline: float  # wall clock: max_frozen after the freeze began
    merge: str  # from the thaw's action file
    merge_timeout: int
    bandwidth: int
    logfile: str = ""  # backupninja's log, where the guard writes
    domains: tuple[Exposed, ...] = ()
    guard: Process | None = None
    state: str = FREEZING
    report: tuple[tuple[str, str], ...] = ()  # (level, text) of the guard's thaw
    started: float = field(default_factory=time.time)
    schema: int = SCHEMA

    def with_domain(self, exposed: Exposed) -> Ride:
        others = tuple(d for d in self.domains if d.uuid != exposed.uuid)
        return replace(self, domains=(*others, exposed))

    def without_domain(self, uuid: str) -> Ride:
        return replace(self, domains=tuple(d for d in self.domains if d.uuid != uuid))

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        deadline = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.deadline))
        names = ", ".join(d.name for d in self.domains) or "no domain"
        guard = f"guard {self.guard}" if self.guard else "no guard"
        return (
            f"view {self.view}: {names} frozen by {self.action} (backupninja {self.owner}) "
            f"since {since}, {guard}, max_frozen until {deadline}"
        )


class RideError(Exception):
    """A ride record exists but cannot be used; it is left in place."""


def ride_dir() -> str:
    return os.path.join(journals.STATE_DIR, "ride")


def key(view: str) -> str:
    return hashlib.sha256(os.path.normpath(view).encode()).hexdigest()[:16]


def ride_path(view: str) -> str:
    return os.path.join(ride_dir(), f"{key(view)}.json")


def socket_path(view: str) -> str:
    """Where the guard of the view's freeze listens for its thaw."""
    return os.path.join(ride_dir(), f"{key(view)}.sock")


def write(ride: Ride) -> None:
    journals.write_json(ride_dir(), ride_path(ride.view), asdict(ride))


def remove(view: str) -> None:
    try:
        os.unlink(ride_path(view))
    except FileNotFoundError:
        pass


def _process(data) -> Process | None:
    return None if data is None else Process(int(data["pid"]), int(data["start"]), data["boot"])


def read_path(path: str) -> Ride | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise RideError(f"ride record {path} is unreadable: {error}") from None
    try:
        if data["schema"] != SCHEMA:
            raise ValueError(f"schema {data['schema']!r}, this version reads {SCHEMA}")
        domains = tuple(
            Exposed(
                d["name"],
                d["uuid"],
                bool(d["live"]),
                tuple(
                    ExposedFile(f["name"], f["source"], _signature_of(f["signature"]))
                    for f in d["files"]
                ),
                float(d["frozen_at"]),
                d["consistency"],
            )
            for d in data.pop("domains")
        )
        owner = _process(data.pop("owner"))
        guard = _process(data.pop("guard"))
        report = tuple((str(level), str(text)) for level, text in data.pop("report"))
        assert owner is not None
        return Ride(owner=owner, guard=guard, domains=domains, report=report, **data)
    except (KeyError, TypeError, ValueError, AssertionError) as error:
        raise RideError(f"ride record {path} is malformed: {error}") from None


def _signature_of(value) -> Signature | None:
    if value is None:
        return None
    ino, size, mtime = value
    return (int(ino), int(size), int(mtime))


def read(view: str) -> Ride | None:
    """The record of the view's freeze, None when there is none."""
    return read_path(ride_path(view))


def all_rides() -> tuple[list[Ride], list[str]]:
    """Every ride record, and the problems of those that cannot be read."""
    try:
        names = sorted(os.listdir(ride_dir()))
    except FileNotFoundError:
        return [], []
    rides, problems = [], []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            found = read_path(os.path.join(ride_dir(), name))
        except RideError as error:
            problems.append(str(error))
            continue
        if found is not None:
            rides.append(found)
    return rides, problems


def guard_alive(ride: Ride) -> bool:
    return ride.guard is not None and ride.guard.alive()


# --- the handover: the guard gives its locks to the thaw -------------------

HANDOVER = b"handover"


def request_handover(view: str, timeout: float = 30.0) -> dict[str, int] | None:
    """Ask the guard of the view's freeze to stand down; returns the lock
    descriptors it passed (SCM_RIGHTS) by domain UUID, None when no guard
    answers (or it is thawing on its own)."""
    path = socket_path(view)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(path)
            client.sendall(HANDOVER)
            message, fds, _flags, _address = socket.recv_fds(client, 64, 256)
        except OSError:
            return None
        uuids = message.decode(errors="replace").split()[1:]
        if not message.startswith(b"ok ") or len(uuids) != len(fds):
            for fd in fds:
                os.close(fd)
            return None
        try:
            client.sendall(b"got")
        except OSError:
            pass
        return dict(zip(uuids, fds, strict=True))


def hand_over(connection: socket.socket, locks: dict[str, int]) -> bool:
    """The guard's side: pass *locks* to the thaw that connected; True once
    the thaw confirmed it holds them."""
    if connection.recv(64) != HANDOVER:
        return False
    uuids = " ".join(locks)
    socket.send_fds(connection, [f"ok {uuids}".encode()], list(locks.values()))
    try:
        return connection.recv(16) == b"got"
    except OSError:
        return False
