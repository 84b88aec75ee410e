"""On a filesystem with reflinks, a clone's tree reuses the leaves that still
share the previous image's blocks and rehashes every other one: the sum stays
b3sum's, whatever was written, punched or truncated."""

from __future__ import annotations

import fcntl
import os
import random
import subprocess

import pytest

from backupninja_kvm import b3tree
from backupninja_kvm.changed import FICLONE
from tests.support.vms import xfs_filesystem

LEAF = b3tree.LEAF
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts an XFS loop device")


def b3sum(path: str) -> str:
    return subprocess.run(
        ["b3sum", "--no-names", path], check=True, capture_output=True, text=True
    ).stdout.strip()


def clone(source: str, target: str) -> None:
    with open(source, "rb") as src, open(target, "xb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())


@pytest.fixture
def xfs(tmp_path):
    with xfs_filesystem(str(tmp_path), 512 * 1024 * 1024) as mount:
        yield mount


def test_a_clone_rehashes_only_the_leaves_it_no_longer_shares(xfs):
    rng = random.Random(12)
    base = os.path.join(xfs, "base.qcow2")
    with open(base, "wb") as handle:
        handle.truncate(64 * LEAF + 512)
        for index in range(0, 64, 2):
            handle.seek(index * LEAF)
            handle.write(rng.randbytes(LEAF))
        handle.seek(64 * LEAF)
        handle.write(rng.randbytes(512))
    first = b3tree.hash_file(base)
    assert first.digest == b3sum(base)
    b3tree.write_tree(b3tree.tree_path(base), first.tree)

    night = os.path.join(xfs, "night.qcow2")
    clone(base, night)
    touched = {3, 10, 11, 40}
    with open(night, "r+b") as handle:
        for index in touched:
            handle.seek(index * LEAF + rng.randrange(LEAF - 4096))
            handle.write(rng.randbytes(4096))
        os.fsync(handle.fileno())
    second = b3tree.hash_file(night, base, first.digest)
    assert second.digest == b3sum(night)
    # Leaf 3 was a hole: writing it made a data leaf; the others were data.
    assert second.bytes_hashed == len(touched) * LEAF

    # A punched hole, an overwrite with the same bytes (new blocks all the
    # same), a longer file: each leaf concerned is hashed again.
    b3tree.write_tree(b3tree.tree_path(night), second.tree)
    third_path = os.path.join(xfs, "third.qcow2")
    clone(night, third_path)
    with open(third_path, "r+b") as handle:
        fcntl_punch(handle.fileno(), 20 * LEAF, 4096)
        handle.seek(30 * LEAF)
        same = os.pread(handle.fileno(), LEAF, 30 * LEAF)
        handle.write(same)
        handle.seek(70 * LEAF)
        handle.write(b"grown")
        os.fsync(handle.fileno())
    third = b3tree.hash_file(third_path, night, second.digest)
    assert third.digest == b3sum(third_path)
    # 20 and 30 changed, 64 (the old partial tail) and 70 are new, 65-69 holes.
    assert third.bytes_hashed == 3 * LEAF + len(b"grown")

    # A base changed in place whose times were put back: its change time
    # still differs from the one its tree recorded, so nothing is reused.
    b3tree.write_tree(b3tree.tree_path(third_path), third.tree)
    before = os.stat(third_path)
    with open(third_path, "r+b") as handle:  # its own block: written in place
        os.pwrite(handle.fileno(), b"rot", 70 * LEAF)
    os.utime(third_path, ns=(before.st_atime_ns, before.st_mtime_ns))
    touched = os.path.join(xfs, "touched.qcow2")
    clone(third_path, touched)  # shares the changed block: only the stamp tells
    again = b3tree.hash_file(touched, third_path, third.digest)
    assert again.digest == b3sum(touched)
    assert again.bytes_hashed == 35 * LEAF + len(b"grown")  # every data leaf

    # A tree that does not match its manifest's sum is not trusted.
    fourth_path = os.path.join(xfs, "fourth.qcow2")
    clone(night, fourth_path)
    fourth = b3tree.hash_file(fourth_path, night, first.digest)  # the wrong sum
    assert fourth.digest == b3sum(fourth_path)
    # Every data leaf is read again: 32 written at first, 3 and 11, the tail.
    assert fourth.bytes_hashed == 34 * LEAF + 512


def fcntl_punch(fd: int, offset: int, length: int) -> None:
    subprocess.run(
        [
            "fallocate",
            "--punch-hole",
            "--keep-size",
            "--offset",
            str(offset),
            "--length",
            str(length),
            f"/proc/self/fd/{fd}",
        ],
        check=True,
        pass_fds=(fd,),
    )
