"""Ride-along test set-up: a scratch backup.d with a freeze, ship actions of
backupninja's own handlers and a thaw, and the cleanup of what a failed test
may leave (a guard, view mounts, the ride record)."""

from __future__ import annotations

import os
import signal
import time

from backupninja_kvm import ride, view
from tests.support.ninja import Ninja
from tests.support.vms import TestVM, Write

WHEN = "when = everyday at 01:00\n"


def freeze_text(view_dir: str, domains: str, extra: str = "") -> str:
    return (
        f"{WHEN}\n[general]\nstage = freeze\nview = {view_dir}\n{extra}\n"
        f"[source]\ndomains = {domains}\n"
    )


def thaw_text(view_dir: str, merge: str = "commit") -> str:
    return f"{WHEN}\n[general]\nstage = thaw\nview = {view_dir}\nmerge = {merge}\n"


def rsync_text(view_dir: str, mountpoint: str, options: str = "") -> str:
    options = options or "-aS --delete --recursive --out-format=file:%n"
    return (
        f"{WHEN}\n[general]\nlog = {mountpoint}/rsync.log\nmountpoint = {mountpoint}\n"
        f"backupdir = host\nformat = mirror\n\n[source]\nfrom = local\n"
        f"include = {view_dir}\nexclude = *.bnkvm-*.qcow2\nrsync_options = {options}\n\n"
        f"[dest]\ndest = local\n"
    )


def borg_text(view_dir: str, repository: str) -> str:
    return (
        f"{WHEN}\ntestconnect = no\n\n[source]\ninit = yes\ninclude = {view_dir}\n"
        "create_options = --chunker-params fixed,4194304 --sparse\nprune = no\n\n"
        f"[dest]\nhost = localhost\ndirectory = {repository}\narchive = vms\n"
        "compression = lz4\nencryption = none\n"
    )


def restic_text(view_dir: str, repository: str, password_file: str) -> str:
    return (
        f"{WHEN}\n[general]\nrun_backup = yes\nrun_forget = no\nrun_check = no\n"
        f"repository = {repository}\npassword_file = {password_file}\ninit = yes\n\n"
        f"[backup]\ninclude = {view_dir}\n"
    )


def guest_write_script(vm: TestVM, target: str, *writes: Write) -> str:
    """A backupninja .sh action writing into the running guest's disk."""
    alias = vm._alias(target)
    lines = [
        f"virsh -q qemu-monitor-command --hmp {vm.name} "
        f"'qemu-io -d /machine/peripheral/{alias}/virtio-backend \"{w.qemu_io()}\"'"
        for w in writes
    ]
    return "\n".join(lines) + "\n"


def wait_for_guard(view_dir: str, timeout: float = 120) -> ride.Ride | None:
    """Wait until the view's guard is gone; returns the ride record left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = ride.read(view_dir)
        if record is None or not ride.guard_alive(record):
            return record
        time.sleep(0.2)
    raise AssertionError(f"the guard of {view_dir} is still running after {timeout} s")


def view_mounts(view_dir: str) -> list[str]:
    return [m.mount_point for m in view.mounted(view_dir)]


def clean_up(view_dir: str) -> None:
    """Kill a guard, take down the view, forget the ride record."""
    try:
        record = ride.read(view_dir)
    except ride.RideError:
        record = None
    if record is not None and record.guard is not None and record.guard.alive():
        os.kill(record.guard.pid, signal.SIGKILL)
    if os.path.isdir(view_dir):
        for name in os.listdir(view_dir):
            try:
                view.take_down(view_dir, name, wait=0)
            except view.ViewError:
                pass
    ride.remove(view_dir)
    try:
        os.unlink(ride.socket_path(view_dir))
    except FileNotFoundError:
        pass


class Trio:
    """backup.d with 10-vms.kvm (freeze), ship actions, 90-vms.kvm (thaw)."""

    def __init__(self, ninja: Ninja, scratch: str) -> None:
        self.ninja = ninja
        self.scratch = scratch
        self.view = os.path.join(scratch, "view")

    def freeze(self, domains: str, extra: str = "", name: str = "10-vms.kvm") -> str:
        return self.ninja.action(name, freeze_text(self.view, domains, extra))

    def thaw(self, merge: str = "commit", name: str = "90-vms.kvm") -> str:
        return self.ninja.action(name, thaw_text(self.view, merge))
