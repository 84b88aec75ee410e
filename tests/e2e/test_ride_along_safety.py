"""End to end: a frozen VM never waits for a thaw that is not coming.

Each case runs the real backupninja on a scratch backup.d (freeze, guest
writes during the window, something that stops the run before the thaw,
thaw) and proves that the guard (or, once the guard is killed too, the next
run's repair) puts the VM back on its own images with every guest write,
and that the next report carries a Warning or Error saying what happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from backupninja_kvm import ride
from tests.e2e.test_ride_along import (
    assert_back_on_own_images_with_every_write,
    window_writes,
)
from tests.e2e.test_ride_along import trio as trio  # noqa: F401 - the fixture
from tests.e2e.test_ride_along import vm as vm  # noqa: F401 - the fixture
from tests.support.cli import HELPER
from tests.support.riding import rsync_text, view_mounts, wait_for_guard

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


def ship(trio, scratch, name: str = "20-vms.rsync") -> str:
    dest = os.path.join(scratch, "rsync-dest")
    os.makedirs(os.path.join(dest, "host"), exist_ok=True)
    return trio.ninja.action(name, rsync_text(trio.view, dest))


def set_up(trio, vm, scratch, between: dict[str, str], freeze_extra: str = "") -> None:
    trio.freeze(vm.name, freeze_extra)
    window_writes(trio, vm)
    ship(trio, scratch)
    for name, text in between.items():
        trio.ninja.action(name, text)
    trio.thaw()


def log_of(trio) -> str:
    with open(trio.ninja.logfile) as handle:
        return handle.read()


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if f" {prefix}: " in f" {line}"]


def thaw_started(log: str) -> bool:
    return any("starting action" in line and "90-vms.kvm" in line for line in log.splitlines())


def assert_guard_thawed_everything(trio, vm, scratch) -> ride.Ride:
    record = wait_for_guard(trio.view)
    assert record is not None and record.state == ride.THAWED, record
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert view_mounts(trio.view) == [] and os.listdir(trio.view) == []
    return record


def next_report(trio) -> str:
    """The next backupninja run of the thaw alone relays what the guard did."""
    result = trio.ninja.run(os.path.join(trio.ninja.configdir, "90-vms.kvm"))
    assert ride.read(trio.view) is None
    return result.log


def start_in_background(trio) -> subprocess.Popen:
    env = dict(os.environ, BACKUPNINJA_KVM=HELPER)
    if os.path.exists(trio.ninja.logfile):
        os.unlink(trio.ninja.logfile)
    return subprocess.Popen(
        ["backupninja", "-f", trio.ninja.conf, "--now"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own group: killed with every child it has
    )


def wait_for_action(trio, name: str, timeout: float = 30) -> None:
    """Until backupninja's log shows it started *name* (past the ship and the writes)."""
    deadline = time.monotonic() + timeout
    while name not in log_of(trio) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert name in log_of(trio), log_of(trio)


def wait_frozen(trio, timeout: float = 60) -> ride.Ride:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = ride.read(trio.view)
        if record is not None and record.state == ride.FROZEN:
            return record
        time.sleep(0.1)
    raise AssertionError(f"nothing frozen in {trio.view} after {timeout} s:\n{log_of(trio)}")


def kill_guard_and_backupninja(trio, after: str) -> None:
    """Run backupninja, and once frozen (and the action *after* started),
    SIGKILL its guard, then backupninja with every child it has."""
    process = start_in_background(trio)
    try:
        record = wait_frozen(trio)
        if after:
            wait_for_action(trio, after)
        assert record.guard is not None
        os.kill(record.guard.pid, signal.SIGKILL)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_halt_between_freeze_and_thaw_is_merged_back_by_the_guard(trio, vm, scratch):
    set_up(trio, vm, scratch, {"50-halt.sh": "echo 'Halt: the disk is full'\n"})

    result = trio.ninja.run_all()

    assert not thaw_started(result.log), result.log
    record = assert_guard_thawed_everything(trio, vm, scratch)
    assert any("ended without running" in text for _, text in record.report), record.report
    guard_lines = log_of(trio)  # the guard wrote into backupninja's log after it ended
    thawed = f"{vm.name}: thawed by the guard: frozen"
    assert any(thawed in line for line in guard_lines.splitlines()), guard_lines
    report = next_report(trio)
    warnings = lines(report, "Warning")
    assert any("ended without running" in line and vm.name in line for line in warnings), report


