"""End to end: a disk that is not backed up reaches backupninja's report as a
Warning, and a VM with no disk that can be backed up fails the action."""

from __future__ import annotations

import os

import pytest

from backupninja_kvm import destination
from tests.support import vms
from tests.support.ninja import Ninja
from tests.support.vms import DiskSpec, MiB, Write

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


def test_a_skipped_disk_is_a_warning_and_a_vm_without_backable_disk_an_error(new_vm, scratch):
    ninja = Ninja(scratch)
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    with vms.loop_device(scratch) as data_device, vms.loop_device(scratch) as only_device:
        partly = new_vm(
            [DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", block_device=data_device)]
        )
        partly.write("vda", Write(0x11, 0, MiB))
        blockonly = new_vm([DiskSpec("vda", block_device=only_device)])
        action = ninja.action(
            "20-vms.kvm",
            f"[source]\ndomains = {partly.name}, {blockonly.name}\n[dest]\ndirectory = {backups}\n",
        )

        result = ninja.run(action)
        partly.remove()
        blockonly.remove()

    warnings = result.lines("Warning")
    assert any(
        f"{partly.name}: disk vdb: block disk" in line
        and f"({data_device})" in line
        and "not in the set" in line
        for line in warnings
    ), result.log
    errors = result.lines("Error")
    assert any(
        f"{blockonly.name}: no disk can be backed up" in line and only_device in line
        for line in errors
    ), result.log
    assert any("finished action" in line and "ERROR" in line for line in errors), result.log
    assert not any("SUCCESS" in line for line in result.log.splitlines())
    assert any(f"{partly.name}: backed up vda" in line for line in result.lines("Info"))
    assert len(destination.complete_sets(os.path.join(backups, partly.name))) == 1
    assert destination.complete_sets(os.path.join(backups, blockonly.name)) == []
