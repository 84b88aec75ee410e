"""BLAKE3 trees: the sum of the leaves is b3sum's, for every shape of file;
what is kept and what is reused is checked, never assumed."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import blake3
import pytest

from backupninja_kvm import b3tree

LEAF = b3tree.LEAF
pytestmark = pytest.mark.skipif(
    not b3tree.available(), reason="make venv builds _b3tree (needs librust-blake3-dev)"
)


def b3sum(path: str) -> str:
    return subprocess.run(
        ["b3sum", "--no-names", path], check=True, capture_output=True, text=True
    ).stdout.strip()


SIZES = [
    0,
    1,
    1023,
    1024,
    1025,
    LEAF - 1,
    LEAF,
    LEAF + 1,
    2 * LEAF,
    2 * LEAF + 1024,
    3 * LEAF - 1,
    5 * LEAF + 7,
    8 * LEAF,
    9 * LEAF + LEAF // 2,
]


@pytest.mark.parametrize("size", SIZES)
def test_the_sum_is_b3sum_s_for_every_length(tmp_path, size):
    path = str(tmp_path / "image")
    with open(path, "wb") as handle:
        handle.write(random.Random(size).randbytes(size))
    result = b3tree.hash_file(path)
    with open(path, "rb") as handle:
        assert result.digest == b3sum(path) == blake3.blake3(handle.read()).hexdigest()
    assert result.tree.size == size
    assert result.tree.count == b3tree.leaf_count(size)


def test_holes_and_preallocated_space_hash_as_zeros_without_being_read(tmp_path):
    path = str(tmp_path / "sparse")
    with open(path, "wb") as handle:
        handle.truncate(12 * LEAF + 5)
        handle.seek(3 * LEAF + 100)
        handle.write(os.urandom(5000))
        os.posix_fallocate(handle.fileno(), 6 * LEAF, 2 * LEAF)  # unwritten extents
        handle.seek(12 * LEAF)
        handle.write(b"tail!")
    result = b3tree.hash_file(path)
    assert result.digest == b3sum(path)
    # Only the two leaves with data were read.
    assert result.bytes_hashed == LEAF + 5


def test_a_kept_tree_reads_back_and_a_damaged_one_is_refused(tmp_path):
    path = str(tmp_path / "image")
    with open(path, "wb") as handle:
        handle.write(os.urandom(3 * LEAF + 10))
    tree = b3tree.hash_file(path).tree
    kept = b3tree.tree_path(path)
    b3tree.write_tree(kept, tree)
    assert b3tree.read_tree(kept) == tree
    assert [n for n in os.listdir(tmp_path) if n.startswith(".b3tree-")] == []
    with open(kept, "r+b") as handle:
        handle.truncate(os.path.getsize(kept) - 1)
    assert b3tree.read_tree(kept) is None
    os.unlink(kept)
    os.symlink(path, kept)  # a link planted in the set's folder is not followed
    assert b3tree.read_tree(kept) is None


def test_a_copy_without_shared_blocks_reuses_nothing(tmp_path):
    base = str(tmp_path / "base")
    with open(base, "wb") as handle:
        handle.write(os.urandom(4 * LEAF))
    first = b3tree.hash_file(base)
    b3tree.write_tree(b3tree.tree_path(base), first.tree)
    copy = str(tmp_path / "copy")
    shutil.copyfile(base, copy)  # same bytes, its own blocks
    with open(copy, "r+b") as handle:
        handle.seek(LEAF + 3)
        handle.write(b"changed")
    again = b3tree.hash_file(copy, base, first.digest)
    assert again.digest == b3sum(copy)
    assert again.bytes_hashed == 4 * LEAF


S = 0x2000  # FIEMAP_EXTENT_SHARED


def test_mappings_compare_equal_only_when_every_byte_maps_alike():
    M = LEAF
    # The same shared blocks, split differently into extents, map a leaf alike.
    one = [(0, 10 * M, 2 * M, S)]
    split = [(0, 10 * M, M // 2, S), (M // 2, 10 * M + M // 2, M + M // 2, S)]
    assert b3tree._by_leaf(one, 2) == b3tree._by_leaf(split, 2)
    # A block written elsewhere (copy on write) changes its leaf only.
    moved = [(0, 10 * M, M, S), (M, 50 * M, 4096, 0), (M + 4096, 11 * M + 4096, M - 4096, S)]
    a, b = b3tree._by_leaf(one, 2), b3tree._by_leaf(moved, 2)
    assert a[0] == b[0] and a[1] != b[1]
    # A hole punched, or an extent made unwritten, is a change.
    holed = [(0, 10 * M, M, S), (M + 4096, 11 * M + 4096, M - 4096, S)]
    assert b3tree._by_leaf(holed, 2)[1] != a[1]
    unwritten = [(0, 10 * M, M, S), (M, 11 * M, M, 0x800 | S)]
    assert b3tree._by_leaf(unwritten, 2)[1] != a[1]
    # Delayed allocation or inline data: the address says nothing.
    assert b3tree._by_leaf([(0, 0, 2 * M, 0x4 | S)], 2) == [None, None]
    assert b3tree._by_leaf([(0, 10 * M, M, S), (M, 0, 100, 0x200 | S)], 2)[1] is None
    # Blocks not flagged shared prove nothing: CIFS reports the file offset
    # as the address, the same in any two files.
    assert b3tree._by_leaf([(0, 0, 2 * M, 0)], 2) == [None, None]
    # A leaf that is a hole in both files maps alike.
    assert b3tree._by_leaf([(0, 10 * M, M, S)], 2)[1] == ()


def test_a_filesystem_that_reports_offsets_as_addresses_reuses_nothing(tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    with open(base, "wb") as handle:
        handle.write(os.urandom(3 * LEAF))
    first = b3tree.hash_file(base)
    b3tree.write_tree(b3tree.tree_path(base), first.tree)
    copy = str(tmp_path / "copy")
    shutil.copyfile(base, copy)
    with open(copy, "r+b") as handle:
        handle.write(b"changed")
    # what the kernel's smb3_fiemap returns for either file
    monkeypatch.setattr(b3tree, "fiemap", lambda fd: [(0, 0, 3 * LEAF, 0x1)])
    again = b3tree.hash_file(copy, base, first.digest)
    assert again.digest == b3sum(copy)
    assert again.bytes_hashed == 3 * LEAF


def test_a_tree_file_that_is_not_a_plain_whole_file_is_refused_without_harm(tmp_path):
    kept = str(tmp_path / "image.b3tree")
    os.mkfifo(kept)  # would block a plain open()
    assert b3tree.read_tree(kept) is None
    os.unlink(kept)
    header = b3tree.MAGIC + b3tree._HEADER.pack(b3tree.LEAF, 1 << 62, 0, 0, 0)
    with open(kept, "wb") as handle:
        handle.write(header + bytes(64))  # claims an exabyte of leaves
    assert b3tree.read_tree(kept) is None


def test_without_fiemap_holes_still_come_from_zeros(tmp_path, monkeypatch):
    path = str(tmp_path / "sparse")
    with open(path, "wb") as handle:
        handle.truncate(6 * LEAF)
        handle.seek(4 * LEAF + 10)
        handle.write(b"data")
    monkeypatch.setattr(b3tree, "fiemap", lambda fd: None)  # as on NFS
    result = b3tree.hash_file(path)
    assert result.digest == b3sum(path)
    assert result.bytes_hashed == LEAF
