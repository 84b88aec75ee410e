"""BLAKE3 sums that a changed-block night updates from what changed.

The manifest (B3SUMS) holds each image's BLAKE3, the sum that ``b3sum``
prints, so that ``b3sum -c`` and ``verify`` check every set alike. Hashing a
whole image every night would read all of it, however little the guest
wrote: a 400 GiB image that changed 5 GiB would still cost 400 GiB of reads.

BLAKE3 is a tree hash. Its sum is the root of a binary tree over 1 KiB
chunks, and any aligned power-of-two run of chunks is a subtree whose
"chaining value" can be kept and combined again (section 2.1 of the BLAKE3
paper; the Rust crate's ``hazmat`` module does the same). So beside each
image of a tracked disk the set keeps ``NAME.b3tree``: the chaining value of
every LEAF (1 MiB) of the file, 32 bytes per MiB. The sum is the merge of
those leaves, exactly the sum ``b3sum`` computes (tested against it).

The next night's image starts as a reflink clone of this one, and only the
changed blocks are written into it. Which leaves still hold the previous
image's bytes is read from the filesystem, not assumed: a leaf is reused when
FIEMAP maps it, in both files, to the same physical extents flagged shared,
with no flag that makes the mapping uncertain (delayed allocation, inline,
encoded...).
Shared blocks are copy-on-write, so two files that map an offset to the same
block read the same bytes there. Every other leaf, and all of a file on a
filesystem without reflinks, is read and hashed again. The previous tree is
used only when its merge equals the sum its manifest lists for that image and
its size is the image's: a damaged or foreign tree means a whole hash.

The compiled part (``_b3tree``) is the reference C implementation that
Debian ships in librust-blake3-dev (setup.py). Without it, ``available()`` is
false and sums are of the whole file (destination.file_b3sums).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from backupninja_kvm.transfer import data_extents, replace_file

try:
    from backupninja_kvm import _b3tree  # type: ignore[attr-defined]
except ImportError:  # built without the BLAKE3 C sources: whole-file sums
    _b3tree = None

LEAF = 1 << 20  # bytes per kept chaining value: a power of two of 1 KiB chunks
CHUNK = 1024
SUFFIX = ".b3tree"
MAGIC = b"bnkvm-b3tree 2\n"
# leaf size, file size, and the file's inode, mtime and ctime when it was hashed
# (ctime: no utime can set it back, so a file changed since is never trusted)
_HEADER = struct.Struct("<QQQqq")
_OUT = 32
_BATCH = 64  # leaves per task: few futures, even for a 400 GiB image

# linux/fiemap.h
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_UNWRITTEN = 0x800
_EXTENT_SHARED = 0x2000
# unknown location, delayed allocation, encoded, encrypted, not aligned,
# inline, tail-packed: the physical address does not name the bytes
_EXTENT_UNSURE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
_FIEMAP = struct.Struct("<QQIIII")
_EXTENT = struct.Struct("<QQQQQIIII")
_EXTENTS_PER_CALL = 1024


def available() -> bool:
    """Whether sums can be kept as trees (the compiled module is there)."""
    return _b3tree is not None


@dataclass(frozen=True)
class Tree:
    """The leaves' chaining values of a file of *size* bytes."""

    size: int
    leaves: bytes  # 32 bytes per LEAF, in order
    stamp: tuple[int, int, int] = (0, 0, 0)  # the file's (inode, mtime_ns, ctime_ns) then

    @property
    def count(self) -> int:
        return len(self.leaves) // _OUT

    def root(self) -> str:
        """The file's BLAKE3, as b3sum prints it. Only for two leaves or more
        (a smaller file's sum comes from its bytes, see hash_file)."""
        assert _b3tree is not None and self.count >= 2
        return _b3tree.merge(self.leaves, True).hex()


@dataclass
class Result:
    """What hash_file found: the sum, the tree to keep, the bytes read."""

    digest: str
    tree: Tree
    bytes_hashed: int  # bytes read and hashed again (the rest was reused)


