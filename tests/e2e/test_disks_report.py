"""End to end: a disk that is not backed up reaches backupninja's report as a
Warning, and a VM with no disk that can be backed up fails the action."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from backupninja_kvm import destination
from tests.conftest import write_action
from tests.support import sshd, vms
from tests.support.cli import helper
from tests.support.ninja import Ninja
from tests.support.vms import URI, DiskSpec, MiB, Write, reference_image, same_content

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


def test_a_remote_set_of_a_chain_restores_on_its_own(new_vm, scratch):
    """The copies on a remote host are rebased there (with its qemu-img)."""
    keys = os.path.join(scratch, "ssh")
    os.makedirs(keys, mode=0o700)
    server = sshd.start(keys)
    try:
        vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
        vm.write("vda", Write(0x44, MiB, MiB))
        top = os.path.join(vm.directory, "vda.s1.qcow2")
        subprocess.run(
            ["virsh", "-q", "-c", URI, "snapshot-create-as", vm.name, "s1", "--disk-only"]
            + ["--atomic", "--diskspec", f"vda,file={top}"],
            check=True,
            capture_output=True,
        )
        vm.write("vda", Write(0x45, 3 * MiB, MiB))
        backups = os.path.join(scratch, "remote-backups")
        os.makedirs(backups)
        action = write_action(
            os.path.join(scratch, "remote.kvm"),
            f"[source]\ndomains = {vm.name}\n"
            "[dest]\ndest = remote\nhost = 127.0.0.1\nuser = root\n"
            f"port = {server.port}\nsshoptions = {server.options}\ndirectory = {backups}\n",
        )

        result = helper("run", action)
    finally:
        server.stop()

    assert result.returncode == 0, result.stdout + result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("Warning:")] == []
    latest = os.path.realpath(os.path.join(backups, vm.name, "latest"))
    moved = os.path.join(scratch, "elsewhere")
    shutil.move(latest, moved)
    copy = os.path.join(moved, "vda-vda.s1.qcow2")
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", copy],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [layer["filename"] for layer in json.loads(info.stdout)] == [
        copy,
        os.path.join(moved, "vda-vda.qcow2"),
    ]
    frozen = reference_image(
        scratch,
        "frozen",
        DiskSpec("vda", "qcow2", 32 * MiB),
        [Write(0x44, MiB, MiB), Write(0x45, 3 * MiB, MiB)],
    )
    assert same_content(frozen, "qcow2", copy, "qcow2")
    subprocess.run(
        ["virsh", "-q", "-c", URI, "snapshot-delete", vm.name, "s1", "--metadata"],
        check=False,
        capture_output=True,
    )


def test_a_vm_whose_disks_all_become_unsupported_keeps_its_older_sets(new_vm, scratch):
    """C2 of the first-day probe: the VM's storage moves to a block device; the
    nights after that must neither pass as SUCCESS nor prune its last good sets."""
    ninja = Ninja(scratch)
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    action = ninja.action(
        "20-vms.kvm", f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {backups}\nkeep = 1\n"
    )
    good = ninja.run(action)
    assert any("finished action" in line and "SUCCESS" in line for line in good.log.splitlines())
    domain_dir = os.path.join(backups, vm.name)
    [kept] = destination.complete_sets(domain_dir)

    with vms.loop_device(scratch) as device:
        block_only = vms.domain_xml(vm.name, [(DiskSpec("vda", block_device=device), device)])
        vms.connect().defineXML(block_only.replace("<name>", f"<uuid>{vm.uuid}</uuid><name>"))
        nights = []
        for _ in range(2):
            time.sleep(1.1)  # a new second: a set made now would get a new name
            nights.append(ninja.run(action))
        vm.remove()

    for night in nights:
        assert not any("SUCCESS" in line for line in night.log.splitlines()), night.log
        assert any(f"{vm.name}: no disk can be backed up" in line for line in night.lines("Error"))
        assert any("finished action" in line and "ERROR" in line for line in night.lines("Error"))
    assert destination.complete_sets(domain_dir) == [kept]
    assert "vda-vda.qcow2" in os.listdir(os.path.join(domain_dir, kept))


def test_sets_that_lack_a_disk_never_prune_the_sets_that_hold_it(new_vm, scratch):
    """vdb moves to a block device: the nights after that save vda only, say
    so, and keep the last set that holds vdb however many of them pass."""
    ninja = Ninja(scratch)
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    specs = [DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)]
    vm = new_vm(specs, start=False)
    action = ninja.action(
        "20-vms.kvm", f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {backups}\nkeep = 1\n"
    )
    assert ninja.run(action).lines("Warning") == []
    domain_dir = os.path.join(backups, vm.name)
    [whole] = destination.complete_sets(domain_dir)

    with vms.loop_device(scratch) as device:
        moved = [(specs[0], vm.paths["vda"]), (DiskSpec("vdb", block_device=device), device)]
        definition = vms.domain_xml(vm.name, moved)
        vms.connect().defineXML(definition.replace("<name>", f"<uuid>{vm.uuid}</uuid><name>"))
        nights = []
        for _ in range(2):
            time.sleep(1.1)  # a new second: each night makes a set of its own
            nights.append(ninja.run(action))
        vm.remove()

    for night in nights:
        warnings = night.lines("Warning")
        assert any(f"{vm.name}: disk vdb: block disk" in line for line in warnings), night.log
        assert any(
            f"{vm.name}: no old set was removed: this set lacks vdb" in line for line in warnings
        ), night.log
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 3 and sets[0] == whole
    assert "vdb-vdb.raw" in os.listdir(os.path.join(domain_dir, whole))
