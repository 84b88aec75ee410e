"""Calendar retention for real: a destination with many planted sets, pruned
by a real backup of a test VM through the helper, and ``run --test``
announcing the same sets beforehand."""

from __future__ import annotations

import os

import pytest

from backupninja_kvm import destination
from tests.integration.test_sets import SMALL, action, backups_of
from tests.support.cli import helper

pytestmark = pytest.mark.libvirt

POLICY = {
    "keep": "2",
    "keep_daily": "3",
    "keep_weekly": "2",
    "keep_monthly": "3",
    "keep_yearly": "2",
}
DESCRIBED = "keep = 2, keep_daily = 3, keep_weekly = 2, keep_monthly = 3, keep_yearly = 2"

# Sets from 2023 to March 2025, all older than the run's own set (made now):
# the run's set is "keep 1" and uses up its day, week, month and year, so
# what the rules keep below does not depend on the day the test runs.
MARCH = [f"202503{day:02d}T010000Z" for day in range(20, 32)]
KEPT = {
    "20250331T130000Z": "keep 2",  # the second set of 31 March (a Monday, ISO week 14)
    "20250330T010000Z": "daily 1",  # 31 March is used up by keep 2: its 01:00 set goes
    "20250329T010000Z": "daily 2",
    "20250328T010000Z": "daily 3",
    "20250325T120000Z": "no images",  # newer than the oldest kept set: stays
    "20250323T010000Z": "weekly 1",  # week 13 holds the daily sets: week 12's newest
    "20250228T010000Z": "weekly 2",
    "20250131T010000Z": "monthly 1",  # February holds weekly 2: January's newest
    "20241231T010000Z": "monthly 2",
    "20240630T010000Z": "monthly 3",
    "20240301T010000Z": "no images",
    "20231215T010000": "yearly 1",  # a local-time name of 0.2; 2024 is used up by monthly 2
}
REMOVED = [
    "20231201T010000",  # without images, older than every kept set
    "20240110T010000",
    "20250215T010000Z",
    *(s for s in MARCH if s not in KEPT),
]
WITHOUT_IMAGES = ("20231201T010000", "20240301T010000Z", "20250325T120000Z")


def plant(domain_dir: str, stamp: str, image: str) -> None:
    """A complete set as a run leaves it, with a manifest listing *image*
    (or only domain.xml)."""
    path = os.path.join(domain_dir, stamp)
    os.makedirs(path, mode=0o700)
    names = ["domain.xml"] if stamp in WITHOUT_IMAGES else ["domain.xml", image]
    with open(os.path.join(path, destination.MANIFEST), "w") as handle:
        handle.writelines(f"{'0' * 64}  {name}\n" for name in names)


def test_a_backup_prunes_exactly_the_sets_no_rule_keeps_and_the_test_run_said_so(
    new_vm, scratch, monkeypatch
):
    monkeypatch.setenv("TZ", "UTC")  # the periods are local time: pin the run's zone
    vm = new_vm(SMALL)
    backups = backups_of(scratch)
    domain_dir = os.path.join(backups, vm.name)
    os.makedirs(domain_dir, mode=0o700)
    for stamp in [*KEPT, *REMOVED]:
        plant(domain_dir, stamp, f"vda-{vm.name}.qcow2")
    path = action(scratch, vm, backups, **POLICY)

    test_run = helper("run", "--test", path)

    assert test_run.returncode == 0, test_run.stdout + test_run.stderr
    planned = [line for line in test_run.stdout.splitlines() if "would remove" in line]
    assert len(planned) == 1, test_run.stdout
    announced, _, kept = planned[0].partition("; keeps ")
    assert announced.endswith(
        f"{vm.name}: {DESCRIBED} would remove {len(REMOVED)} old set(s): {', '.join(REMOVED)}"
    ), planned
    reasons = dict(item.rstrip(")").split(" (", 1) for item in kept.split("), "))
    assert list(reasons.values())[0] == "keep 1"  # the set the run would make
    assert dict(list(reasons.items())[1:]) == KEPT
    assert sorted(destination.complete_sets(domain_dir)) == sorted([*KEPT, *REMOVED])

    result = helper("run", path)

    assert result.returncode == 0, result.stdout + result.stderr
    made = os.readlink(os.path.join(domain_dir, "latest"))
    assert made.endswith("Z") and made > max(KEPT)
    assert sorted(destination.complete_sets(domain_dir)) == sorted([*KEPT, made])
    assert any(
        f"removed {len(REMOVED)} old set(s) that {DESCRIBED} does not keep" in line
        for line in result.stdout.splitlines()
        if line.startswith("Info:")
    ), result.stdout
    assert vm.tops() == vm.paths and vm.tagged_files() == []
