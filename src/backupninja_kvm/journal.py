"""The journal: what a backup of one domain has done, kept locally.

One JSON file per domain UUID under ``STATE_DIR/journal/``, never on the
destination. It is written atomically (temporary file in the same folder,
fsync, rename) *before* every irreversible step, so that after any crash it
names the overlays that may exist and the base each belongs to. Recovery
reads it together with the live chain (see ``recovery``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

STATE_DIR = os.environ.get("BACKUPNINJA_KVM_STATE_DIR", "/var/lib/backupninja-kvm")
SCHEMA = 1

# Phases, in order. A journal is removed once the cycle is clean.
PLANNED = "planned"  # overlays named, nothing frozen yet
FROZEN = "frozen"  # the snapshot may exist: the domain may run on the overlays
MERGING = "merging"  # merge jobs may be running
MERGED = "merged"  # every disk verified back on its base; overlays to delete

# Merge state of one disk, in order.
DISK_FROZEN = "frozen"  # may run on its overlay
DISK_MERGING = "merging"  # a merge job was started
DISK_MERGED = "merged"  # pivoted (or pulled): back on its own chain


@dataclass(frozen=True)
class DiskEntry:
    target: str
    base: str  # the image the disk runs on outside a backup
    base_format: str  # qcow2 or raw
    overlay: str  # our overlay for this run
    state: str = DISK_FROZEN  # how far its merge went
    # The base's own backing file before the freeze (a template), which a
    # pull leaves below the overlay: None when the base stands alone.
    base_backing: str | None = None
    # The image the persistent definition named for this disk before the
    # freeze: None when it had no such disk (hot-plugged live only, a pending
    # detach) or the domain is transient. Only a disk defined on the same
    # image as it runs on is checked in the definition after the merge.
    persistent_base: str | None = None


@dataclass(frozen=True)
class Journal:
    domain: str
    uuid: str
    phase: str
    merge: str  # commit or pull
    disks: tuple[DiskEntry, ...]
    quiesce: bool = False  # the guest's filesystems are frozen around the snapshot
    partial: str = ""  # the set being written (DIRECTORY/DOMAIN/STAMP.partial)
    partial_host: str = ""  # where *partial* is, for dest = remote; "" when local
    started: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    schema: int = SCHEMA
    # stage = freeze: the view that exposes the frozen images (taken down
    # before any merge), "" for stage = full.
    view: str = ""

    def at(self, phase: str) -> Journal:
        return replace(self, phase=phase)

    def with_disk(self, target: str, state: str) -> Journal:
        """The journal with the merge state of disk *target* set to *state*."""
        return replace(
            self,
            disks=tuple(replace(d, state=state) if d.target == target else d for d in self.disks),
        )

    def disk(self, target: str) -> DiskEntry | None:
        return next((d for d in self.disks if d.target == target), None)


class JournalError(Exception):
    """A journal file exists but cannot be used; it is left in place."""


def journal_dir() -> str:
    return os.path.join(STATE_DIR, "journal")


def journal_path(uuid: str) -> str:
    return os.path.join(journal_dir(), f"{uuid}.json")


def write(journal: Journal) -> None:
    """Atomically replace the domain's journal with *journal*."""
    write_json(journal_dir(), journal_path(journal.uuid), asdict(journal))


def read(uuid: str) -> Journal | None:
    """The domain's journal, None when there is none; JournalError when unusable."""
    path = journal_path(uuid)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise JournalError(f"journal {path} is unreadable: {error}") from None
    if not isinstance(data, dict):
        raise JournalError(f"journal {path} is malformed: not a JSON object")
    if data.get("schema") != SCHEMA:
        raise JournalError(
            f"journal {path} has schema {data.get('schema')!r}, this version reads {SCHEMA}"
        )
    try:
        disks = tuple(DiskEntry(**d) for d in data.pop("disks"))
        return Journal(disks=disks, **data)
    except (TypeError, KeyError) as error:
        raise JournalError(f"journal {path} is malformed: {error}") from None


def remove(uuid: str) -> None:
    try:
        os.unlink(journal_path(uuid))
    except FileNotFoundError:
        pass


def write_json(directory: str, path: str, data: dict) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # mkstemp: 0600, a new file (never through a link), a name no one chose
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    with open(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def all_journals() -> list[str]:
    """UUIDs that have a journal."""
    try:
        names = os.listdir(journal_dir())
    except FileNotFoundError:
        return []
    return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))


# The images our pulls made (merge = pull: an overlay that became the disk),
# per domain UUID under STATE_DIR/pulled/, kept across runs. An image is
# deleted only when it is recorded here as made by our pull and then
# superseded by a later pull: a tagged file name is no proof, the
# administrator's own image may carry it.


@dataclass(frozen=True)
class Pulled:
    made: frozenset[str] = frozenset()  # made by our pulls, the disks' images since
    superseded: frozenset[str] = frozenset()  # made by us, then left by a later pull

    def after_pull(self, frozen: set[str], overlays: set[str]) -> Pulled:
        """The record once a pull has moved disks off the *frozen* images
        onto the *overlays*."""
        return Pulled(
            made=frozenset((self.made - frozen) | overlays),
            superseded=frozenset(self.superseded | (self.made & frozen)),
        )


def pulled_path(uuid: str) -> str:
    return os.path.join(STATE_DIR, "pulled", f"{uuid}.json")


def read_pulled(uuid: str) -> Pulled:
    """What our pulls made for the domain; JournalError when unreadable."""
    path = pulled_path(uuid)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return Pulled()
    except (OSError, ValueError) as error:
        raise JournalError(f"the record of pulled images {path} is unreadable: {error}") from None
    try:
        if data["schema"] != SCHEMA:
            raise ValueError(f"schema {data['schema']!r}")
        return Pulled(
            frozenset(str(p) for p in data["made"]), frozenset(str(p) for p in data["superseded"])
        )
    except (KeyError, TypeError, ValueError) as error:
        raise JournalError(f"the record of pulled images {path} is malformed: {error}") from None


def write_pulled(uuid: str, pulled: Pulled) -> None:
    """Atomically replace the record of what our pulls made."""
    path = pulled_path(uuid)
    if not pulled.made and not pulled.superseded:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    data = {"schema": SCHEMA, "made": sorted(pulled.made), "superseded": sorted(pulled.superseded)}
    write_json(os.path.dirname(path), path, data)
