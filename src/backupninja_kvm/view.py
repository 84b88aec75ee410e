"""The view: frozen images exposed read-only for backupninja's own rsync, borg
and restic actions (``stage = freeze`` builds it, the thaw takes it down).

Layout, under a root-owned 0700 VIEW folder::

    VIEW/DOMAIN/                0700, made by us (lstat, never through a link)
    VIEW/DOMAIN/TARGET-IMAGE    an empty placeholder with the frozen image
                                bind-mounted read-only onto it (plan.backup_file_name)
    VIEW/DOMAIN/domain.xml      the inactive XML, 0600
    VIEW/DOMAIN/manifest.json   0600, see Manifest.to_json

A read-only bind mount reads as a plain regular file to every tool, across
filesystems, keeps the image's inode and ctime (so borg and restic see an
unchanged image as unchanged), and fails every write with EROFS. A non-lazy
umount fails with EBUSY while a reader still holds the file: that is how an
orphaned ship is found. The known rule: restic with ``one_file_system``
drops a view file bound from another filesystem than the view's (silently,
rc 0); rsync ``-x`` and borg ``-x`` still read it.

The mounts are found again from /proc/self/mountinfo, so a view left by a
crashed run (mounts present, process gone) is taken down by the same call.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backupninja_kvm import faults
from backupninja_kvm.destination import check_domain_name
from backupninja_kvm.disks import Disk
from backupninja_kvm.errors import BackupNinjaKvmError
from backupninja_kvm.plan import backup_file_name

DEFINITION_NAME = "domain.xml"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CONSISTENCIES = ("quiesced", "crash-consistent")
_TEMP_PREFIX = ".bnkvm-tmp-"

# <sys/mount.h>
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8


class ViewError(BackupNinjaKvmError):
    """The view cannot be built or taken down; the message names the path."""


@dataclass(frozen=True)
class ViewFile:
    """One frozen image to expose: its name in the view and where it is."""

    target: str
    name: str  # TARGET-IMAGENAME, as in the set
    source: str  # the frozen image (the disk's base, read-only to QEMU now)
    format: str
    virtual_size: int

    @classmethod
    def for_disk(cls, disk: Disk, virtual_size: int) -> ViewFile:
        """The view file of a disk's frozen top image (its path before the freeze)."""
        assert disk.path
        return cls(
            disk.target, backup_file_name(disk), disk.path, disk.format or "raw", virtual_size
        )


