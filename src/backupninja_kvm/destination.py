"""Backup sets at the destination.

Layout, per domain::

    DIRECTORY/DOMAIN/20261127T010000Z/          a complete set
        domain.xml                               the inactive domain definition
        vda-IMAGE.qcow2, vdb-IMAGE.img ...        the frozen images, sparse
        B3SUMS                                   manifest, `b3sum -c B3SUMS`
        vda-IMAGE.qcow2.b3tree                   the image's BLAKE3 tree (b3tree):
                                                 changed blocks hash only what changed
    DIRECTORY/DOMAIN/20261127T010000Z.partial/  a set being written: never a backup
    DIRECTORY/DOMAIN/latest -> 20261127T010000Z the newest complete set
    DIRECTORY/DOMAIN/LATEST                     the same, as a text file, where the
                                                 filesystem has no symlinks

A set counts only once it has its manifest and its final name.

Names and order. A set is named by the UTC time of its run, with the zone
marked (``20261127T010000Z``); sets of earlier versions carry local time
without the ``Z`` (``20261127T010000``) and are still listed and pruned. The
name *is* the creation order, by construction: a new name is always after
every name in the domain's folder (``next_stamp``, chosen while the domain's
lock is held). When the clock says otherwise (a second run in the same
second, a clock stepped back, a set made while the clock was ahead), the new
set takes the name one second after the newest one instead of its own time.
That keeps the order in the one thing every tool shows and copies along
(``ls``, ``cp -r``, rsync), with no second source of truth that could
disagree with it; the cost is that, after a step back, names run ahead of
the clock until it catches up. Old local-time names come before every UTC
name (they were all made before the upgrade), and among themselves in name
order, as before.

Retention. Which sets stay is decided by ``retention.plan``: the newest
``keep`` sets with images and the calendar rules (``keep_daily`` ...). Only
sets with a disk image count: a set holding nothing but ``domain.xml`` (a VM
whose disks all moved to block or network storage) never pushes a good set
out. The set just made is never removed.

The manifest holds BLAKE3 sums (the `b3sum` format, which is sha256sum's),
made by Debian's `b3sum` program: a cryptographic hash that runs on every
core and about five times faster than SHA-256 on one, so that the manifest
costs a fraction of a second per domain instead of several (measured by
`make bench`). An image whose disk has changed blocks keeps its tree beside
it (``b3tree``): the next night's sum of its clone rereads only the leaves
whose blocks no longer match, and is still the sum b3sum prints. Sets written before
that, or by a remote host without `b3sum`, carry SHA256SUMS instead.

Safety. DIRECTORY/DOMAIN must belong to the user we run as and be writable
by nobody else: whoever can write it could swap a set for a fake one, or the
``.partial`` folder for a link that points our writes elsewhere. Domain
names are checked as path components before any path is built.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import stat
import subprocess
import time
import types
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backupninja_kvm import b3tree, retention
from backupninja_kvm.errors import DomainError, TransferError
from backupninja_kvm.report import human_bytes, log
from backupninja_kvm.transfer import Remote, copy_sparse, data_bytes, data_extents, sync_file

MANIFEST = "B3SUMS"
MANIFESTS = (MANIFEST, "SHA256SUMS")  # either one makes a complete set
PARTIAL = ".partial"
LATEST = "latest"
LATEST_FILE = "LATEST"  # the pointer where symlinks cannot be made
DEFINITION = "domain.xml"  # the definition: not a disk image
SET_INFO = "set.json"  # what the set holds (setinfo): not a disk image
NOT_IMAGES = (DEFINITION, SET_INFO)
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_OLD_STAMP_FORMAT = "%Y%m%dT%H%M%S"  # local time, before 0.3
_STAMP = re.compile(r"^\d{8}T\d{6}Z?$")


def new_stamp(now: float | None = None) -> str:
    """The UTC name of a set made at *now* (seconds since the epoch)."""
    return time.strftime(STAMP_FORMAT, time.gmtime(time.time() if now is None else now))


def is_stamp(name: str) -> bool:
    """Whether *name* is a set's name (a real date and time, UTC or old local)."""
    if not _STAMP.match(name):
        return False
    try:
        time.strptime(name.removesuffix("Z"), _OLD_STAMP_FORMAT)
    except ValueError:
        return False
    return True


