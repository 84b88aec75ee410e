"""Every disk accounted for, against the real libvirtd and QEMU: block disks,
an admin's own snapshot chain, a template shared with another domain, a
qcow2 with an external data file, a symlinked image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from backupninja_kvm import config, destination
from backupninja_kvm.errors import DomainError
from tests.conftest import write_action
from tests.support import vms
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import (
    URI,
    DiskSpec,
    MiB,
    Write,
    data_file_path,
    reference_image,
    same_content,
    sha256,
    write_offline,
)

pytestmark = pytest.mark.libvirt


@pytest.fixture
def loop_device(scratch):
    with vms.loop_device(scratch) as device:
        yield device


def action_path(scratch: str, name: str) -> str:
    """A path for an action file in a folder of root's alone (the scratch
    folder may be opened for QEMU to reach a template)."""
    folder = os.path.join(scratch, "actions")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, name)


def action(scratch: str, vm, **source: str) -> str:
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups, exist_ok=True)
    lines = ["[general]", "merge_timeout = 60", "[source]", f"domains = {vm.name}"]
    lines += [f"{key} = {value}" for key, value in source.items()]
    lines += ["[dest]", f"directory = {backups}"]
    return write_action(action_path(scratch, "vm.kvm"), "\n".join(lines) + "\n")


def lines(result, prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


def latest_set(scratch: str, vm) -> str:
    return os.path.realpath(os.path.join(scratch, "backups", vm.name, "latest"))


def chain_files(image: str, cwd: str | None = None) -> list[str]:
    """The file of every layer qemu-img finds below *image*, top first."""
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    return [layer["filename"] for layer in json.loads(result.stdout)]


def test_a_vm_whose_only_disk_is_a_block_device_is_an_error_and_makes_no_set(
    new_vm, scratch, loop_device
):
    vm = new_vm([DiskSpec("vda", block_device=loop_device)])

    result = helper("run", action(scratch, vm))

    assert result.returncode == 4, result.stdout + result.stderr
    errors = [line for line in lines(result, "Error:") if vm.name in line]
    assert any(
        "no disk can be backed up" in line and "vda" in line and loop_device in line
        for line in errors
    ), result.stdout
    assert not any("backed up" in line for line in lines(result, "Info:")), result.stdout
    assert destination.complete_sets(os.path.join(scratch, "backups", vm.name)) == []
    assert vm.is_running() and not vm.has_mirror()


def test_a_block_disk_beside_a_file_disk_is_a_warning_naming_it(new_vm, scratch, loop_device):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", block_device=loop_device)])
    vm.write("vda", Write(0x11, 0, MiB))

    result = helper("run", action(scratch, vm))

    assert result.returncode == 0, result.stdout + result.stderr
    warnings = lines(result, "Warning:")
    assert any(
        f"{vm.name}: disk vdb: block disk" in line
        and f"({loop_device})" in line
        and "not in the set" in line
        for line in warnings
    ), result.stdout
    assert sorted(os.listdir(latest_set(scratch, vm))) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.qcow2",
        "vda-vda.qcow2.b3tree",  # its BLAKE3 tree, for the next night's changed blocks
    ]
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def _snapshot_disk_only(vm, overlay: str) -> None:
    """What an administrator does: `virsh snapshot-create-as --disk-only`."""
    subprocess.run(
        ["virsh", "-q", "-c", URI, "snapshot-create-as", vm.name, "s1", "--disk-only", "--atomic"]
        + ["--diskspec", f"vda,file={overlay}"],
        check=True,
        capture_output=True,
    )


ADMIN_CHAIN_WRITES = [Write(0x44, MiB, MiB), Write(0x45, 3 * MiB, MiB)]


def _vm_on_an_admin_chain(new_vm):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    vm.write("vda", ADMIN_CHAIN_WRITES[0])
    top = os.path.join(vm.directory, "vda.s1.qcow2")
    _snapshot_disk_only(vm, top)
    vm.write("vda", ADMIN_CHAIN_WRITES[1])  # into the new top; vda.qcow2 keeps 0x44
    return vm, top


def test_an_admin_snapshot_chain_with_backing_chain_makes_a_set_that_restores_on_its_own(
    new_vm, scratch
):
    vm, top = _vm_on_an_admin_chain(new_vm)

    result = helper("run", action(scratch, vm, backing="chain"))
    vm.write("vda", Write(0x46, 5 * MiB, MiB))  # after the backup: not in the set

    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, "Warning:") == [], result.stdout
    set_path = latest_set(scratch, vm)
    assert sorted(os.listdir(set_path)) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.qcow2",
        "vda-vda.s1.qcow2",
    ]
    subprocess.run(["b3sum", "--quiet", "-c", "B3SUMS"], cwd=set_path, check=True)
    # The domain's own images still form their chain; only the copies were rebased.
    assert chain_files(top) == [top, vm.paths["vda"]]
    assert vm.tops()["vda"] == top and vm.tagged_files() == []

    # Moved elsewhere, the set is a complete chain of its own, as of the freeze.
    moved = os.path.join(scratch, "elsewhere")
    shutil.move(set_path, moved)
    copy = os.path.join(moved, "vda-vda.s1.qcow2")
    assert chain_files(copy) == [copy, os.path.join(moved, "vda-vda.qcow2")]
    frozen = reference_image(
        scratch, "frozen", DiskSpec("vda", "qcow2", 32 * MiB), ADMIN_CHAIN_WRITES
    )
    assert same_content(frozen, "qcow2", copy, "qcow2")
    subprocess.run(
        ["virsh", "-q", "-c", URI, "snapshot-delete", vm.name, "s1", "--metadata"],
        check=True,
        capture_output=True,
    )


def test_an_admin_snapshot_chain_with_backing_top_is_a_warning(new_vm, scratch):
    vm, top = _vm_on_an_admin_chain(new_vm)

    result = helper("run", action(scratch, vm, backing="top"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert any(
        f"{vm.name}: vda:" in line
        and vm.paths["vda"] in line
        and "belong to no other domain" in line
        and "backing = chain" in line
        for line in lines(result, "Warning:")
    ), result.stdout
    assert sorted(os.listdir(latest_set(scratch, vm))) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.s1.qcow2",
    ]
    subprocess.run(
        ["virsh", "-q", "-c", URI, "snapshot-delete", vm.name, "s1", "--metadata"],
        check=True,
        capture_output=True,
    )


def test_a_template_shared_with_another_domain_stays_out_of_the_set_with_an_info(new_vm, scratch):
    os.chmod(scratch, 0o755)
    template = os.path.join(scratch, "template.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, str(32 * MiB)], check=True)
    write_offline(template, "qcow2", [Write(0x77, 0, 4 * MiB)])
    os.chmod(template, 0o644)
    template_sum = sha256(template)
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB, backing=template)])
    other = new_vm([DiskSpec("vda", "qcow2", 32 * MiB, backing=template)], start=False)

    result = helper("run", action(scratch, vm, backing="chain"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, "Warning:") == [], result.stdout
    assert any(
        template in line and other.name in line and "needs it" in line
        for line in lines(result, "Info:")
    ), result.stdout
    set_path = latest_set(scratch, vm)
    assert sorted(os.listdir(set_path)) == ["B3SUMS", "domain.xml", "set.json", "vda-vda.qcow2"]
    # The copy still names the template, where it is.
    assert chain_files(os.path.join(set_path, "vda-vda.qcow2"))[1:] == [template]
    assert sha256(template) == template_sum


def test_a_qcow2_with_an_external_data_file_has_its_data_in_the_set(new_vm, scratch):
    spec = DiskSpec("vda", "qcow2", 32 * MiB, data_file=True)
    vm = new_vm([spec])
    writes = [Write(0x81, 0, 8 * MiB)]
    vm.write("vda", *writes)

    result = helper("run", action(scratch, vm))
    vm.write("vda", Write(0x82, 16 * MiB, MiB))  # after the backup: not in the set

    assert result.returncode == 0, result.stdout + result.stderr
    set_path = latest_set(scratch, vm)
    assert sorted(os.listdir(set_path)) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.data.raw",
        "vda-vda.qcow2",
    ]
    subprocess.run(["b3sum", "--quiet", "-c", "B3SUMS"], cwd=set_path, check=True)
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert os.path.isfile(data_file_path(vm.paths["vda"]))

    # Moved elsewhere, the copy reads its data from the copied data file
    # (qemu-img resolves a relative data file name from the current folder).
    moved = os.path.join(scratch, "elsewhere")
    shutil.move(set_path, moved)
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "vda-vda.qcow2"],
        cwd=moved,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["format-specific"]["data"]["data-file"] == "vda-vda.data.raw"
    frozen = reference_image(scratch, "frozen", DiskSpec("vda", "qcow2", 32 * MiB), writes)
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", frozen, "vda-vda.qcow2"],
        cwd=moved,
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_the_overlay_of_a_symlinked_image_goes_beside_the_real_file(new_vm, scratch):
    os.chmod(scratch, 0o755)
    real_dir = os.path.join(scratch, "real")
    os.makedirs(real_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", real_dir], check=True)
    vm = None
    try:
        vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)], start=False)
        real = os.path.join(real_dir, "real-vda.qcow2")
        shutil.move(vm.paths["vda"], real)
        os.symlink(real, vm.paths["vda"])
        vm.start()
        vm.write("vda", Write(0x11, 0, MiB))
        backups = os.path.join(scratch, "backups")
        os.makedirs(backups)

        def settings(reserve: int) -> config.Settings:
            text = (
                f"[source]\ndomains = {vm.name}\noverlay_reserve = {reserve}\n"
                f"[dest]\ndirectory = {backups}\n"
            )
            return config.load(write_action(action_path(scratch, f"r{reserve}.kvm"), text))

        # The reserve is checked where the overlay goes: the real file's filesystem.
        with pytest.raises(DomainError, match=rf"overlay_reserve\) in {real_dir}"):
            back_up(vm, settings(64))

        seen = {}

        def window(_domain, overlays):
            seen.update(overlays=dict(overlays), tops=vm.tops())

        outcome = back_up(vm, settings(1), window)
        assert os.path.dirname(seen["overlays"]["vda"]) == real_dir
        assert seen["tops"]["vda"] == seen["overlays"]["vda"]
        # The set keeps the symlink's name; the VM is back on its own (linked) image.
        assert os.listdir(outcome.set_path).count("vda-vda.qcow2") == 1
        assert vm.tops()["vda"] == vm.paths["vda"] and os.path.islink(vm.paths["vda"])
        assert [n for n in os.listdir(real_dir) if ".bnkvm-" in n] == []
        reference = reference_image(
            scratch, "ref", DiskSpec("vda", "qcow2", 32 * MiB), [Write(0x11, 0, MiB)]
        )
        assert same_content(
            reference, "qcow2", os.path.join(outcome.set_path, "vda-vda.qcow2"), "qcow2"
        )
    finally:
        if vm is not None:
            vm.remove()
        subprocess.run(["umount", real_dir], check=False)


def test_the_free_space_check_counts_the_whole_chain_that_is_copied(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB)], start=False)
    write_offline(vm.paths["vda"], "qcow2", [Write(0x51, 0, 40 * MiB)])
    vm.start()
    _snapshot_disk_only(vm, os.path.join(vm.directory, "vda.s1.qcow2"))
    small = os.path.join(scratch, "small")
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", small], check=True)
    try:

        def settings(backing: str) -> config.Settings:
            text = (
                f"[source]\ndomains = {vm.name}\nbacking = {backing}\n[dest]\ndirectory = {small}\n"
            )
            return config.load(write_action(action_path(scratch, f"{backing}.kvm"), text))

        # 40 MiB in the base plus the margin do not fit: refused before the freeze.
        with pytest.raises(DomainError, match="not enough free space for the backup set"):
            back_up(vm, settings("chain"))
        assert vm.tagged_files() == [] and os.listdir(small) == []
        # The top alone fits.
        outcome = back_up(vm, settings("top"))
        assert sorted(os.listdir(outcome.set_path)) == [
            "B3SUMS",
            "domain.xml",
            "set.json",
            "vda-vda.s1.qcow2",
        ]
    finally:
        subprocess.run(["umount", small], check=True)
        subprocess.run(
            ["virsh", "-q", "-c", URI, "snapshot-delete", vm.name, "s1", "--metadata"],
            check=False,
            capture_output=True,
        )


def test_exclude_disks_leaves_a_disk_out_as_info_and_still_prunes(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)])
    path = action(scratch, vm, exclude_disks=f"{vm.name}:vdb, *:vdz")
    with open(path, "a") as handle:
        handle.write("keep = 1\n")

    first = helper("run", path)
    second = helper("run", path)

    for result in (first, second):
        assert result.returncode == 0, result.stdout + result.stderr
        assert lines(result, "Warning:") == [], result.stdout
    assert f"Info: {vm.name}: skipping disk vdb: left out by [source] exclude_disks " in (
        second.stdout
    ), second.stdout
    sets = destination.complete_sets(os.path.join(scratch, "backups", vm.name))
    assert len(sets) == 1  # the set without vdb still pruned the first one
    assert sorted(os.listdir(latest_set(scratch, vm))) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.qcow2",
        "vda-vda.qcow2.b3tree",
    ]
    assert vm.tops() == vm.paths
