"""Changed blocks to a remote destination over a real sshd on 127.0.0.1:
the changes alone go over the wire, and the remote host builds the new set
from its previous one (a clone, then qemu-img commit of the changes)."""

from __future__ import annotations

import os
import subprocess

import pytest

from backupninja_kvm import changed, config, destination, faults, setinfo
from tests.conftest import write_action
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import DiskSpec, MiB, Write, reference_image, same_content

pytestmark = pytest.mark.libvirt

SPEC = DiskSpec("vda", "qcow2", 64 * MiB)


def test_a_remote_night_sends_only_the_changes_and_the_set_is_whole(server, new_vm, scratch):
    vm = new_vm([SPEC, DiskSpec("vdb", "raw", 16 * MiB)])
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    text = (
        f"[source]\ndomains = {vm.name}\n[dest]\ndest = remote\nhost = 127.0.0.1\n"
        f"port = {server.port}\nsshoptions = {server.options}\ndirectory = {backups}\n"
    )
    settings = config.load(write_action(os.path.join(scratch, "remote.kvm"), text))
    nights = [
        [Write(0x11, 0, 16 * MiB), Write(0x12, 40 * MiB, 8 * MiB)],
        [Write(0x21, 3 * MiB, MiB), Write(0x22, 41 * MiB, 64 * 1024)],
        [Write(0x31, 60 * MiB, 2 * MiB)],
    ]
    zeros = Write(0, 10 * MiB, MiB)  # a zero write over data: must be zeros in the set
    outcomes = []
    for number, writes in enumerate(nights):
        vm.write("vda", *writes)
        if number == 2:
            vm.write("vda", zeros)
        outcomes.append(back_up(vm, settings, stamp=f"2026120{number + 1}T010000"))
    first, second, third = outcomes
    assert "vda" not in first.changes
    assert second.changes["vda"] == (MiB + 64 * 1024, MiB + 64 * 1024)  # to the granule
    assert second.bytes_copied < 4 * MiB  # sent: the changes, not the disk
    assert "vda changed blocks only" in second.summary() and "vdb whole" in second.summary()
    assert third.changes["vda"][0] == 3 * MiB
    applied = [w for writes in nights for w in writes] + [zeros]
    expected = reference_image(scratch, "expected", SPEC, applied)
    latest = os.path.join(backups, vm.name, os.path.basename(third.set_path.split(":", 1)[1]))
    assert same_content(expected, "qcow2", os.path.join(latest, "vda-vda.qcow2"), "qcow2")
    subprocess.run(["b3sum", "--quiet", "-c", "B3SUMS"], cwd=latest, check=True)
    assert not [n for n in os.listdir(latest) if n.startswith(".bnkvm-")]
    tracking = next(f for f in setinfo.read(latest).disks() if f.target == "vda").tracking
    assert tracking is not None and tracking.how == "changed"
    info = subprocess.run(
        ["qemu-img", "info", "-U", os.path.join(latest, "vda-vda.qcow2")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "bitmaps:" not in info.stdout  # our bitmaps are not in the set's copy
    ours = [c.getName() for c in vm.domain.listAllCheckpoints() if c.getName().startswith("bnkvm")]
    assert ours == [tracking.checkpoint]


def changes_folders() -> list[str]:
    return [n for n in os.listdir(changed.CHANGES_ROOT) if n.startswith("bnkvm-changes-")]


@pytest.mark.parametrize("point", faults.REMOTE_CHANGED_POINTS)
def test_a_kill_at_each_new_point_of_a_remote_night_leaves_the_next_night_correct(
    server, new_vm, scratch, point
):
    vm = new_vm([SPEC])
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    text = (
        f"[general]\nmerge_timeout = 60\n[source]\ndomains = {vm.name}\n[dest]\ndest = remote\n"
        f"host = 127.0.0.1\nport = {server.port}\nsshoptions = {server.options}\n"
        f"directory = {backups}\nkeep = 9\n"
    )
    action_file = write_action(os.path.join(scratch, "remote.kvm"), text)
    domain_dir = os.path.join(backups, vm.name)
    phases = [
        [Write(0x11, 0, MiB), Write(0x12, 9 * MiB, 3 * MiB)],
        [Write(0x21, MiB // 2, 64 * 1024), Write(0x22, 20 * MiB, MiB)],
        [Write(0x31, 5 * MiB, 4 * 1024)],
        [Write(0x41, 30 * MiB, 2 * MiB)],
    ]

    def night(number: int, **fault: str):
        vm.write("vda", *phases[number])
        return helper("run", action_file, **fault)

    before = set(changes_folders())
    first = night(0)
    assert first.returncode == 0, first.stdout
    stopped = night(1, fault=point)
    assert stopped.returncode == -9, stopped.stdout + stopped.stderr
    for number in (2, 3):
        done = night(number)
        assert done.returncode == 0, done.stdout
        assert set(changes_folders()) <= before, "the killed night's changes are still here"
        set_path = os.path.join(domain_dir, destination.complete_sets(domain_dir)[-1])
        writes = [w for phase in phases[: number + 1] for w in phase]
        expected = reference_image(scratch, f"expected-{number}", SPEC, writes)
        image = os.path.join(set_path, "vda-vda.qcow2")
        assert same_content(expected, "qcow2", image, "qcow2"), (point, number)
        subprocess.run(["b3sum", "--quiet", "-c", "B3SUMS"], cwd=set_path, check=True)
        tracking = next(f for f in setinfo.read(set_path).disks() if f.target == "vda").tracking
        assert tracking is not None
        ours = [c.getName() for c in vm.domain.listAllCheckpoints()]
        assert [c for c in ours if c.startswith("bnkvm")] == [tracking.checkpoint]
    assert tracking.how == "changed", tracking  # the kill never broke the chain for good
    assert not [n for n in os.listdir(domain_dir) if n.endswith(".partial")]
    assert subprocess.run(["pgrep", "-f", "qemu-storage-daemon.*" + vm.name]).returncode == 1
