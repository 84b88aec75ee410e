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
        (json.dumps({"schema": 1, "domain": "web1"}), "malformed"),
        (json.dumps([1, 2]), "malformed"),
        (json.dumps("text"), "malformed"),
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


def test_a_journal_without_the_recorded_chain_fields_reads_with_none(state_dir):
    # Journals of 0.2.0 lack base_backing and persistent_base.
    journal.write(sample())
    path = state_dir / "journal" / f"{UUID}.json"
    data = json.loads(path.read_text())
    for disk in data["disks"]:
        del disk["base_backing"], disk["persistent_base"]
    path.write_text(json.dumps(data))

    read = journal.read(UUID)
    assert read is not None
    assert [(d.base_backing, d.persistent_base) for d in read.disks] == [(None, None)] * 2


ORIGINAL = "/srv/web1.qcow2"
NIGHT1 = "/srv/web1.bnkvm-20261127T010000.qcow2"
NIGHT2 = "/srv/web1.bnkvm-20261128T010000.qcow2"


def test_only_an_image_our_pull_made_is_ever_superseded():
    first = journal.Pulled().after_pull({ORIGINAL}, {NIGHT1})
    # The administrator's original was never ours: it is not to delete.
    assert first == journal.Pulled(frozenset({NIGHT1}), frozenset())
    second = first.after_pull({NIGHT1}, {NIGHT2})
    assert second == journal.Pulled(frozenset({NIGHT2}), frozenset({NIGHT1}))


def test_the_record_of_pulled_images_reads_back_and_goes_away_when_empty(state_dir):
    record = journal.Pulled(frozenset({NIGHT2}), frozenset({NIGHT1}))
    journal.write_pulled(UUID, record)
    assert journal.read_pulled(UUID) == record
    journal.write_pulled(UUID, journal.Pulled())
    assert not os.path.exists(journal.pulled_path(UUID))
    assert journal.read_pulled(UUID) == journal.Pulled()


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"schema": 1})])
def test_an_unusable_record_of_pulled_images_is_an_error(state_dir, content):
    path = state_dir / "pulled" / f"{UUID}.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(JournalError, match="record of pulled images"):
        journal.read_pulled(UUID)