@dataclass(frozen=True)
class Manifest:
    """What the view of one domain shows: written as manifest.json."""

    domain: str
    freeze_time: str  # UTC, e.g. 2026-12-02T01:00:00Z
    consistency: str  # "quiesced" or "crash-consistent"
    files: tuple[ViewFile, ...] = ()

    def to_json(self) -> str:
        """``{"version": 1, "domain", "freeze_time", "consistency", "files": [{"name",
        "target", "original_path", "format", "virtual_size"}]}``."""
        data = {
            "version": MANIFEST_VERSION,
            "domain": self.domain,
            "freeze_time": self.freeze_time,
            "consistency": self.consistency,
            "files": [
                {
                    "name": f.name,
                    "target": f.target,
                    "original_path": f.source,
                    "format": f.format,
                    "virtual_size": f.virtual_size,
                }
                for f in self.files
            ],
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse manifest.json; ViewError when it is not one of ours."""
        try:
            data = json.loads(text)
            files = tuple(
                ViewFile(
                    str(f["target"]),
                    str(f["name"]),
                    str(f["original_path"]),
                    str(f["format"]),
                    int(f["virtual_size"]),
                )
                for f in data["files"]
            )
            if data["version"] != MANIFEST_VERSION:
                raise ValueError(f"version {data['version']!r}")
            return cls(
                str(data["domain"]), str(data["freeze_time"]), str(data["consistency"]), files
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ViewError(f"the view's manifest cannot be read ({error})") from None


def check_manifest(manifest: Manifest) -> None:
    """Raise ViewError unless every name is a safe, distinct file name of the view."""
    check_domain_name(manifest.domain)
    if manifest.consistency not in CONSISTENCIES:
        raise ViewError(
            f"{manifest.domain}: consistency {manifest.consistency!r} is not one of "
            f"{', '.join(CONSISTENCIES)}"
        )
    seen: set[str] = {DEFINITION_NAME, MANIFEST_NAME}
    for view_file in manifest.files:
        name = view_file.name
        bad = (
            not name
            or name in (".", "..")
            or "/" in name
            or name.startswith(".")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
        )
        if bad:
            raise ViewError(f"{manifest.domain}: {name!r} cannot be a file name in the view")
        if name in seen:
            raise ViewError(f"{manifest.domain}: two files of the view would be named {name!r}")
        seen.add(name)


# --- mountinfo ---------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    root: str  # the path inside the source filesystem (the image, for a bind)
    mount_point: str
    options: tuple[str, ...]  # per-mount options: ro, nosuid...
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field_text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\040, \\011, \\012, \\134."""
    out = bytearray()
    raw = field_text.encode("utf-8", "surrogateescape")
    index = 0
    while index < len(raw):
        octal = raw[index + 1 : index + 4]
        if (
            raw[index : index + 1] == b"\\"
            and len(octal) == 3
            and all(48 <= c <= 55 for c in octal)
        ):
            out.append(int(octal, 8))
            index += 4
        else:
            out.append(raw[index])
            index += 1
    return out.decode("utf-8", "surrogateescape")


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text (proc(5)); lines it cannot read are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=tuple(fields[5].split(",")),
                    fstype=fields[dash + 1],
                    source=_unescape(fields[dash + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def mounts_under(mounts: list[Mount], directory: str) -> list[Mount]:
    """The mounts strictly inside *directory* (an absolute, resolved path), newest first."""
    prefix = directory.rstrip("/") + "/"
    inside = [m for m in mounts if m.mount_point.startswith(prefix)]
    return sorted(inside, key=lambda m: m.mount_id, reverse=True)


def read_mountinfo() -> list[Mount]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        return parse_mountinfo(handle.read())


def mounted(view_dir: str) -> list[Mount]:
    """What is mounted under a view (every domain), newest first: for status and repair.

    The domain of a mount is the first component below *view_dir* (``domain_of``)."""
    return mounts_under(read_mountinfo(), _resolved(view_dir))


def domain_of(view_dir: str, mount: Mount) -> str:
    """The domain folder a mount of ``mounted(view_dir)`` belongs to."""
    relative = os.path.relpath(mount.mount_point, _resolved(view_dir))
    return relative.split("/", 1)[0]


# --- building ----------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: str, flags: int) -> None:
    encoded = source.encode() if source is not None else None
    if _libc.mount(encoded, target.encode(), None, flags, None) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), target)


def _umount(target: str, flags: int) -> int:
    """0, or the errno of umount2(2)."""
    if _libc.umount2(target.encode(), flags | _UMOUNT_NOFOLLOW) != 0:
        return ctypes.get_errno()
    return 0


def _resolved(view_dir: str) -> str:
    return os.path.realpath(os.path.abspath(view_dir))


def _open_view(view_dir: str, create: bool) -> int | None:
    """An O_DIRECTORY fd on VIEW, made 0700 if missing; ViewError unless it is a
    real folder (not a link) owned by root and closed to others."""
    path = os.path.abspath(view_dir)
    if _resolved(path) != path:
        raise ViewError(f"view {path}: the path goes through a symbolic link; use the real path")
    if create:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ViewError(f"view {path}: not a folder of ours ({error.strerror})") from None
    _check_ours(fd, path)
    return fd


def _check_ours(fd: int, path: str) -> None:
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(fd)
        raise ViewError(
            f"view {path}: owned by uid {info.st_uid} with mode "
            f"{stat.S_IMODE(info.st_mode):04o}, not a root-owned 0700 folder of ours; "
            f"remove it or choose another view"
        )


def _open_domain_dir(view_fd: int, view_path: str, domain: str) -> int | None:
    path = os.path.join(view_path, domain)
    try:
        fd = os.open(domain, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=view_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ViewError(f"view {path}: not a folder of ours ({error.strerror})") from None
    _check_ours(fd, path)
    return fd


def _write_file(dir_fd: int, name: str, text: str) -> None:
    """Write *name* (0600) atomically inside the folder *dir_fd*."""
    temporary = f"{_TEMP_PREFIX}{name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def build(
    view_dir: str,
    domain: str,
    files: list[ViewFile],
    definition_xml: str,
    manifest: Manifest,
) -> str:
    """Expose *files* read-only under VIEW/DOMAIN; return that folder.

    *manifest* gives the domain, freeze time and consistency; its files are
    *files*. Each source must be a regular file (the frozen image).

    The manifest is written first (so a crash in between leaves a view that
    ``take_down`` fully recognises), then each placeholder is made and the
    frozen image bound onto it read-only (nosuid, nodev, noexec). On any
    failure what was built is taken down again before ViewError is raised.
    Refuses a VIEW/DOMAIN that already exists (a view left by an earlier
    run: take it down first) and a VIEW that is not a root-owned 0700 folder.
    """
    manifest = Manifest(manifest.domain, manifest.freeze_time, manifest.consistency, tuple(files))
    if manifest.domain != domain:
        raise ViewError(f"view of {domain}: the manifest names {manifest.domain!r}")
    check_manifest(manifest)
    view_path = os.path.abspath(view_dir)
    domain_path = os.path.join(view_path, domain)
    for view_file in files:
        try:
            info = os.stat(view_file.source)
        except OSError as error:
            raise ViewError(f"{domain}: {view_file.source}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise ViewError(
                f"{domain}: {view_file.source} is not a regular file; it cannot be exposed"
            )
    view_fd = _open_view(view_path, create=True)
    assert view_fd is not None
    try:
        try:
            os.mkdir(domain, 0o700, dir_fd=view_fd)
        except FileExistsError:
            raise ViewError(
                f"view {domain_path} already exists (left by an earlier run?); take it down "
                f"first (backupninja-kvm recover)"
            ) from None
        domain_fd = _open_domain_dir(view_fd, view_path, domain)
        assert domain_fd is not None
    finally:
        os.close(view_fd)
    try:
        _write_file(domain_fd, MANIFEST_NAME, manifest.to_json())
        _write_file(domain_fd, DEFINITION_NAME, definition_xml)
        for view_file in files:
            placeholder = os.path.join(domain_path, view_file.name)
            fd = os.open(
                view_file.name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                0o600,
                dir_fd=domain_fd,
            )
            os.close(fd)
            _mount(os.path.realpath(view_file.source), placeholder, _MS_BIND)
            _mount(
                None,
                placeholder,
                _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
            )
            if not os.statvfs(placeholder).f_flag & os.ST_RDONLY:
                raise OSError(errno.EROFS, "the bind mount is not read-only", placeholder)
            faults.checkpoint("mid-view")
    except OSError as error:
        try:
            take_down(view_path, domain, wait=0)
        except ViewError:
            pass
        where = error.filename or domain_path
        raise ViewError(f"{domain}: the view cannot be built: {where}: {error.strerror}") from None
    finally:
        os.close(domain_fd)
    return domain_path


# --- taking down ---------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    """A process that holds a view file open."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"{self.command} (pid {self.pid})"


@dataclass(frozen=True)
class ForcedUnmount:
    """A view file that stayed busy: lazily unmounted, its readers still read it."""

    path: str
    readers: tuple[Reader, ...]

    def describe(self) -> str:
        who = ", ".join(str(r) for r in self.readers) or "a process that could not be found"
        return f"{self.path} was still read by {who}; detached (umount -l)"


@dataclass
class TakenDown:
    """What ``take_down`` did; ``forced`` is for an Error line naming each reader
    (a copy it makes after the merge may be torn)."""

    unmounted: list[str] = field(default_factory=list)
    forced: list[ForcedUnmount] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def readers_of(path: str) -> list[Reader]:
    """Processes with *path* open, from /proc/*/fd (those we may read)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target == path:
                try:
                    with open(f"/proc/{entry}/comm") as handle:
                        command = handle.read().strip()
                except OSError:
                    command = "?"
                found.append(Reader(int(entry), command))
                break
    return found


def take_down(view_dir: str, domain: str, wait: float = 60.0) -> TakenDown:
    """Unmount every mount under VIEW/DOMAIN, remove the view's files and folder.

    Each mount gets a non-lazy umount; while one is busy (EBUSY: a reader
    still holds it) the umounts are retried for *wait* seconds in all, then
    the busy ones are detached (``umount -l``) and listed in
    ``TakenDown.forced`` with the readers found in /proc. The mounts come
    from /proc/self/mountinfo, so a view left by a crash is taken down too.
    Idempotent: nothing there, nothing done. Only the view's own files are
    removed (its manifest, domain.xml, empty placeholders, our temporary
    files); ViewError names anything else left in the folder (after every
    mount is gone).
    """
    check_domain_name(domain)
    view_path = os.path.abspath(view_dir)
    domain_path = os.path.join(_resolved(view_path), domain)
    result = TakenDown()
    deadline = time.monotonic() + wait
    pending = [m.mount_point for m in mounts_under(read_mountinfo(), domain_path)]
    gone: set[str] = set()
    while pending:
        busy = []
        for point in pending:
            code = _umount(point, 0)
            if code == 0:
                result.unmounted.append(point)
            elif code == errno.EBUSY:
                busy.append(point)
            elif code == errno.EINVAL:  # no longer a mount point, unless listed again
                gone.add(point)
            else:
                raise ViewError(f"view {point}: umount failed: {os.strerror(code)}")
        if busy and time.monotonic() >= deadline:
            for point in busy:
                readers = tuple(readers_of(point))
                code = _umount(point, _MNT_DETACH)
                if code not in (0, errno.EINVAL):
                    raise ViewError(f"view {point}: umount -l failed: {os.strerror(code)}")
                result.forced.append(ForcedUnmount(point, readers))
            busy = []
        if busy:
            time.sleep(0.2)
        # a point can hold stacked mounts: look again until none is left
        pending = busy or [m.mount_point for m in mounts_under(read_mountinfo(), domain_path)]
        stuck = sorted(gone & set(pending))
        if stuck and not busy:
            raise ViewError(
                f"view {stuck[0]}: still mounted, but umount says it is not a mount point"
            )
    _remove_files(view_path, domain, result)
    return result


def _remove_files(view_path: str, domain: str, result: TakenDown) -> None:
    view_fd = _open_view(view_path, create=False)
    if view_fd is None:
        return
    try:
        domain_fd = _open_domain_dir(view_fd, view_path, domain)
        if domain_fd is None:
            return
        domain_path = os.path.join(view_path, domain)
        try:
            listed: set[str] = set()
            try:
                with open(MANIFEST_NAME, opener=_opener(domain_fd)) as handle:
                    listed = {f.name for f in Manifest.from_json(handle.read()).files}
            except (FileNotFoundError, ViewError):
                pass
            left = []
            for name in sorted(os.listdir(domain_fd)):
                info = os.lstat(name, dir_fd=domain_fd)
                ours = name in (DEFINITION_NAME, MANIFEST_NAME) or name.startswith(_TEMP_PREFIX)
                # an empty placeholder the manifest lists, or any when it cannot be read
                placeholder = stat.S_ISREG(info.st_mode) and info.st_size == 0
                ours = ours or (placeholder and (name in listed or not listed))
                if stat.S_ISREG(info.st_mode) and ours:
                    os.unlink(name, dir_fd=domain_fd)
                    result.removed.append(os.path.join(domain_path, name))
                else:
                    left.append(name)
        finally:
            os.close(domain_fd)
        if left:
            raise ViewError(
                f"view {domain_path}: not ours, left in place: {', '.join(left)}; "
                f"remove them by hand"
            )
        os.rmdir(domain, dir_fd=view_fd)
        result.removed.append(domain_path)
    finally:
        os.close(view_fd)


def _opener(dir_fd: int) -> Callable[[str, int], int]:
    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)

    return opener
