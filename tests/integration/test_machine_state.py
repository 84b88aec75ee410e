"""The whole machine in the set, against the real libvirtd: a UEFI domain's
variable store and its emulated TPM's state (swtpm), a direct kernel boot's
kernel and initrd; each in the set as it was at the copy, and back on restore,
in place and as a copy."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import tarfile
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from backupninja_kvm import config, machine, setinfo
from tests.conftest import write_action
from tests.e2e.test_remote import remote_action
from tests.integration.test_sets import action
from tests.support import guest
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import IMAGE_ROOT, PREFIX, UNDEFINE, DiskSpec, MiB, TestVM, connect, run

pytestmark = pytest.mark.libvirt

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def uefi_xml(name: str, disk: str, nvram: str) -> str:
    """Plain OVMF (no Secure Boot, so no SMM and 'pc' will do) and a TPM 2.0
    emulator; no OS: OVMF writes its boot entries and settles."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
    <nvram template='{OVMF_VARS}'>{nvram}</nvram>
  </os>
  <features><acpi/></features>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"""


def kernel_xml(name: str, disk: str, kernel: str, initrd: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""


def digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_files(folder: str) -> dict[str, bytes]:
    """relative path -> bytes of every regular file under *folder*."""
    found = {}
    for current, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(current, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def tar_files(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            os.path.normpath(m.name): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isreg()
        }


def wait_until_settled(path: str, timeout: float = 180) -> None:
    """Until OVMF has written its variables (the file differs from the
    template) and writes no more (the same for 3 s)."""
    template = digest(OVMF_VARS)
    deadline = time.monotonic() + timeout
    last, since = "", time.monotonic()
    while time.monotonic() < deadline:
        now = digest(path) if os.path.exists(path) else ""
        if now != last:
            last, since = now, time.monotonic()
        elif now and now != template and time.monotonic() - since >= 3:
            return
        time.sleep(0.5)
    raise TimeoutError(f"OVMF did not settle its variables in {path} within {timeout} s")


@pytest.fixture
def machines(connection):
    """Factory of defined domains (name, xml) -> TestVM; each removed
    afterwards with its variable store, its TPM state and its folder, also
    the copies named in the returned list's .copies."""
    made: list[TestVM] = []
    copies: list[str] = []

    def factory(make_xml, start: bool = True) -> TestVM:
        name = PREFIX + uuid.uuid4().hex[:8]
        directory = os.path.join(IMAGE_ROOT, name)
        os.makedirs(directory, mode=0o755)
        os.chmod(IMAGE_ROOT, 0o755)
        vm = TestVM(name, directory, [DiskSpec("vda", "qcow2", 16 * MiB)])
        vm.paths["vda"] = os.path.join(directory, "vda.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", vm.paths["vda"], str(16 * MiB))
        made.append(vm)
        vm.uuid = connect().defineXML(make_xml(name, directory, vm.paths["vda"])).UUIDString()
        if start:
            vm.start()
        return vm

    factory.copies = copies  # type: ignore[attr-defined]
    yield factory
    uuids = [vm.uuid for vm in made]
    for name in copies:
        try:
            domain = connect().lookupByName(name)
        except libvirt.libvirtError:
            continue
        uuids.append(domain.UUIDString())
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(UNDEFINE)
    for vm in made:
        vm.remove()
    for each in uuids:
        shutil.rmtree(machine.tpm_folder(each), ignore_errors=True)


def uefi_vm(machines) -> TestVM:
    vm = machines(lambda name, d, disk: uefi_xml(name, disk, os.path.join(d, f"{name}_VARS.fd")))
    vm.nvram = os.path.join(vm.directory, f"{vm.name}_VARS.fd")  # type: ignore[attr-defined]
    wait_until_settled(vm.nvram)  # type: ignore[attr-defined]
    return vm


def backed_up(vm: TestVM, scratch: str, nvram: str):
    """Back the running *vm* up; returns (action file, set path, what the
    NVRAM file and the TPM folder held in the backup window, once copied)."""
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    path = action(scratch, vm, backups)
    seen: dict[str, object] = {}

    def window(_domain, _overlays):
        with open(nvram, "rb") as handle:
            seen["nvram"] = handle.read()
        seen["tpm"] = folder_files(machine.tpm_folder(vm.uuid))

    outcome = back_up(vm, config.load(path), window)
    return path, outcome.set_path, seen


