"""Round trips against the real libvirtd: back up a VM with known data, then
``sets``, ``verify`` and ``restore`` it through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

import libvirt
import pytest

from backupninja_kvm import config, setinfo
from tests.integration.test_sets import action
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import (
    UNDEFINE,
    DiskSpec,
    MiB,
    Write,
    connect,
    reference_image,
    same_content,
    sha256,
)

pytestmark = pytest.mark.libvirt

DISKS = [DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)]
BEFORE = {
    "vda": [Write(0x11, 0, MiB), Write(0x12, 5 * MiB, MiB)],
    "vdb": [Write(0x21, 2 * MiB, MiB)],
}
DURING = {"vda": [Write(0x33, 0, 64 * 1024)], "vdb": [Write(0x44, 2 * MiB, 64 * 1024)]}
MAC = "52:54:00:aa:bb:01"


def backed_up_vm(new_vm, scratch, interface: bool = False):
    """A running VM with known data, backed up once while the guest writes
    into the window; returns (vm, action file, the set's path)."""
    vm = new_vm(DISKS, start=not interface)
    if interface:
        xml = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(
            "</devices>",
            f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>"
            "</devices>",
        )
        connect().defineXML(xml)
        vm.start()
    for target, writes in BEFORE.items():
        vm.write(target, *writes)
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    path = action(scratch, vm, backups)

    def window(_domain, _overlays):
        for target, writes in DURING.items():
            vm.write(target, *writes)

    outcome = back_up(vm, config.load(path), window)
    return vm, path, outcome.set_path


def references(scratch: str) -> dict[str, str]:
    return {
        spec.target: reference_image(scratch, f"ref-{spec.target}", spec, BEFORE[spec.target])
        for spec in DISKS
    }


@pytest.fixture
def copies():
    """Names of domains a test restored as copies: removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            domain = connect().lookupByName(name)
        except libvirt.libvirtError:
            continue
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(UNDEFINE)


def test_restore_in_place_brings_back_the_freeze_instant_and_the_domain_starts(new_vm, scratch):
    vm, path, set_path = backed_up_vm(new_vm, scratch)
    expected = references(scratch)
    vm.stop()
    os.unlink(vm.paths["vdb"])  # the disk is lost
    with open(vm.paths["vda"], "r+b") as handle:  # the other one ruined
        handle.write(b"\0" * 4096)

    refused = helper("restore", "-a", path, vm.name)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "give --force" in refused.stdout, refused.stdout

    result = helper("restore", "-a", path, vm.name, "--force", "--start")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{vm.name}: restored from {vm.name}/{os.path.basename(set_path)}" in result.stdout
    assert vm.is_running()
    assert vm.tops() == vm.paths  # the same paths, no overlay
    vm.stop()
    assert same_content(vm.paths["vda"], "qcow2", expected["vda"], "qcow2")
    assert same_content(vm.paths["vdb"], "raw", expected["vdb"], "raw")
    # The ruined image was kept aside and named; the lost one had nothing to keep.
    aside = [n for n in os.listdir(vm.directory) if ".before-restore-" in n]
    assert len(aside) == 1 and aside[0].startswith("vda.qcow2.before-restore-"), aside
    assert os.path.join(vm.directory, aside[0]) in result.stdout
    assert not [n for n in os.listdir(vm.directory) if n.startswith(".bnkvm-restore-")]


def test_restore_refuses_a_running_domain(new_vm, scratch):
    vm, path, _ = backed_up_vm(new_vm, scratch)
    before = {target: os.stat(p).st_mtime_ns for target, p in vm.paths.items()}

    result = helper("restore", "-a", path, vm.name, "--force")

    assert result.returncode == 2
    assert f"{vm.name}: the domain is running; shut it down" in result.stdout, result.stdout
    assert {target: os.stat(p).st_mtime_ns for target, p in vm.paths.items()} == before
    assert vm.is_running() and vm.tops() == vm.paths


def test_restore_as_a_copy_runs_beside_the_running_original(new_vm, scratch, copies):
    vm, path, set_path = backed_up_vm(new_vm, scratch, interface=True)
    original_xml = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    original_files = {p: os.stat(p).st_ino for p in vm.paths.values()}
    expected = references(scratch)
    copy_name = vm.name + "-copy"
    copies.append(copy_name)

    result = helper("restore", set_path, "--as", copy_name, "--start")

    assert result.returncode == 0, result.stdout + result.stderr
    copy = connect().lookupByName(copy_name)
    assert copy.isActive() and vm.is_running()
    assert copy.UUIDString() != vm.uuid
    root = ET.fromstring(copy.XMLDesc(0))
    macs = [m.get("address") for m in root.iter("mac")]
    assert macs and MAC not in macs
    files = {
        d.find("target").get("dev"): d.find("source").get("file")
        for d in root.iter("disk")
        if d.get("device") == "disk"
    }
    assert files == {
        "vda": os.path.join(vm.directory, f"{copy_name}-vda-vda.qcow2"),
        "vdb": os.path.join(vm.directory, f"{copy_name}-vdb-vdb.raw"),
    }
    # The original is untouched: same definition, same files.
    assert vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == original_xml
    assert {p: os.stat(p).st_ino for p in vm.paths.values()} == original_files
    assert vm.tops() == vm.paths
    copy.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    assert same_content(files["vda"], "qcow2", expected["vda"], "qcow2")
    assert same_content(files["vdb"], "raw", expected["vdb"], "raw")


def test_sets_lists_each_set_with_its_disks_consistency_and_checks(new_vm, scratch):
    vm, path, set_path = backed_up_vm(new_vm, scratch)

    verified = helper("verify", "-a", path, vm.name)
    listed = helper("sets", "-a", path, "--json")
    table = helper("sets", "-a", path, vm.name)

    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{vm.name}/{os.path.basename(set_path)}: verified: " in verified.stdout
    assert listed.returncode == 0, listed.stderr
    (entry,) = [e for e in json.loads(listed.stdout) if e["domain"] == vm.name]
    assert entry["set"] == os.path.basename(set_path)
    assert entry["disks"] == ["vda", "vdb"]
    assert entry["consistency"] == "crash-consistent"  # no guest agent
    assert entry["verify"]["ok"] is True
    assert entry["size"] > 2 * MiB
    info = setinfo.read(set_path)
    assert entry["freeze_time"] == info.freeze_time
    assert [(f.name, f.role, f.original_path) for f in info.files] == [
        ("vda-vda.qcow2", "disk", vm.paths["vda"]),
        ("vdb-vdb.raw", "disk", vm.paths["vdb"]),
    ]
    assert table.returncode == 0
    assert "vda,vdb" in table.stdout and "crash-consistent" in table.stdout
    assert "ok " in table.stdout  # verified


def damage_flip(set_path: str) -> str:
    path = os.path.join(set_path, "vdb-vdb.raw")
    with open(path, "r+b") as handle:
        handle.seek(2 * MiB + 100)
        byte = handle.read(1)
        handle.seek(2 * MiB + 100)
        handle.write(bytes([byte[0] ^ 0x01]))
    return "vdb-vdb.raw: its content differs from B3SUMS"


def damage_truncate(set_path: str) -> str:
    os.truncate(os.path.join(set_path, "vdb-vdb.raw"), 3 * MiB)
    return "vdb-vdb.raw: 3145728 bytes, but the raw image had 16777216"


def damage_remove(set_path: str) -> str:
    os.unlink(os.path.join(set_path, "vda-vda.qcow2"))
    return "vda-vda.qcow2: missing (listed in B3SUMS)"


def damage_header(set_path: str) -> str:
    with open(os.path.join(set_path, "vda-vda.qcow2"), "r+b") as handle:
        handle.write(b"XXXX")  # the qcow2 magic
    return "vda-vda.qcow2: not a sound qcow2 image"


@pytest.mark.parametrize("damage", [damage_flip, damage_truncate, damage_remove, damage_header])
def test_verify_names_the_damaged_file_and_restore_refuses_the_set(damage, new_vm, scratch):
    vm, path, set_path = backed_up_vm(new_vm, scratch)
    vm.stop()
    before = {p: sha256(p) for p in vm.paths.values()}
    expected = damage(set_path)

    verified = helper("verify", "-a", path, vm.name)
    restored = helper("restore", "-a", path, vm.name, "--force")

    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "DAMAGED" in verified.stdout and expected in verified.stdout, verified.stdout
    assert setinfo.read_checks(set_path)["verify"]["ok"] is False
    assert restored.returncode == 2, restored.stdout
    assert "refused" in restored.stdout or "differs from B3SUMS" in restored.stdout
    assert "nothing restored" in restored.stdout or "refused" in restored.stdout
    assert {p: sha256(p) for p in vm.paths.values()} == before  # nothing replaced
    assert not [n for n in os.listdir(vm.directory) if ".before-restore-" in n]


def test_verify_yes_verifies_each_new_set_after_the_merge(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    path = action(scratch, vm, backups, verify="yes")

    result = helper("run", path)

    assert result.returncode == 0, result.stdout + result.stderr
    (summary,) = [line for line in result.stdout.splitlines() if f"{vm.name}: backed up" in line]
    assert summary.endswith("(verified)"), summary
    assert ": verified: 3 file(s) match the manifest, 1 image(s) sound" in result.stdout
    (set_name,) = [n for n in os.listdir(os.path.join(backups, vm.name)) if n.endswith("Z")]
    checks = setinfo.read_checks(os.path.join(backups, vm.name, set_name))
    assert checks["verify"]["ok"] is True


def test_a_new_set_that_fails_verification_prunes_no_older_set(new_vm, scratch, monkeypatch):
    from backupninja_kvm import verify

    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    settings = config.load(action(scratch, vm, backups, verify="yes", keep="1"))
    first = back_up(vm, settings, stamp="20261127T010000Z")
    assert first.verified and not first.problems

    real = verify.verify_set

    def damaged(ref, sums=True):  # the storage lost a byte of the new set
        found = real(ref, sums)
        found.problems.append("vda-vda.qcow2: its content differs from B3SUMS")
        return found

    monkeypatch.setattr(verify, "verify_set", damaged)
    second = back_up(vm, settings, stamp="20261128T010000Z")

    assert second.problems and "DAMAGED" in second.problems[0]
    assert sorted(os.listdir(os.path.join(backups, vm.name))) == [
        "20261127T010000Z",
        "20261128T010000Z",
        "latest",
    ]
    assert vm.tops() == vm.paths


def test_a_chain_restores_as_a_copy_into_another_folder_its_layers_linked(new_vm, scratch, copies):
    from tests.integration.test_disks import (
        ADMIN_CHAIN_WRITES,
        _vm_on_an_admin_chain,
        chain_files,
    )
    from tests.integration.test_disks import action as disks_action

    vm, _top = _vm_on_an_admin_chain(new_vm)
    assert helper("run", disks_action(scratch, vm, backing="chain")).returncode == 0
    set_path = os.path.realpath(os.path.join(scratch, "backups", vm.name, "latest"))
    folder = os.path.join(vm.directory, "restored")
    os.mkdir(folder)
    name = vm.name + "-chain"
    copies.append(name)

    result = helper("restore", set_path, "--as", name, "--to", folder, "--start")

    assert result.returncode == 0, result.stdout + result.stderr
    top = os.path.join(folder, f"{name}-vda-vda.s1.qcow2")
    assert chain_files(top) == [top, os.path.join(folder, f"{name}-vda-vda.qcow2")]
    assert connect().lookupByName(name).isActive()
    connect().lookupByName(name).destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    expected = reference_image(
        scratch, "ref", DiskSpec("vda", "qcow2", 32 * MiB), ADMIN_CHAIN_WRITES
    )
    assert same_content(top, "qcow2", expected, "qcow2")


def test_a_qcow2_with_a_data_file_restores_in_place_pointing_at_its_own_data_file(new_vm, scratch):
    from tests.integration.test_disks import action as disks_action
    from tests.support.vms import data_file_path

    spec = DiskSpec("vda", "qcow2", 32 * MiB, data_file=True)
    vm = new_vm([spec])
    writes = [Write(0x81, 0, 8 * MiB)]
    vm.write("vda", *writes)
    path = disks_action(scratch, vm)
    assert helper("run", path).returncode == 0
    vm.stop()
    image, data = vm.paths["vda"], data_file_path(vm.paths["vda"])
    os.unlink(image)
    os.unlink(data)

    result = helper("restore", "-a", path, vm.name, "--force")

    assert result.returncode == 0, result.stdout + result.stderr
    shown = subprocess.run(
        ["qemu-img", "info", "--output=json", image], capture_output=True, text=True, check=True
    )
    info = json.loads(shown.stdout)
    assert info["format-specific"]["data"]["data-file"] == data
    expected = reference_image(scratch, "ref", DiskSpec("vda", "qcow2", 32 * MiB), writes)
    assert same_content(image, "qcow2", expected, "qcow2")


def test_a_restore_in_place_waits_for_no_backup_it_refuses_while_one_holds_the_lock(
    new_vm, scratch
):
    from backupninja_kvm import lock

    vm, path, _ = backed_up_vm(new_vm, scratch)
    vm.stop()
    held = lock.acquire(vm.name, vm.uuid)
    try:
        result = helper("restore", "-a", path, vm.name, "--force")
    finally:
        lock.release(held, vm.uuid)

    assert result.returncode == 2
    assert "holds this domain's lock" in result.stdout, result.stdout
    assert not [n for n in os.listdir(vm.directory) if "restore" in n]
