"""The merge and the repair never let a foreign exception out, never repeat
a refused bandwidth, and say the state they leave. A fake domain stands in
for libvirt here; tests/integration/test_repair.py proves the same for real."""

from __future__ import annotations

import io
import os
from types import SimpleNamespace
from typing import Any

import pytest

from backupninja_kvm import backup, journal, merge, recovery, report
from backupninja_kvm.disks import Disk
from backupninja_kvm.errors import HypervisorError, OverlayLeftError

BASE = "/srv/vm/web1.qcow2"
OVERLAY = "/srv/vm/web1.bnkvm-20261127T010000.qcow2"
LIVE_ON_OVERLAY = f"""<domain><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{OVERLAY}'/><backingStore type='file'><format type='qcow2'/>
<source file='{BASE}'/></backingStore><target dev='vda' bus='virtio'/></disk>
</devices></domain>"""


class FakeDomain:
    """A running transient domain on its overlay whose blockCommit binding
    raises like libvirt-python does for a bandwidth beyond a C long."""

    name = "web1"
    uuid = "11111111-2222-3333-4444-555555555555"

    def __init__(self, refuse_unlimited: bool = True) -> None:
        self.refuse_unlimited = refuse_unlimited
        self.commits: list[int] = []

    def is_active(self) -> bool:
        return True

    def is_persistent(self) -> bool:
        return False

    def xml(self, inactive: bool = False) -> str:
        return LIVE_ON_OVERLAY

    def start_commit(self, target: str, bandwidth: int = 0) -> None:
        self.commits.append(bandwidth)
        if bandwidth >= 2**63 or self.refuse_unlimited:
            raise OverflowError("Python int too large to convert to C long")


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def log():
    stream = io.StringIO()
    report.setup(stream)
    yield stream
    report.setup()


def settings(**changes) -> Any:
    values: dict[str, Any] = dict(merge="commit", bandwidth=2**64, merge_timeout=5)
    values.update(changes)
    return SimpleNamespace(**values)


def test_a_foreign_exception_in_the_merge_becomes_a_fatal_with_the_true_state():
    domain = FakeDomain(refuse_unlimited=True)
    entry = journal.DiskEntry("vda", BASE, "qcow2", OVERLAY)
    pending = journal.Journal(domain.name, domain.uuid, journal.FROZEN, "commit", (entry,))
    journal.write(pending)
    disk = Disk(target="vda", device="disk", source_type="file", path=BASE, format="qcow2")

    with pytest.raises(OverlayLeftError) as raised:
        backup.merge(domain, [disk], {"vda": OVERLAY}, settings(), pending)  # type: ignore[arg-type]

    text = str(raised.value)
    assert "OverflowError" in text
    assert f"still runs on the overlay(s) {OVERLAY}" in text
    assert "backupninja-kvm recover web1" in text
    assert journal.read(domain.uuid) is not None  # kept for recover


def test_a_commit_refused_with_the_configured_bandwidth_runs_unlimited(log):
    domain = FakeDomain(refuse_unlimited=False)

    used = merge.start_commit(domain, "vda", OVERLAY, 2**64)  # type: ignore[arg-type]

    assert used == 0
    assert domain.commits == [2**64, 0]  # the refused value is not tried again
    assert "committing without a bandwidth limit instead" in log.getvalue()
    assert "OverflowError" in log.getvalue()


def test_libvirts_own_bandwidth_refusal_also_falls_back(log):
    class Limited(FakeDomain):
        def start_commit(self, target: str, bandwidth: int = 0) -> None:
            self.commits.append(bandwidth)
            if bandwidth:
                raise HypervisorError(
                    "numerical overflow: bandwidth must be less than 8796093022207"
                )

    domain = Limited()
    assert merge.start_commit(domain, "vda", OVERLAY, 8796093022207) == 0  # type: ignore[arg-type]
    assert domain.commits == [8796093022207, 0]
    assert "bandwidth must be less than" in log.getvalue()


def test_an_unlimited_commit_refused_leaves_a_fatal_not_a_retry():
    class Refusing(FakeDomain):
        def start_commit(self, target: str, bandwidth: int = 0) -> None:
            self.commits.append(bandwidth)
            raise HypervisorError("block job already active")

    domain = Refusing()
    with pytest.raises(OverlayLeftError) as raised:
        merge.start_commit(domain, "vda", OVERLAY, 0)  # type: ignore[arg-type]
    assert domain.commits == [0]
    assert "still running on the overlay" in str(raised.value)


def test_recover_removes_a_local_partial_and_leaves_a_remote_one_to_the_next_run(tmp_path):
    partial = tmp_path / "web1" / "20261127T010000.partial"
    partial.mkdir(parents=True)
    (partial / "domain.xml").write_text("<domain/>")
    local = journal.Journal("web1", "u", journal.FROZEN, "commit", (), partial=str(partial))

    assert recovery.remove_partial(local) == [f"removed the incomplete set {partial}"]
    assert not partial.exists()
    assert recovery.remove_partial(local) == []  # idempotent

    remote = journal.Journal(
        "web1", "u", journal.FROZEN, "commit", (), partial="/b/web1/x.partial", partial_host="nas"
    )
    (note,) = recovery.remove_partial(remote)
    assert "nas:/b/web1/x.partial" in note and "the next backup removes it" in note


def test_recover_never_removes_what_is_not_a_partial_set(tmp_path):
    precious = tmp_path / "web1" / "20261127T010000"
    precious.mkdir(parents=True)
    entry = journal.Journal("web1", "u", journal.FROZEN, "commit", (), partial=str(precious))
    assert recovery.remove_partial(entry) == []
    assert precious.exists()


def test_a_journal_from_before_the_partial_field_still_reads():
    entry = journal.Journal("web1", "u", journal.FROZEN, "commit", ())
    journal.write(entry)
    path = journal.journal_path("u")
    with open(path) as handle:
        text = handle.read()
    assert '"partial"' in text
    with open(path, "w") as handle:
        handle.write(text.replace(' "partial": "",\n', "").replace(' "partial_host": "",\n', ""))
    read = journal.read("u")
    assert read is not None and read.partial == ""
    assert os.path.exists(path)


def test_the_merge_waits_for_its_commit_with_the_bandwidth_it_runs_with(monkeypatch, log):
    # A commit not ready in time is restarted by wait_ready_and_pivot: with
    # the value that worked, not the one libvirt refused.
    domain = FakeDomain(refuse_unlimited=False)
    entry = journal.DiskEntry("vda", BASE, "qcow2", OVERLAY)
    pending = journal.Journal(domain.name, domain.uuid, journal.MERGING, "commit", (entry,))
    waited: list[int] = []

    class Stop(Exception):
        pass

    def wait_ready_and_pivot(_domain, _target, _overlay, _timeout, bandwidth):
        waited.append(bandwidth)
        raise Stop

    monkeypatch.setattr(merge, "wait_ready_and_pivot", wait_ready_and_pivot)
    disk = Disk(target="vda", device="disk", source_type="file", path=BASE, format="qcow2")

    with pytest.raises(Stop):
        merge.merge_by_commit(domain, [disk], {"vda": OVERLAY}, settings(), pending)  # type: ignore[arg-type]

    assert domain.commits == [2**64, 0]
    assert waited == [0]