def creation_key(stamp: str) -> tuple[bool, str]:
    """Sort key: creation order (old local-time names first)."""
    return (stamp.endswith("Z"), stamp)


def _after(stamp: str) -> str:
    """The name one second after *stamp*, in the UTC form."""
    if stamp.endswith("Z"):
        seconds = calendar.timegm(time.strptime(stamp, STAMP_FORMAT))
    else:  # an old local-time name: its UTC time is unknown, any later UTC name will do
        seconds = calendar.timegm(time.strptime(stamp, _OLD_STAMP_FORMAT))
    return new_stamp(seconds + 1)


def next_stamp(proposed: str, existing: Iterable[str]) -> str:
    """The name for a new set: *proposed* (the run's time), or, when a set
    (or a ``.partial``) of that name or a later one exists among the names
    *existing*, one second after the newest."""
    names = [n for n in (e.removesuffix(PARTIAL) for e in existing) if is_stamp(n)]
    if not names:
        return proposed
    newest = max(names, key=creation_key)
    if creation_key(proposed) > creation_key(newest):
        return proposed
    return _after(newest)


def check_domain_name(name: str) -> None:
    """Raise DomainError unless *name* is safe as one path component."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        raise DomainError(
            f"domain {name!r}: the name cannot be a folder name at the destination (it is "
            "empty, '.' or '..', or holds '/' or a control character); rename the domain "
            "(virsh domrename) to back it up; domain skipped"
        )


def domain_directory(directory: str, name: str) -> str:
    """DIRECTORY/DOMAIN, once the name is checked (DomainError otherwise)."""
    check_domain_name(name)
    return os.path.join(directory, name)


@dataclass(frozen=True)
class SetEntry:
    """A complete set as listed at the destination."""

    stamp: str
    has_images: bool = True


def order_sets(entries: Iterable[SetEntry]) -> list[SetEntry]:
    return sorted(entries, key=lambda e: creation_key(e.stamp))


def sets_to_prune(
    entries: Iterable[SetEntry], policy: retention.Policy | int, current: str = ""
) -> list[str]:
    """Names to remove under *policy* (or just ``keep``, a number), oldest
    first: those ``retention.plan`` keeps for no reason. The set *current*
    (just made) is never removed."""
    return retention.removed(retention.plan(entries, as_policy(policy), current))


def as_policy(policy: retention.Policy | int) -> retention.Policy:
    """*policy*, or a policy of ``keep`` = *policy* alone."""
    return policy if isinstance(policy, retention.Policy) else retention.Policy(policy)


def manifest_has_images(lines: Iterable[str]) -> bool:
    """Whether a manifest (b3sum/sha256sum format) lists a disk image (a file
    besides domain.xml and set.json)."""
    for line in lines:
        name = line.rstrip("\n").split("  ", 1)[-1]
        if name and name not in NOT_IMAGES:
            return True
    return False


def world_writable_warning(path: str, key: str) -> str | None:
    """A warning text when *path* (a folder we write in) is writable by others."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    if not status.st_mode & stat.S_IWOTH:
        return None
    sticky = " (sticky)" if status.st_mode & stat.S_ISVTX else ""
    return (
        f"{key} {path} is writable by every user{sticky}: another user can plant files "
        f"or folders there that this backup trips over or that replace its own; use a "
        f"folder only root can write (chmod 755 or 700)"
    )