def test_backupninja_killed_after_the_freeze_is_merged_back_by_the_guard(trio, vm, scratch):
    set_up(trio, vm, scratch, {"50-slow.sh": "sleep 60\n"})
    process = start_in_background(trio)
    try:
        wait_frozen(trio)
        deadline = time.monotonic() + 30
        while "50-slow.sh" not in log_of(trio) and time.monotonic() < deadline:
            time.sleep(0.1)  # past the ship and the guest's writes
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert_guard_thawed_everything(trio, vm, scratch)
    report = next_report(trio)
    assert any("ended without running" in line for line in lines(report, "Warning")), report


def test_a_later_action_file_with_bad_permissions_is_merged_back_by_the_guard(trio, vm, scratch):
    # backupninja's check_perms of 60-x.sh ends the run (Fatal, no report): the
    # freeze could not predict it, as 40-chmod.sh makes it group-readable later
    later = trio.ninja.action("60-x.sh", "true\n")
    set_up(trio, vm, scratch, {"40-chmod.sh": f"chmod 644 {later}\n"})

    result = trio.ninja.run_all()

    assert not thaw_started(result.log), result.log
    assert_guard_thawed_everything(trio, vm, scratch)
    os.chmod(later, 0o600)
    report = next_report(trio)
    assert any("ended without running" in line for line in lines(report, "Warning")), report


def test_max_frozen_passing_while_a_ship_still_reads_is_an_error_naming_the_torn_copy(
    trio, vm, scratch
):
    # A ship that holds the raw image open for longer than max_frozen plus
    # the guard's grace for readers: the guard merges, and says the copy is torn.
    held = os.path.join(trio.view, vm.name, "vdb-vdb.raw")
    reader = f"exec 3< {held}\nsleep 25\nexec 3<&-\n"
    set_up(trio, vm, scratch, {"30-slow-ship.sh": reader}, freeze_extra="max_frozen = 2s\n")

    result = trio.ninja.run_all()  # the thaw runs after the guard: it relays its lines

    errors = lines(result.log, "Error")
    assert any("max_frozen passed" in line for line in errors), result.log
    torn = [line for line in errors if held in line and "may be torn" in line]
    assert torn and ("sleep" in torn[0] or "bash" in torn[0]), result.log
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert view_mounts(trio.view) == [] and ride.read(trio.view) is None


def test_a_killed_guard_is_replaced_by_the_thaw(trio, vm, scratch):
    set_up(trio, vm, scratch, {"50-kill-guard.sh": "sleep 3\n"})
    process = start_in_background(trio)
    record = wait_frozen(trio)
    assert record.guard is not None
    os.kill(record.guard.pid, signal.SIGKILL)
    assert process.wait(timeout=300) == 0

    log = log_of(trio)
    assert any("its guard is gone" in line for line in lines(log, "Warning")), log
    assert any(f"{vm.name}: thawed: frozen" in line for line in lines(log, "Info")), log
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert ride.read(trio.view) is None and view_mounts(trio.view) == []


def test_guard_and_backupninja_both_killed_the_next_run_repairs(trio, vm, scratch):
    set_up(trio, vm, scratch, {"50-slow.sh": "sleep 60\n"})
    kill_guard_and_backupninja(trio, after="")
    assert vm.tagged_files() != []  # still frozen: nobody is left to thaw it

    status = subprocess.run([HELPER, "status"], capture_output=True, text=True)
    assert status.returncode == 4 and "the guard is gone" in status.stdout, status.stdout

    os.unlink(os.path.join(trio.ninja.configdir, "50-slow.sh"))
    result = trio.ninja.run_all()  # the next night: the freeze repairs first

    warnings = lines(result.log, "Warning")
    assert any("its guard is gone" in line for line in warnings), result.log
    assert result.lines("Error") == [] and result.lines("Fatal") == [], result.log
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert ride.read(trio.view) is None and view_mounts(trio.view) == []


def test_recover_thaws_a_freeze_whose_guard_and_backupninja_are_gone(trio, vm, scratch):
    set_up(trio, vm, scratch, {"50-slow.sh": "sleep 60\n"})
    kill_guard_and_backupninja(trio, after="50-slow.sh")

    recovered = subprocess.run([HELPER, "recover"], capture_output=True, text=True)

    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "its guard is gone; thawing it now" in recovered.stdout, recovered.stdout
    assert f"{vm.name}: thawed: frozen" in recovered.stdout, recovered.stdout
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert ride.read(trio.view) is None and view_mounts(trio.view) == []
    status = subprocess.run([HELPER, "status"], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout
