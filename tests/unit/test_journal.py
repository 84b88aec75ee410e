"""The journal: atomic, versioned, per domain UUID."""

from __future__ import annotations

import json
import os

import pytest

from backupninja_kvm import journal
from backupninja_kvm.journal import DiskEntry, Journal, JournalError

UUID = "6f8f1602-1cde-4b32-89df-ade991e029db"


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "STATE_DIR", str(tmp_path))
    return tmp_path


def sample() -> Journal:
    return Journal(
        "web1",
        UUID,
        journal.FROZEN,
        "commit",
        (
            DiskEntry("vda", "/srv/web1.qcow2", "qcow2", "/srv/web1.bnkvm-20261127T010000.qcow2"),
            DiskEntry("vdb", "/srv/data.img", "raw", "/srv/data.img.bnkvm-20261127T010000.qcow2"),
        ),
    )


def test_a_journal_reads_back_as_written_with_each_disks_merge_state(state_dir):
    written = sample().at(journal.MERGING).with_disk("vda", journal.DISK_MERGED)
    journal.write(written)

    assert journal.read(UUID) == written
    assert [d.state for d in written.disks] == [journal.DISK_MERGED, journal.DISK_FROZEN]
    assert journal.all_journals() == [UUID]
    assert os.listdir(state_dir / "journal") == [f"{UUID}.json"]  # no temporary left


def test_no_journal_reads_as_none_and_remove_is_idempotent():
    assert journal.read(UUID) is None
    journal.remove(UUID)
    journal.write(sample())
    journal.remove(UUID)
    journal.remove(UUID)
    assert journal.read(UUID) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "unreadable"),
        (json.dumps({"schema": 99}), "schema 99"),
        (json.dumps({"schema": 1, "disks": [{"target": "vda"}]}), "malformed"),
    ],
)
def test_an_unusable_journal_is_an_error_and_is_left_in_place(state_dir, content, message):
    path = state_dir / "journal" / f"{UUID}.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(JournalError, match=message):
        journal.read(UUID)
    assert path.exists()


def test_a_journal_without_the_quiesce_field_reads_as_not_quiesced(state_dir):
    # Journals written before quiesce existed lack the field.
    written = sample()
    journal.write(written)
    path = state_dir / "journal" / f"{UUID}.json"
    data = json.loads(path.read_text())
    del data["quiesce"]
    path.write_text(json.dumps(data))

    assert journal.read(UUID) == written
    assert written.quiesce is False