def unsafe_folder_problem(path: str) -> str | None:
    """Why the existing folder *path* must not hold sets, or None when it may."""
    try:
        link = os.lstat(path)
        status = os.stat(path)
    except OSError as error:
        return f"cannot check {path}: {error.strerror}"
    me = os.geteuid()
    if stat.S_ISLNK(link.st_mode) and link.st_uid != me:
        return f"{path} is a symbolic link owned by uid {link.st_uid}"
    if not stat.S_ISDIR(status.st_mode):
        return None  # not a place for sets at all: creating the set there fails
    if status.st_uid != me:
        return f"{path} is owned by uid {status.st_uid}, not by uid {me} that runs the backup"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def _refuse_unsafe_folder(domain_dir: str) -> None:
    problem = unsafe_folder_problem(domain_dir)
    if problem:
        raise DomainError(
            f"{os.path.basename(domain_dir)}: {problem}: its sets could be replaced by "
            f"another user; check its contents, then `chown root: {domain_dir}; "
            f"chmod 700 {domain_dir}` (on a filesystem without Unix permissions, mount it "
            f"with umask=077, or dir_mode=0700 for CIFS); domain skipped"
        )


B3SUM = "b3sum"  # Debian's package b3sum
# A file with more holes than this is hashed through a pipe, holes written as
# zeros from a buffer: `b3sum FILE` maps the file and reads every hole, which
# fills the page cache with zero pages (a 16 GiB raw image holding 512 MiB:
# 16 GiB of cache and 25 s, against 9 s through the pipe; README, Performance).
# Below it, `b3sum FILE` on every core is the faster way.
STREAMED_HOLES = 1 << 30
_ZEROS = memoryview(bytes(1 << 20))
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+ on Linux only


_blake3: types.ModuleType | None
try:  # the PyPI module, where it is installed (make install, the test venv)
    import blake3 as _blake3_module

    _blake3 = _blake3_module
except ImportError:  # Debian has no python3-blake3: the package uses the b3sum program
    _blake3 = None


def file_b3sum(path: str) -> str:
    """BLAKE3 of a file, as `b3sum` prints it. Raises OSError."""
    return file_b3sums([path])[0]


def manifest_sum(manifest: str, path: str) -> str:
    """The sum of a file as the manifest *manifest* (B3SUMS or SHA256SUMS) lists it."""
    if manifest == MANIFEST:
        return file_b3sum(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _module_b3sum(path: str) -> str:
    """BLAKE3 of a file with the blake3 module, in this process.

    Data extents are hashed straight from a read-only mapping on every core,
    holes from a buffer of zeros that is never in the page cache: a 16 GiB
    raw image holding 512 MiB takes 1.3 s, against 9 s through b3sum's pipe
    (README, Performance).
    """
    assert _blake3 is not None
    digest = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if not size:  # an empty file cannot be mapped
            return digest.hexdigest()
        with mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapping:
            view = memoryview(mapping)
            try:
                position = 0
                for offset, length in [*data_extents(handle.fileno(), size), (size, 0)]:
                    while position < offset:  # a hole
                        step = min(offset - position, len(_MODULE_ZEROS))
                        digest.update(_MODULE_ZEROS[:step])
                        position += step
                    digest.update(view[offset : offset + length])
                    position = offset + length
            finally:
                view.release()
    return digest.hexdigest()


_MODULE_ZEROS = memoryview(bytes(16 * 1024 * 1024))


def file_b3sums(paths: Sequence[str]) -> list[str]:
    """BLAKE3 of each file, in the order given, as `b3sum` prints it.

    Files with few holes go to one `b3sum` call (it hashes each on every
    core); a file with more than STREAMED_HOLES of holes is streamed to its
    own `b3sum -`, holes as zeros. Raises OSError when a file cannot be read
    or `b3sum` is missing or fails.
    """
    if _blake3 is not None:
        return [_module_b3sum(path) for path in paths]
    sums: dict[str, str] = {}
    whole = []
    for path in paths:
        if path in sums or path in whole:
            continue
        size = os.stat(path).st_size
        if size - data_bytes(path) > STREAMED_HOLES:
            sums[path] = _streamed_b3sum(path)
        else:
            whole.append(path)
    if whole:
        found = _b3sum([B3SUM, "--no-names", "--", *whole], None, len(whole))
        sums.update(zip(whole, found, strict=True))
    return [sums[path] for path in paths]


def _b3sum(argv: list[str], feed: Callable[[int], None] | None, count: int) -> list[str]:
    """Run b3sum (with *feed* writing its standard input), return its *count* sums."""
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, f"the {B3SUM} program is missing (apt install b3sum)", B3SUM
        ) from None
    if feed and process.stdin:
        try:
            feed(process.stdin.fileno())
        except BrokenPipeError:
            pass  # b3sum stopped early: its exit status and message say why
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            process.stdin.close()
    assert process.stdout and process.stderr
    stdout = process.stdout.read()  # a few lines: stderr cannot fill its pipe meanwhile
    stderr = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    process.wait()
    sums = stdout.decode("ascii", "replace").split()
    if process.returncode or len(sums) != count:
        why = stderr.decode(errors="replace").strip() or f"exit status {process.returncode}"
        raise OSError(errno.EIO, f"{B3SUM} failed: {why}", " ".join(argv[3:]) or None)
    return sums


