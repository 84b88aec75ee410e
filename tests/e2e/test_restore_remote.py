"""sets, verify and restore of a remote set, over the real sshd on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import write_action
from tests.e2e.test_remote import remote_action
from tests.integration.test_restore import BEFORE, DISKS, references
from tests.support.cli import helper

pytestmark = [pytest.mark.libvirt]


def test_a_remote_set_is_listed_verified_there_and_restored_in_place(
    server,  # noqa: F811 - the fixture
    new_vm,
    scratch,
):
    vm = new_vm(DISKS)
    for target, writes in BEFORE.items():
        vm.write(target, *writes)
    backups = os.path.join(scratch, "remote-backups")  # "remote": this host, over ssh
    os.makedirs(backups)
    path = write_action(os.path.join(scratch, "remote.kvm"), remote_action(backups, vm, server))
    made = helper("run", path)
    assert made.returncode == 0, made.stdout + made.stderr
    expected = references(scratch)

    listed = helper("sets", "-a", path, "--json")
    verified = helper("verify", "-a", path, vm.name)

    assert listed.returncode == 0, listed.stdout + listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["host"] == "root@127.0.0.1" and entry["disks"] == ["vda", "vdb"]
    assert entry["consistency"] == "crash-consistent"
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "4 file(s) match the manifest, 2 image(s) sound" in verified.stdout
    assert json.loads(helper("sets", "-a", path, "--json").stdout)[0]["verify"]["ok"] is True

    vm.stop()
    os.unlink(vm.paths["vda"])
    os.unlink(vm.paths["vdb"])
    restored = helper("restore", "-a", path, vm.name, "--force", "--start")

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert vm.is_running() and vm.tops() == vm.paths
    vm.stop()
    from tests.support.vms import same_content

    assert same_content(vm.paths["vda"], "qcow2", expected["vda"], "qcow2")
    assert same_content(vm.paths["vdb"], "raw", expected["vdb"], "raw")


def test_verify_of_a_remote_set_names_the_damaged_file(server, new_vm, scratch):  # noqa: F811
    vm = new_vm(DISKS[:1])
    vm.write("vda", *BEFORE["vda"])
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    path = write_action(os.path.join(scratch, "remote.kvm"), remote_action(backups, vm, server))
    assert helper("run", path).returncode == 0
    (set_name,) = [n for n in os.listdir(os.path.join(backups, vm.name)) if n.endswith("Z")]
    with open(os.path.join(backups, vm.name, set_name, "vda-vda.qcow2"), "r+b") as handle:
        handle.seek(100 * 1024)
        handle.write(b"\xff")

    verified = helper("verify", "-a", path, vm.name)

    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "vda-vda.qcow2: its content differs from B3SUMS" in verified.stdout


def test_a_block_disk_goes_to_a_remote_destination_sparse_and_as_of_the_freeze(
    server,  # noqa: F811 - the fixture
    new_vm,
    scratch,
):
    from tests.integration.test_block_disks import BEFORE as BLOCK_BEFORE
    from tests.integration.test_block_disks import DEVICE_SIZE, vm_with_a_device
    from tests.support import vms
    from tests.support.vms import DiskSpec, MiB, reference_image, same_content

    with vms.loop_device(scratch, DEVICE_SIZE) as device:
        vm, overlaydir = vm_with_a_device(new_vm, device)
        try:
            for target, writes in BLOCK_BEFORE.items():
                vm.write(target, *writes)
            backups = os.path.join(scratch, "remote-backups")
            os.makedirs(backups)
            text = remote_action(backups, vm, server).replace(
                "[source]\n", f"[source]\noverlaydir = {overlaydir}\noverlay_reserve = 16\n"
            )
            path = write_action(os.path.join(scratch, "remote.kvm"), text)

            made = helper("run", path)
            verified = helper("verify", "-a", path, vm.name)

            assert made.returncode == 0, made.stdout + made.stderr
            assert "Warning" not in made.stdout, made.stdout
            assert verified.returncode == 0, verified.stdout + verified.stderr
            (set_name,) = [n for n in os.listdir(os.path.join(backups, vm.name)) if n.endswith("Z")]
            raw = os.path.join(backups, vm.name, set_name, f"vdb-{os.path.basename(device)}.raw")
            expected = reference_image(
                scratch, "vdb", DiskSpec("vdb", "raw", DEVICE_SIZE), BLOCK_BEFORE["vdb"]
            )
            assert same_content(raw, "raw", expected, "raw")
            assert os.stat(raw).st_blocks * 512 <= 2 * MiB  # rsync --sparse kept the holes
            assert vm.tops() == vm.paths
        finally:
            vm.remove()  # before the device is detached
