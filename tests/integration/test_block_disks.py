"""Block-device disks against the real libvirtd and QEMU: a loop device
stands in for an LVM volume (no device-mapper on these machines; both are
``<disk type='block'>``). Frozen on an overlay file in overlaydir, copied
into a sparse raw image, committed back into the device, recovered after a
kill like a file disk."""

from __future__ import annotations

import json
import os

import pytest

from backupninja_kvm import config
from tests.conftest import write_action
from tests.integration.test_live_backup import Window, check_manifest
from tests.integration.test_restore import copies  # noqa: F401 - a fixture
from tests.support import vms
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import DiskSpec, MiB, Write, reference_image, same_content

pytestmark = pytest.mark.libvirt

DEVICE_SIZE = 64 * MiB
BEFORE = {"vda": [Write(0x11, 0, MiB)], "vdb": [Write(0x21, MiB, MiB)]}
DURING = {"vda": [Write(0x12, 4 * MiB, MiB)], "vdb": [Write(0x22, 3 * MiB, MiB)]}
AFTER = {"vda": [Write(0x13, 6 * MiB, MiB)], "vdb": [Write(0x23, 5 * MiB, MiB)]}


@pytest.fixture
def device(scratch):
    # Requested before new_vm: the VM is removed before the device is detached.
    with vms.loop_device(scratch, DEVICE_SIZE) as path:
        yield path


def vm_with_a_device(new_vm, device: str):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", block_device=device)])
    overlaydir = os.path.join(vm.directory, "overlays")
    os.mkdir(overlaydir, 0o755)  # QEMU's user must reach it
    return vm, overlaydir


def action_text(scratch: str, vm, overlaydir: str) -> str:
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups, exist_ok=True)
    return (
        "[general]\nmerge_timeout = 60\n"
        f"[source]\ndomains = {vm.name}\noverlaydir = {overlaydir}\noverlay_reserve = 16\n"
        f"[dest]\ndirectory = {backups}\n"
    )


def action_file(scratch: str, vm, overlaydir: str) -> str:
    folder = os.path.join(scratch, "actions")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return write_action(os.path.join(folder, "vm.kvm"), action_text(scratch, vm, overlaydir))


def writes(*phases: dict[str, list[Write]], target: str) -> list[Write]:
    return [write for phase in phases for write in phase.get(target, [])]


def reference(scratch: str, name: str, spec: DiskSpec, *phases) -> str:
    return reference_image(scratch, name, spec, writes(*phases, target=spec.target))


def test_a_block_disk_is_backed_up_as_of_the_freeze_and_keeps_every_write(scratch, device, new_vm):
    vm, overlaydir = vm_with_a_device(new_vm, device)
    for target, each in BEFORE.items():
        vm.write(target, *each)
    window = Window(vm, DURING)
    settings = config.load(action_file(scratch, vm, overlaydir))

    outcome = back_up(vm, settings, window)
    for target, each in AFTER.items():
        vm.write(target, *each)

    # The window ran on an overlay file in overlaydir for the device too.
    assert window.calls == 1
    assert os.path.dirname(window.overlays["vdb"]) == overlaydir
    assert window.tops["vdb"] == window.overlays["vdb"]
    # The set: both disks exactly as of the freeze, the device as a raw image.
    set_path = outcome.set_path
    name = f"vdb-{os.path.basename(device)}.raw"
    assert sorted(os.listdir(set_path)) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.qcow2",
        "vda-vda.qcow2.b3tree",  # its BLAKE3 tree, for the next night's changed blocks
        name,
    ]
    check_manifest(set_path)
    raw = os.path.join(set_path, name)
    raw_spec = DiskSpec("vdb", "raw", DEVICE_SIZE)
    assert same_content(raw, "raw", reference(scratch, "vdb-frozen", raw_spec, BEFORE), "raw")
    qcow2_spec = DiskSpec("vda", "qcow2", 32 * MiB)
    frozen_vda = reference(scratch, "vda-frozen", qcow2_spec, BEFORE)
    assert same_content(os.path.join(set_path, "vda-vda.qcow2"), "qcow2", frozen_vda, "qcow2")
    # Sparse: 1 MiB written of 64 MiB; the zero blocks are holes.
    assert os.stat(raw).st_size == DEVICE_SIZE
    assert os.stat(raw).st_blocks * 512 <= 2 * MiB
    # set.json says where it came from.
    with open(os.path.join(set_path, "set.json")) as handle:
        images = {image["name"]: image for image in json.load(handle)["files"]}
    assert (images[name]["original_path"], images[name]["format"]) == (device, "raw")
    # The device and the image hold every write; no overlay is left.
    everything = reference(scratch, "vdb-all", raw_spec, BEFORE, DURING, AFTER)
    assert same_content(device, "raw", everything, "raw")
    all_vda = reference(scratch, "vda-all", qcow2_spec, BEFORE, DURING, AFTER)
    assert same_content(vm.paths["vda"], "qcow2", all_vda, "qcow2")
    assert _block_source(vm) == device
    assert os.listdir(overlaydir) == [] and not vm.has_mirror()