def _streamed_b3sum(path: str) -> str:
    with open(path, "rb") as handle:
        source = handle.fileno()
        size = os.fstat(source).st_size

        def feed(pipe: int) -> None:
            with contextlib.suppress(OSError):  # a larger pipe only saves system calls
                fcntl.fcntl(pipe, _F_SETPIPE_SZ, len(_ZEROS))
            position = 0
            for offset, length in [*data_extents(source, size), (size, 0)]:
                while position < offset:  # a hole
                    position += os.write(pipe, _ZEROS[: min(offset - position, len(_ZEROS))])
                end = offset + length
                while position < end:
                    chunk = os.pread(source, min(end - position, len(_ZEROS)), position)
                    if not chunk:  # the file shrank: b3sum's sum is of what was read
                        return
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(pipe, view) :]
                    position += len(chunk)

        return _b3sum([B3SUM, "--no-names", "-"], feed, 1)[0]


class SetExists(Exception):
    """A complete set with the new set's name is already there."""


@dataclass
class SetLayout:
    """Where one set of one domain goes: DOMAIN_DIR/STAMP(.partial)."""

    domain_dir: str
    stamp: str

    @property
    def domain(self) -> str:
        return os.path.basename(self.domain_dir)

    @property
    def partial_path(self) -> str:
        return os.path.join(self.domain_dir, self.stamp + PARTIAL)