def test_a_uefi_domain_s_variables_and_tpm_state_are_in_the_set_as_copied(machines, scratch):
    vm = uefi_vm(machines)
    nvram = vm.nvram  # type: ignore[attr-defined]
    with open(OVMF_VARS, "rb") as handle:
        template = handle.read()

    _, set_path, seen = backed_up(vm, scratch, nvram)
    vm.stop()

    info = setinfo.read(set_path)
    by_role = {f.role: f for f in info.files}
    assert by_role["nvram"].original_path == nvram
    assert by_role["tpm"].original_path == machine.tpm_folder(vm.uuid)
    with open(os.path.join(set_path, by_role["nvram"].name), "rb") as handle:
        copied = handle.read()
    # The variables OVMF wrote, as they were at the copy, and as QEMU left them.
    assert copied != template
    assert copied == seen["nvram"]
    with open(nvram, "rb") as handle:
        assert handle.read() == copied
    assert by_role["nvram"].virtual_size == len(copied)
    state = tar_files(os.path.join(set_path, "tpm-state.tar"))
    assert "tpm2/tpm2-00.permall" in state
    assert state == seen["tpm"] == folder_files(machine.tpm_folder(vm.uuid))
    with open(os.path.join(set_path, "B3SUMS")) as handle:
        listed = {line.split("  ", 1)[1].strip() for line in handle}
    assert {by_role["nvram"].name, "tpm-state.tar"} <= listed
    checked = helper("verify", set_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 machine-state file(s) of their size" in checked.stdout, checked.stdout


def test_a_uefi_domain_restores_in_place_with_its_variables_and_tpm_and_starts(machines, scratch):
    vm = uefi_vm(machines)
    nvram = vm.nvram  # type: ignore[attr-defined]
    path, set_path, _ = backed_up(vm, scratch, nvram)
    vm.stop()
    vm.domain.undefineFlags(UNDEFINE)  # the variable store and the TPM state go with it
    os.unlink(vm.paths["vda"])
    assert not os.path.exists(nvram) and not os.path.exists(machine.tpm_folder(vm.uuid))

    result = helper("restore", "-a", path, vm.name)

    assert result.returncode == 0, result.stdout + result.stderr
    assert digest(nvram) == digest(os.path.join(set_path, f"nvram-{vm.name}_VARS.fd"))
    assert folder_files(machine.tpm_folder(vm.uuid)) == tar_files(
        os.path.join(set_path, "tpm-state.tar")
    )
    assert not [n for n in os.listdir(machine.SWTPM_DIR) if n.startswith(".bnkvm-restore-")]
    # The tar kept swtpm's owner and modes (tss, 0700 on tpm2/, as libvirt made them).
    state = os.stat(os.path.join(machine.tpm_folder(vm.uuid), "tpm2"))
    assert (pwd.getpwuid(state.st_uid).pw_name, state.st_mode & 0o777) == ("tss", 0o700)
    vm.start()  # swtpm takes the restored state (libvirt gives its files to swtpm's user)
    assert vm.is_running()


def test_a_uefi_domain_restored_in_place_over_itself_keeps_the_replaced_state_aside(
    machines, scratch
):
    vm = uefi_vm(machines)
    nvram = vm.nvram  # type: ignore[attr-defined]
    path, set_path, _ = backed_up(vm, scratch, nvram)
    vm.stop()
    with open(nvram, "r+b") as handle:  # the variables ruined
        handle.write(b"\xff" * 4096)

    result = helper("restore", "-a", path, vm.name, "--force")

    assert result.returncode == 0, result.stdout + result.stderr
    assert digest(nvram) == digest(os.path.join(set_path, f"nvram-{vm.name}_VARS.fd"))
    aside = [n for n in os.listdir(vm.directory) if ".before-restore-" in n]
    assert sorted(a.split(".before-restore-")[0] for a in aside) == sorted(
        ["vda.qcow2", f"{vm.name}_VARS.fd"]
    )
    tpm_aside = [n for n in os.listdir(machine.SWTPM_DIR) if n.startswith(vm.uuid + ".before")]
    assert len(tpm_aside) == 1, os.listdir(machine.SWTPM_DIR)
    shutil.rmtree(os.path.join(machine.SWTPM_DIR, tpm_aside[0]))


def test_a_uefi_domain_restores_as_a_copy_with_its_own_variables_and_tpm_state(machines, scratch):
    vm = uefi_vm(machines)
    nvram = vm.nvram  # type: ignore[attr-defined]
    _, set_path, _ = backed_up(vm, scratch, nvram)
    original = digest(nvram)
    copy_name = vm.name + "-copy"
    machines.copies.append(copy_name)

    result = helper("restore", set_path, "--as", copy_name)

    assert result.returncode == 0, result.stdout + result.stderr
    copy = connect().lookupByName(copy_name)
    root = ET.fromstring(copy.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    copy_nvram = os.path.join(vm.directory, f"{copy_name}_VARS.fd")
    assert root.findtext("./os/nvram") == copy_nvram
    assert digest(copy_nvram) == digest(os.path.join(set_path, f"nvram-{vm.name}_VARS.fd"))
    copy_tpm = machine.tpm_folder(copy.UUIDString())
    assert folder_files(copy_tpm) == tar_files(os.path.join(set_path, "tpm-state.tar"))
    assert copy_tpm in result.stdout
    assert digest(nvram) == original and vm.is_running()  # the original is not touched
    copy.create()  # before the start: libvirt would have made it a new, empty TPM
    assert copy.isActive()


def test_a_direct_kernel_boot_s_kernel_and_initrd_are_in_the_set_and_restored(machines, scratch):
    kernel = guest.kernel()
    if kernel is None:
        pytest.skip("no kernel in /boot")

    def make_xml(name, directory, disk):
        shutil.copy(kernel, os.path.join(directory, "vmlinuz"))
        guest.build_initramfs(os.path.join(directory, "initramfs.gz"), "true")
        return kernel_xml(
            name, disk, os.path.join(directory, "vmlinuz"), os.path.join(directory, "initramfs.gz")
        )

    vm = machines(make_xml)
    boot = {"kernel": "vmlinuz", "initrd": "initramfs.gz"}
    path, set_path, _ = backed_up_plain(vm, scratch)
    info = setinfo.read(set_path)
    by_role = {f.role: f for f in info.files}
    for role, name in boot.items():
        original = os.path.join(vm.directory, name)
        assert by_role[role].original_path == original
        assert digest(os.path.join(set_path, by_role[role].name)) == digest(original)
    copy_name = vm.name + "-copy"
    machines.copies.append(copy_name)

    as_copy = helper("restore", set_path, "--as", copy_name)

    assert as_copy.returncode == 0, as_copy.stdout + as_copy.stderr
    root = ET.fromstring(connect().lookupByName(copy_name).XMLDesc(0))
    assert root.findtext("./os/kernel") == os.path.join(vm.directory, "vmlinuz")  # shared
    assert f"shares the original's kernel {os.path.join(vm.directory, 'vmlinuz')}" in (
        as_copy.stdout + as_copy.stderr
    )

    vm.stop()
    os.unlink(os.path.join(vm.directory, "initramfs.gz"))
    in_place = helper("restore", "-a", path, vm.name, "--force")

    assert in_place.returncode == 0, in_place.stdout + in_place.stderr
    initrd = os.path.join(vm.directory, "initramfs.gz")
    assert digest(initrd) == digest(os.path.join(set_path, by_role["initrd"].name))
    aside = [n for n in os.listdir(vm.directory) if ".before-restore-" in n]
    assert [a.split(".before-restore-")[0] for a in aside] == ["vda.qcow2"]  # the kernel stays


def backed_up_plain(vm: TestVM, scratch: str):
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    path = action(scratch, vm, backups)
    outcome = back_up(vm, config.load(path))
    return path, outcome.set_path, None


def test_a_shut_off_uefi_domain_s_variables_and_tpm_state_are_in_the_set(machines, scratch):
    vm = uefi_vm(machines)
    nvram = vm.nvram  # type: ignore[attr-defined]
    vm.stop()

    _, set_path, _ = backed_up_plain(vm, scratch)

    info = setinfo.read(set_path)
    assert info.consistency == "shut-off"
    assert sorted(f.role for f in info.state()) == ["nvram", "tpm"]
    assert digest(os.path.join(set_path, f"nvram-{vm.name}_VARS.fd")) == digest(nvram)
    assert tar_files(os.path.join(set_path, "tpm-state.tar")) == folder_files(
        machine.tpm_folder(vm.uuid)
    )


def test_a_uefi_domain_s_state_goes_to_a_remote_destination_and_comes_back(
    server,  # noqa: F811 - the fixture
    machines,
    scratch,
):
    vm = uefi_vm(machines)
    nvram = vm.nvram  # type: ignore[attr-defined]
    backups = os.path.join(scratch, "remote-backups")  # "remote": this host, over ssh
    os.makedirs(backups)
    path = write_action(os.path.join(scratch, "remote.kvm"), remote_action(backups, vm, server))

    made = helper("run", path)

    assert made.returncode == 0, made.stdout + made.stderr
    (stamp,) = [n for n in os.listdir(os.path.join(backups, vm.name)) if n.endswith("Z")]
    set_path = os.path.join(backups, vm.name, stamp)
    assert sorted(f.role for f in setinfo.read(set_path).state()) == ["nvram", "tpm"]
    verified = helper("verify", "-a", path, vm.name)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "2 machine-state file(s) of their size" in verified.stdout, verified.stdout

    vm.stop()
    saved_nvram = digest(os.path.join(set_path, f"nvram-{vm.name}_VARS.fd"))
    assert saved_nvram == digest(nvram)
    vm.domain.undefineFlags(UNDEFINE)
    os.unlink(vm.paths["vda"])
    restored = helper("restore", "-a", path, vm.name)

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert digest(nvram) == saved_nvram
    assert folder_files(machine.tpm_folder(vm.uuid)) == tar_files(
        os.path.join(set_path, "tpm-state.tar")
    )