def test_a_run_killed_during_the_window_is_recovered_into_the_device(scratch, device, new_vm):
    vm, overlaydir = vm_with_a_device(new_vm, device)
    for target, each in BEFORE.items():
        vm.write(target, *each)
    action = action_file(scratch, vm, overlaydir)

    killed = helper("run", action, fault="after-freeze")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert _block_source(vm) is None  # the device is below an overlay now
    for target, each in DURING.items():
        vm.write(target, *each)  # into the overlays
    repaired = helper("recover", vm.name)

    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert _block_source(vm) == device
    raw_spec = DiskSpec("vdb", "raw", DEVICE_SIZE)
    assert same_content(device, "raw", reference(scratch, "vdb", raw_spec, BEFORE, DURING), "raw")
    assert os.listdir(overlaydir) == [] and not vm.has_mirror()
    assert helper("status", vm.name).returncode == 0


def test_run_test_says_a_block_disk_needs_overlaydir(scratch, device, new_vm):
    vm, _ = vm_with_a_device(new_vm, device)
    text = action_text(scratch, vm, "").replace("overlaydir = \n", "")
    folder = os.path.join(scratch, "actions")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    action = write_action(os.path.join(folder, "vm.kvm"), text)

    result = helper("run", "--test", action)

    assert any(
        line.startswith("Warning:") and "disk vdb" in line and "set overlaydir" in line
        for line in result.stdout.splitlines()
    ), result.stdout


def test_a_set_of_a_block_disk_restores_as_a_file_disk_never_onto_the_device(
    scratch,
    device,
    new_vm,
    copies,  # noqa: F811 - the fixture
):
    vm, overlaydir = vm_with_a_device(new_vm, device)
    vm.write("vdb", *BEFORE["vdb"])
    set_path = back_up(vm, config.load(action_file(scratch, vm, overlaydir))).set_path
    vm.stop()
    name = f"vdb-{os.path.basename(device)}.raw"

    refused = helper("restore", set_path, "--force")
    copy_name = f"{vm.name}-copy"
    copies.append(copy_name)
    folder = os.path.join(vm.directory, "copy")
    os.mkdir(folder, 0o755)
    copied = helper("restore", set_path, "--as", copy_name, "--to", folder)

    assert refused.returncode != 0
    assert f"{name} is the contents of the block device {device}" in refused.stdout
    assert "give --to DIR" in refused.stdout and "qemu-img convert -n" in refused.stdout
    assert copied.returncode == 0, copied.stdout + copied.stderr
    image = os.path.join(folder, f"{copy_name}-{name}")
    raw_spec = DiskSpec("vdb", "raw", DEVICE_SIZE)
    assert same_content(image, "raw", reference(scratch, "vdb", raw_spec, BEFORE), "raw")
    assert os.stat(image).st_blocks * 512 <= 2 * MiB  # holes kept
    copy_xml = vms.connect().lookupByName(copy_name).XMLDesc(0)
    assert f"<source file='{image}'" in copy_xml and device not in copy_xml


def _block_source(vm) -> str | None:
    """The device of vdb in the live XML when it is a block disk on top."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(vm.domain.XMLDesc(0))
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        if target is not None and target.get("dev") == "vdb" and source is not None:
            return source.get("dev") if disk.get("type") == "block" else None
    return None
