"""A real guest fills the overlay filesystem during the backup window.

QEMU pauses a guest whose write fails for lack of space (werror=enospc).
The backup must still merge, resume the guest (whose failed write is then
retried onto its own image), report an Error, and lose nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import libvirt
import pytest

from backupninja_kvm import config
from tests.conftest import write_action
from tests.support import guest
from tests.support.cycle import back_up
from tests.support.vms import (
    IMAGE_ROOT,
    PREFIX,
    DiskSpec,
    MiB,
    TestVM,
    Write,
    connect,
    create_image,
    reference_image,
    same_content,
)

pytestmark = pytest.mark.libvirt

WRITE_32_MIB = (
    "/bin/busybox dd if=/dev/zero bs=1M count=32 2>/dev/null"
    " | /bin/busybox tr '\\000' '\\253'"
    " | /bin/busybox dd of=/dev/vda bs=1M iflag=fullblock oflag=direct 2>/dev/null"
)


@pytest.fixture
def writing_guest(connection, scratch):
    assert guest.kernel(), "no kernel in /boot: scripts/setup-host installs linux-image-amd64"
    name = PREFIX + uuid.uuid4().hex[:8]
    directory = os.path.join(IMAGE_ROOT, name)
    os.makedirs(directory, mode=0o755)
    os.chmod(IMAGE_ROOT, 0o755)
    vm = TestVM(name, directory, [DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", MiB)])
    try:
        shutil.copy(guest.kernel(), os.path.join(directory, "vmlinuz"))
        guest.build_initramfs(os.path.join(directory, "initramfs.gz"), WRITE_32_MIB)
        for spec in vm.specs:
            vm.paths[spec.target] = os.path.join(directory, f"{spec.target}.{spec.format}")
            create_image(vm.paths[spec.target], spec)
        # Mounted before the VM starts: QEMU runs in a mount namespace of its
        # own, which may not see mounts made later.
        overlays = os.path.join(directory, "overlays")
        os.makedirs(overlays)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0777", "tmpfs", overlays], check=True
        )
        console = os.path.join(directory, "console.log")
        open(console, "w").close()
        os.chmod(console, 0o666)
        disks = {s.target: (vm.paths[s.target], s.format) for s in vm.specs}
        connect().defineXML(guest.guest_xml(name, directory, disks, console))
        vm.start()
        guest.wait_for_line(console, "guest: ready")
        yield vm, console, overlays
    finally:
        vm.remove()
        subprocess.run(["umount", "-l", os.path.join(directory, "overlays")], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def test_full_overlay_filesystem_pauses_the_guest_then_merge_resume_and_error(
    writing_guest, scratch
):
    vm, console, overlays = writing_guest
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    text = (
        f"[source]\ndomains = {vm.name}\noverlaydir = {overlays}\noverlay_reserve = 1\n"
        f"[dest]\ndirectory = {backups}\n"
    )
    settings = config.load(write_action(os.path.join(scratch, "g.kvm"), text))
    seen = {}

    def window(_domain, _overlays):
        vm.write("vdb", Write(0x01, 0, 512))  # the guest starts writing 32 MiB
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state, reason = vm.domain.state()
            if state == libvirt.VIR_DOMAIN_PAUSED:
                seen["paused"] = reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
                return
            time.sleep(0.1)

    outcome = back_up(vm, settings, window)
    assert seen == {"paused": True}, "QEMU did not pause the guest on a full overlay"
    assert any("QEMU paused the guest" in p for p in outcome.problems), outcome.problems
    assert vm.is_running()
    assert vm.tops() == vm.paths and vm.tops(inactive=True) == vm.paths
    assert os.listdir(overlays) == []

    # The write that failed is retried after the resume: the guest finishes.
    guest.wait_for_line(console, "guest: done")
    vm.stop()
    expected = reference_image(scratch, "expected", vm.specs[0], [Write(0xAB, 0, 32 * MiB)])
    assert same_content(expected, "qcow2", vm.paths["vda"], "qcow2")
    # The set holds the disk as it was frozen, before the guest wrote.
    empty = reference_image(scratch, "empty", vm.specs[0], [])
    assert same_content(empty, "qcow2", os.path.join(outcome.set_path, "vda-vda.qcow2"), "qcow2")