def leaf_count(size: int) -> int:
    return max(1, -(-size // LEAF))


def tree_path(image: str) -> str:
    return image + SUFFIX


def hash_file(path: str, base: str = "", base_sum: str = "", workers: int = 0) -> Result:
    """BLAKE3 of the file *path* and its tree.

    With *base* (the previous set's image that *path* was cloned from) and
    *base_sum* (that image's sum in its manifest), the leaves that still map
    to the base's blocks are taken from the base's tree, when that tree is
    sound. Raises OSError when *path* cannot be read.
    """
    assert _b3tree is not None
    workers = workers or os.cpu_count() or 1
    fd = _open_file(path)
    try:
        status = os.fstat(fd)
        size, stamp = status.st_size, _stamp(status)
        count = leaf_count(size)
        extents = fiemap(fd)
        reused: dict[int, bytes] = {}
        if base and count >= 2:
            reused = _reusable(fd, size, extents, base, base_sum)
        if count == 1:  # one leaf: the sum is that of its bytes
            data = os.pread(fd, size, 0) if size else b""
            tree = Tree(size, _b3tree.subtree_cv(data, 0) if size else bytes(_OUT), stamp)
            return Result(_b3tree.subtree_cv(data, 0, True).hex(), tree, size)
        todo = [i for i in range(count) if i not in reused]
        if extents is not None:
            empty = _empty_leaves(extents, size, todo)
        else:  # no FIEMAP (NFS, CIFS...): holes from SEEK_DATA, nothing reused
            empty = _empty_leaves([(o, 0, n, 0) for o, n in data_extents(fd, size)], size, todo)
        found: dict[int, bytes] = {}

        def work(batch: list[int]) -> list[tuple[int, bytes]]:
            buffer = bytearray(LEAF)
            out = []
            for index in batch:
                offset = index * LEAF
                length = min(LEAF, size - offset)
                if index in empty:
                    data: bytes | memoryview = _ZEROS[:length]
                else:
                    view = memoryview(buffer)[:length]
                    got = os.preadv(fd, [view], offset)
                    if got != length:  # the file shrank while it was read
                        raise OSError(errno.EIO, f"{path}: short read at {offset}")
                    data = view
                out.append((index, _b3tree.subtree_cv(data, offset // CHUNK)))
            return out

        batches = [todo[i : i + _BATCH] for i in range(0, len(todo), _BATCH)]
        with ThreadPoolExecutor(max_workers=min(workers, len(batches) or 1)) as pool:
            for done in pool.map(work, batches):
                found.update(done)
        found.update(reused)
        tree = Tree(size, b"".join(found[i] for i in range(count)), stamp)
        hashed = sum(min(LEAF, size - i * LEAF) for i in todo if i not in empty)
        return Result(tree.root(), tree, hashed)
    finally:
        os.close(fd)


_ZEROS = memoryview(bytes(LEAF))


def write_tree(path: str, tree: Tree) -> None:
    """Write *tree* to *path* through a private temporary file and a rename
    (the set's folder may be writable by others: no link is followed)."""
    replace_file(path, MAGIC + _HEADER.pack(LEAF, tree.size, *tree.stamp) + tree.leaves, ".b3tree-")


def read_tree(path: str) -> Tree | None:
    """The tree kept in *path*; None when it is missing, not a regular file,
    of another format or leaf size, or not exactly whole."""
    try:
        fd = _open_file(path)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        length = os.fstat(fd).st_size
        head = handle.read(len(MAGIC) + _HEADER.size)
        if not head.startswith(MAGIC) or len(head) != len(MAGIC) + _HEADER.size:
            return None
        leaf, size, *stamp = _HEADER.unpack(head[len(MAGIC) :])
        if leaf != LEAF or length != len(head) + leaf_count(size) * _OUT:
            return None
        leaves = handle.read(leaf_count(size) * _OUT)
    if len(leaves) != leaf_count(size) * _OUT:
        return None
    return Tree(size, leaves, (stamp[0], stamp[1], stamp[2]))


def _open_file(path: str) -> int:
    """An open, read-only descriptor of the regular file *path*: no link is
    followed, and a FIFO or device planted there neither blocks nor is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path}: not a regular file")
    return fd


def _stamp(status: os.stat_result) -> tuple[int, int, int]:
    return status.st_ino, status.st_mtime_ns, status.st_ctime_ns


def _reusable(
    fd: int, size: int, extents: list[tuple[int, int, int, int]] | None, base: str, base_sum: str
) -> dict[int, bytes]:
    """index -> chaining value, for the leaves of the open file *fd* that map
    to the same blocks as in *base*, whose tree is sound."""
    tree = read_tree(tree_path(base))
    if tree is None or extents is None or tree.count < 2 or tree.root() != base_sum:
        return {}
    try:
        base_fd = _open_file(base)
    except OSError:
        return {}
    try:
        status = os.fstat(base_fd)
        # the base as it was hashed: not written, touched or replaced since
        if status.st_size != tree.size or _stamp(status) != tree.stamp:
            return {}
        base_extents = fiemap(base_fd)
    finally:
        os.close(base_fd)
    if base_extents is None:
        return {}
    # Whole leaves present in both files; the last one only if it ends alike.
    common = min(size, tree.size) // LEAF
    if size == tree.size:
        common = leaf_count(size)
    mine = _by_leaf(extents, common)
    theirs = _by_leaf(base_extents, common)
    return {
        index: tree.leaves[index * _OUT : (index + 1) * _OUT]
        for index in range(common)
        if mine[index] is not None and mine[index] == theirs[index]
    }


def fiemap(fd: int) -> list[tuple[int, int, int, int]] | None:
    """(logical, physical, length, flags) of each extent of the open file, in
    order, after the file's dirty data reached its blocks; None when the
    filesystem does not map its files (FIEMAP)."""
    extents: list[tuple[int, int, int, int]] = []
    start = 0
    while True:
        request = bytearray(_FIEMAP.size + _EXTENT.size * _EXTENTS_PER_CALL)
        _FIEMAP.pack_into(
            request, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0, _EXTENTS_PER_CALL, 0
        )
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return None
            raise
        mapped = _FIEMAP.unpack_from(request)[3]
        if not mapped:
            return extents
        last = False
        for number in range(mapped):
            fields = _EXTENT.unpack_from(request, _FIEMAP.size + number * _EXTENT.size)
            logical, physical, length, flags = fields[0], fields[1], fields[2], fields[5]
            extents.append((logical, physical, length, flags))
            last = last or bool(flags & _EXTENT_LAST)
        following = extents[-1][0] + extents[-1][2]
        if last or following <= start:
            return extents
        start = following


def _by_leaf(
    extents: list[tuple[int, int, int, int]], count: int
) -> list[tuple[tuple[int, int, int, bool], ...] | None]:
    """For each of the first *count* leaves: its mapping, as runs of
    (offset in the leaf, physical address, length, unwritten), merged where
    contiguous, so that two files that map a leaf alike compare equal; None
    where a flag makes the mapping uncertain or a run is not shared."""
    runs: list[list[tuple[int, int, int, bool]] | None] = [[] for _ in range(count)]
    for logical, physical, length, flags in extents:
        first, end = logical // LEAF, min(count, -(-(logical + length) // LEAF))
        for index in range(first, end):
            kept = runs[index]
            if kept is None:
                continue
            # Only blocks the filesystem says are shared (reflinked) prove equal
            # bytes: some filesystems report no real address (CIFS reports
            # the file offset), and never the shared flag.
            if flags & _EXTENT_UNSURE or not flags & _EXTENT_SHARED:
                runs[index] = None
                continue
            low = max(logical, index * LEAF)
            high = min(logical + length, (index + 1) * LEAF)
            unwritten = bool(flags & _EXTENT_UNWRITTEN)
            run = (low - index * LEAF, physical + low - logical, high - low, unwritten)
            last = kept[-1] if kept else None
            if (  # contiguous in the file and on disk: one run
                last is not None
                and last[3] == unwritten
                and last[0] + last[2] == run[0]
                and last[1] + last[2] == run[1]
            ):
                kept.pop()
                run = (last[0], last[1], last[2] + run[2], unwritten)
            kept.append(run)
    return [tuple(r) if r is not None else None for r in runs]


def _empty_leaves(
    extents: list[tuple[int, int, int, int]], size: int, todo: Iterable[int]
) -> set[int]:
    """The leaves among *todo* that hold no written data (holes, unwritten
    extents): they are hashed from zeros, not read."""
    written = array.array("b", bytes(leaf_count(size)))
    for logical, _physical, length, flags in extents:
        if flags & _EXTENT_UNWRITTEN and not flags & _EXTENT_UNSURE:
            continue
        for index in range(logical // LEAF, min(len(written), -(-(logical + length) // LEAF))):
            written[index] = 1
    return {index for index in todo if not written[index]}