@dataclass
class BackupSet(SetLayout):
    """One set being written for one domain, on this host."""

    flush_seconds: float = 0.0  # complete(): until every image was on disk
    # Images whose sum is kept as a tree (b3tree), by name: the previous
    # set's image this one was cloned from, or "" (hashed whole).
    trees: dict[str, str] = field(default_factory=dict)
    hashed: dict[str, int] = field(default_factory=dict)  # complete(): bytes read to sum

    @property
    def final_path(self) -> str:
        return os.path.join(self.domain_dir, self.stamp)

    def choose_stamp(self) -> str:
        """Take the next free name (``next_stamp``) after the sets already
        there; call it with the domain's lock held. Returns the name."""
        existing = os.listdir(self.domain_dir) if os.path.isdir(self.domain_dir) else []
        self.stamp = next_stamp(self.stamp, existing)
        return self.stamp

    def entries(self) -> list[SetEntry]:
        return set_entries(self.domain_dir)

    def check_folder(self) -> None:
        """Raise DomainError when the domain's folder exists and is unsafe."""
        if os.path.lexists(self.domain_dir):
            _refuse_unsafe_folder(self.domain_dir)

    def begin(self) -> str:
        """Create the ``.partial`` folder; returns its path.

        A ``.partial`` of the same name is what an interrupted run left (the
        caller holds the domain's lock): it is replaced. Raises SetExists
        when a complete set of that name exists, DomainError when the
        domain's folder is not safe (see the module's docstring).
        """
        os.makedirs(self.domain_dir, mode=0o700, exist_ok=True)
        _refuse_unsafe_folder(self.domain_dir)
        if os.path.lexists(self.final_path):
            raise SetExists(f"a set named {self.final_path} already exists")
        self.discard()
        os.mkdir(self.partial_path, 0o700)  # fails on anything planted there meanwhile
        made = os.lstat(self.partial_path)
        if not stat.S_ISDIR(made.st_mode) or made.st_uid != os.geteuid():
            raise OSError(errno.EEXIST, f"{self.partial_path} was replaced while created")
        return self.partial_path

    def discard(self) -> None:
        if os.path.islink(self.partial_path):
            os.unlink(self.partial_path)  # never follow a link planted in its place
        else:
            shutil.rmtree(self.partial_path, ignore_errors=True)

    def write_file(self, name: str, text: str) -> None:
        # 0600 like the images: domain.xml holds console passwords (M12)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with os.fdopen(os.open(os.path.join(self.partial_path, name), flags, 0o600), "w") as handle:
            handle.write(text)

    def copy_image(self, source: str, name: str, progress: Callable[[int], None]) -> int:
        """Copy an image into the set; returns the bytes of data copied."""
        return copy_sparse(source, os.path.join(self.partial_path, name), progress)

    def prune(self, policy: retention.Policy | int) -> list[str]:
        return prune(self.domain_dir, policy, self.stamp)

    def remove_stale_partials(self) -> list[str]:
        stale = stale_partials(self.domain_dir, self.stamp)
        for name in stale:
            path = os.path.join(self.domain_dir, name)
            if os.path.islink(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        return stale

    def complete(self) -> str:
        """Checksum and sync every file, write the manifest, take the final name,
        point ``latest`` at it. Returns the final path.

        Once the set has its final name it is complete: a ``latest`` that
        cannot be moved is a Warning (logged here), never a failure.
        """
        # (the trees are written below, once these names are taken)
        names = sorted(n for n in os.listdir(self.partial_path) if n != MANIFEST)
        paths = [os.path.join(self.partial_path, name) for name in names]
        trees = [n for n in names if n in self.trees] if b3tree.available() else []
        # Flushing (I/O, in threads) overlaps hashing (every core, one file
        # after the other); both release the GIL. Measured by `make bench`.
        started = time.monotonic()

        def flush(path: str) -> float:
            sync_file(path)
            return time.monotonic()

        with ThreadPoolExecutor(max_workers=len(paths) or 1) as pool:
            synced = [pool.submit(flush, path) for path in paths]
            whole = [p for n, p in zip(names, paths, strict=True) if n not in trees]
            by_path = dict(zip(whole, file_b3sums(whole), strict=True))
            for name in trees:
                by_path[os.path.join(self.partial_path, name)] = self._tree_sum(name)
            sums = [by_path[path] for path in paths]
            self.flush_seconds = max((f.result() for f in synced), default=started) - started
        lines = [f"{digest}  {name}\n" for digest, name in zip(sums, names, strict=True)]
        manifest = os.path.join(self.partial_path, MANIFEST)
        with open(manifest, "w") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(self.partial_path, self.final_path)
        _sync_directory(self.domain_dir)
        problem = point_latest(self.domain_dir, self.stamp)
        if problem:
            log.warning("%s: the set %s is complete, but %s", self.domain, self.final_path, problem)
        return self.final_path

    def _tree_sum(self, name: str) -> str:
        """The sum of the image *name*, from its clone's base where the
        blocks are shared; keeps its tree beside it for the next night."""
        path = os.path.join(self.partial_path, name)
        base = self.trees[name]
        base_sum = manifest_entry(os.path.dirname(base), os.path.basename(base)) if base else ""
        result = b3tree.hash_file(path, base if base_sum else "", base_sum)
        b3tree.write_tree(b3tree.tree_path(path), result.tree)
        self.hashed[name] = result.bytes_hashed
        log.debug(
            "%s: %s: its sum read %s of %s%s",
            self.domain,
            name,
            human_bytes(result.bytes_hashed),
            human_bytes(result.tree.size),
            f" (the rest shares its blocks with {base})" if base_sum else "",
        )
        return result.digest


def manifest_entry(set_path: str, name: str) -> str:
    """The BLAKE3 that the set *set_path*'s B3SUMS lists for *name*, or ""."""
    try:
        with open(os.path.join(set_path, MANIFEST), encoding="utf-8") as handle:
            for line in handle:
                digest, _, listed = line.rstrip("\n").partition("  ")
                if listed == name:
                    return digest
    except OSError:
        pass
    return ""


def point_latest(domain_dir: str, stamp: str) -> str | None:
    """Make ``latest`` a relative link to *stamp*, atomically; where the
    filesystem refuses links, write the name into the file ``LATEST``.

    Returns None, or what went wrong (the set stays complete): ``latest`` is
    a folder (a copy made by ``cp -rL``), or neither pointer can be written.
    Never leaves a temporary link behind.
    """
    link = os.path.join(domain_dir, LATEST)
    if os.path.isdir(link) and not os.path.islink(link):
        return (
            f"{link} is a folder, not a link (a copy made with cp -rL or rsync -L?), so it "
            f"does not point at the newest set; move it away to have it point there again"
        )
    temporary = os.path.join(domain_dir, "." + LATEST + ".new")
    try:
        for stale in (temporary, link + ".new"):  # the second: left by 0.2
            # A link is removed even when it points at a set (isdir follows it).
            if os.path.islink(stale) or (os.path.lexists(stale) and not os.path.isdir(stale)):
                os.unlink(stale)
        try:
            os.symlink(stamp, temporary)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return _write_latest_file(domain_dir, stamp)
        try:
            os.replace(temporary, link)
        except OSError:
            os.unlink(temporary)
            raise
        if os.path.isfile(os.path.join(domain_dir, LATEST_FILE)):
            _write_latest_file(domain_dir, stamp)  # a pointer file kept from elsewhere
        _sync_directory(domain_dir)
    except OSError as error:
        return f"cannot point {link} at it: {error.strerror}"
    return None


def _write_latest_file(domain_dir: str, stamp: str) -> str | None:
    path = os.path.join(domain_dir, LATEST_FILE)
    temporary = os.path.join(domain_dir, LATEST_FILE + ".new")
    try:
        with open(temporary, "w") as handle:
            handle.write(stamp + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _sync_directory(domain_dir)
    except OSError as error:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        return f"cannot write {path} (this filesystem has no symbolic links): {error.strerror}"
    return None


def latest_set(domain_dir: str) -> str | None:
    """The set ``latest`` (or the ``LATEST`` file) points at, if any."""
    link = os.path.join(domain_dir, LATEST)
    if os.path.islink(link):
        return os.readlink(link)
    try:
        with open(os.path.join(domain_dir, LATEST_FILE)) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _is_complete(set_path: str) -> bool:
    return any(os.path.isfile(os.path.join(set_path, m)) for m in MANIFESTS)


def _has_images(set_path: str) -> bool:
    for manifest in MANIFESTS:
        try:
            with open(os.path.join(set_path, manifest), errors="replace") as handle:
                return manifest_has_images(handle)
        except FileNotFoundError:
            continue
    return False


def set_entries(domain_dir: str) -> list[SetEntry]:
    """The complete sets of a domain, in creation order."""
    if not os.path.isdir(domain_dir):
        return []
    found = []
    for name in os.listdir(domain_dir):
        path = os.path.join(domain_dir, name)
        if is_stamp(name) and not os.path.islink(path) and _is_complete(path):
            found.append(SetEntry(name, _has_images(path)))
    return order_sets(found)


def complete_sets(domain_dir: str) -> list[str]:
    """Names of the complete sets of a domain, oldest first (creation order)."""
    return [e.stamp for e in set_entries(domain_dir)]


def prune(domain_dir: str, policy: retention.Policy | int, current: str = "") -> list[str]:
    """Remove the complete sets that *policy* keeps for no reason (see
    ``sets_to_prune``), never *current*. Returns the names removed."""
    removed = []
    for stamp in sets_to_prune(set_entries(domain_dir), policy, current):
        shutil.rmtree(os.path.join(domain_dir, stamp))
        removed.append(stamp)
    return removed


def stale_partials(domain_dir: str, current: str) -> list[str]:
    """``.partial`` folders left by earlier, interrupted runs."""
    if not os.path.isdir(domain_dir):
        return []
    return sorted(
        name
        for name in os.listdir(domain_dir)
        if name.endswith(PARTIAL) and is_stamp(name[: -len(PARTIAL)]) and name != current + PARTIAL
    )


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The same steps on a remote host, as shell snippets run over ssh.
_CHECK_FOLDER = """
me=$(id -u)
if [ -L "$1" ] && [ "$(stat -c %u -- "$1")" != "$me" ]; then
  echo "$1 is a symbolic link owned by uid $(stat -c %u -- "$1")" >&2; exit 4; fi
owner=$(stat -L -c %u -- "$1")
if [ "$owner" != "$me" ]; then
  echo "$1 is owned by uid $owner, not by uid $me that writes the sets" >&2; exit 4; fi
if [ -n "$(find "$1/" -maxdepth 0 -perm /022)" ]; then
  echo "$1 is writable by group or others (mode $(stat -L -c %a -- "$1"))" >&2; exit 4; fi
"""
_BEGIN = (
    """set -e
mkdir -p -m 700 "$1"
"""
    + _CHECK_FOLDER
    + """
if [ -e "$1/$2" ] || [ -L "$1/$2" ]; then echo "a set named $1/$2 already exists" >&2; exit 3; fi
rm -rf -- "$1/$2.partial"
mkdir -m 700 -- "$1/$2.partial"
"""
)
_COMPLETE = """set -e
cd "$1/$2.partial"
if command -v b3sum >/dev/null; then sums=b3sum manifest=B3SUMS
else sums=sha256sum manifest=SHA256SUMS; fi
"$sums" -- * > "../$2.$manifest.tmp"
sync
mv "../$2.$manifest.tmp" "$manifest"
cd ..
mv "$2.partial" "$2"
set +e
rm -f .latest.new latest.new
if [ -d latest ] && [ ! -L latest ]; then
  echo "warning: $1/latest is a folder, not a link (a copy made with cp -rL or rsync -L?), so it\
 does not point at the newest set; move it away to have it point there again"
elif ln -s "$2" .latest.new 2>/dev/null; then
  mv -T .latest.new latest || { rm -f .latest.new; echo "warning: cannot point $1/latest at it"; }
  if [ -f LATEST ]; then printf '%s\\n' "$2" > LATEST.new && mv LATEST.new LATEST; fi
else
  { printf '%s\\n' "$2" > LATEST.new && mv LATEST.new LATEST; } 2>/dev/null || {
    rm -f LATEST.new
    echo "warning: cannot write $1/LATEST (this filesystem has no symbolic links)"; }
fi
sync
exit 0
"""
# One line per entry of the domain's folder: "images NAME", "empty NAME"
# (a complete set without disk images) or "other NAME".
_LIST = """cd "$1" 2>/dev/null || exit 0
for name in *; do
  [ -e "$name" ] || [ -L "$name" ] || continue
  kind=other
  if [ ! -L "$name" ]; then
    for m in B3SUMS SHA256SUMS; do
      if [ -f "$name/$m" ]; then
        if sed 's/^[^ ]*  //' "$name/$m" | grep -qvxF -e domain.xml -e set.json -e ''
        then kind=images
        else kind=empty; fi
        break
      fi
    done
  fi
  printf '%s %s\\n' "$kind" "$name"
done; exit 0
"""


def parse_listing(output: str) -> tuple[list[str], list[SetEntry]]:
    """Every name, and the complete sets, from the output of ``_LIST``."""
    names, entries = [], []
    for line in output.splitlines():
        kind, _, name = line.partition(" ")
        names.append(name)
        if kind in ("images", "empty") and is_stamp(name):
            entries.append(SetEntry(name, kind == "images"))
    return names, order_sets(entries)


def remote_entries(remote: Remote, domain_dir: str) -> list[SetEntry]:
    """The complete sets of a domain on a remote host, in creation order."""
    return parse_listing(remote.run(_LIST, domain_dir))[1]


@dataclass
class RemoteBackupSet(SetLayout):
    """One set being written for one domain on a remote host (rsync over ssh).

    Same layout, names, order and steps as the local BackupSet; checksums are
    computed on the remote host, from the files that landed there: B3SUMS
    when it has `b3sum`, SHA256SUMS otherwise.
    """

    remote: Remote
    delta: bool = True  # rsync against the previous set's images
    flush_seconds: float = 0.0  # the remote host flushes; not measured here
    basis: str = ""  # the newest complete set with images before this one, found by begin()

    @property
    def final_path(self) -> str:
        return f"{self.remote.label}:{os.path.join(self.domain_dir, self.stamp)}"

    def _listing(self) -> tuple[list[str], list[SetEntry]]:
        return parse_listing(self.remote.run(_LIST, self.domain_dir))

    def choose_stamp(self) -> str:
        names, _ = self._listing()
        self.stamp = next_stamp(self.stamp, names)
        return self.stamp

    def entries(self) -> list[SetEntry]:
        return self._listing()[1]

    def check_folder(self) -> None:
        try:
            self.remote.run('[ -e "$1" ] || [ -L "$1" ] || exit 0' + _CHECK_FOLDER, self.domain_dir)
        except TransferError as error:
            self._refuse(error)
            raise

    def _refuse(self, error: TransferError) -> None:
        if error.status == 4:
            raise DomainError(
                f"{self.domain}: {error}: its sets could be replaced by another user; check "
                f"its contents, then give it to the ssh user with mode 700; domain skipped"
            ) from None

    def begin(self) -> str:
        try:
            self.remote.run(_BEGIN, self.domain_dir, self.stamp)
            _, entries = self._listing()
        except TransferError as error:
            if error.status == 3:
                raise SetExists(str(error)) from None
            self._refuse(error)
            raise OSError(0, str(error)) from None
        earlier = [
            e.stamp
            for e in entries
            if e.has_images and creation_key(e.stamp) < creation_key(self.stamp)
        ]
        self.basis = earlier[-1] if earlier else ""
        return self.partial_path

    def discard(self) -> None:
        try:
            self.remote.run('rm -rf -- "$1"', self.partial_path)
        except TransferError:
            pass  # the next run removes it

    def write_file(self, name: str, text: str) -> None:
        self.remote.run('umask 077; cat > "$1"', os.path.join(self.partial_path, name), stdin=text)

    def copy_image(self, source: str, name: str, progress: Callable[[int], None]) -> int:
        """Send an image into the set; returns the bytes rsync sent over the
        wire (a raw image's holes count as zeros on a first set; a delta
        only what changed)."""
        basis = f"../{self.basis}" if self.delta and self.basis else None
        stats = self.remote.send(source, os.path.join(self.partial_path, name), basis)
        progress(data_bytes(source))
        log.debug(
            "%s: %s: rsync sent %s of new data%s, %s on the wire",
            self.domain,
            name,
            human_bytes(stats.literal),
            f", {human_bytes(stats.matched)} matched in the set {self.basis}" if basis else "",
            human_bytes(stats.sent),
        )
        return stats.sent

    def complete(self) -> str:
        output = self.remote.run(_COMPLETE, self.domain_dir, self.stamp)
        for line in output.splitlines():
            if line.startswith("warning: "):
                log.warning(
                    "%s: the set %s is complete, but %s",
                    self.domain,
                    self.final_path,
                    line.removeprefix("warning: "),
                )
        return self.final_path

    def prune(self, policy: retention.Policy | int) -> list[str]:
        old = sets_to_prune(self.entries(), policy, self.stamp)
        if old:
            self.remote.run('cd "$1" && shift && rm -rf -- "$@"', self.domain_dir, *old)
        return old

    def remove_stale_partials(self) -> list[str]:
        names, _ = self._listing()
        stale = sorted(
            n
            for n in names
            if n.endswith(PARTIAL) and is_stamp(n[: -len(PARTIAL)]) and n != self.stamp + PARTIAL
        )
        if stale:
            self.remote.run('cd "$1" && shift && rm -rf -- "$@"', self.domain_dir, *stale)
        return stale

    def free_bytes(self) -> int:
        output = self.remote.run('df -Pk "$1" | tail -n 1', os.path.dirname(self.domain_dir))
        return int(output.split()[3]) * 1024


AnySet = BackupSet | RemoteBackupSet
