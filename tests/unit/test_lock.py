"""The per-domain lock: one holder at a time, and no file left behind."""

from __future__ import annotations

import fcntl
import os

import pytest

from backupninja_kvm import lock
from backupninja_kvm.errors import DomainError


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def test_lock_files_do_not_accumulate(lock_dir):
    for number in range(5):
        with lock.domain_lock(f"vm{number}", f"uuid-{number}"):
            assert os.listdir(lock_dir) == [f"uuid-{number}.lock"]
    assert os.listdir(lock_dir) == []


def test_a_held_lock_names_its_holder_and_stays(lock_dir):
    with lock.domain_lock("vm", "uuid-1"):
        with pytest.raises(DomainError) as raised, lock.domain_lock("vm", "uuid-1"):
            pass
        assert f"pid {os.getpid()}" in str(raised.value)
        assert os.listdir(lock_dir) == ["uuid-1.lock"]  # the loser does not remove it
    assert os.listdir(lock_dir) == []


def test_a_waiter_on_a_removed_file_takes_the_new_one(lock_dir, monkeypatch):
    """Someone opened the file just before its holder removed it: the flock
    they then get is on a nameless inode, which must not count as the lock."""
    path = lock.lock_path("uuid-1")
    os.makedirs(lock_dir)
    stale = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(path)  # the holder released: the name is gone, our descriptor is not
    real_open = os.open
    opened = []

    def open_first_the_stale_one(file, flags, mode=0o777):
        if file == path and not opened:
            opened.append(stale)
            return os.dup(stale)
        return real_open(file, flags, mode)

    monkeypatch.setattr(os, "open", open_first_the_stale_one)
    with lock.domain_lock("vm", "uuid-1"):
        monkeypatch.setattr(os, "open", real_open)
        # The lock is held on the file that the path names, so a second
        # process opening the path now sees it as held.
        other = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert opened
    os.close(stale)
    assert os.listdir(lock_dir) == []


def test_a_symlink_in_place_of_the_lock_file_is_refused_not_followed(lock_dir, tmp_path):
    os.makedirs(lock_dir)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, lock.lock_path("uuid-1"))
    with pytest.raises(DomainError) as raised, lock.domain_lock("vm", "uuid-1"):
        pass
    assert "cannot open the lock file" in str(raised.value)
    assert victim.read_text() == "precious\n"
