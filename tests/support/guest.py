"""A tiny real guest: Debian's kernel with a busybox initramfs.

For the few tests where the guest's own I/O matters (QEMU pauses a guest
whose write fails, which writes injected from the monitor do not do). The
guest waits until the host writes 0x01 into the first byte of its vdb, then
runs its script once and prints a line on its serial console.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

MODULES = [  # in load order
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
]

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for module in {modules}; do /bin/busybox insmod /lib/modules/$module; done
echo "guest: ready"
trigger() {{
   /bin/busybox dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null \\
      | /bin/busybox head -c 1 | /bin/busybox od -An -tx1 | /bin/busybox tr -d ' '
}}
until [ "$(trigger)" = "01" ]; do
   /bin/busybox sleep 0.1
done
echo "guest: triggered"
{script}
echo "guest: done"
while true; do /bin/busybox sleep 3600; done
"""


def kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def build_initramfs(target: str, script: str) -> None:
    """Write a gzip'd cpio initramfs at *target* that runs *script* when triggered."""
    release = os.path.basename(kernel() or "").removeprefix("vmlinuz-")
    root = tempfile.mkdtemp(prefix="bnkvm-initramfs-")
    try:
        os.makedirs(os.path.join(root, "bin"))
        os.makedirs(os.path.join(root, "lib", "modules"))
        shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
        names = []
        for module in MODULES:
            shutil.copy(
                os.path.join("/lib/modules", release, module), os.path.join(root, "lib", "modules")
            )
            names.append(os.path.basename(module))
        init = os.path.join(root, "init")
        with open(init, "w") as handle:
            handle.write(INIT.format(modules=" ".join(names), script=script))
        os.chmod(init, 0o755)
        listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input=listing,
            capture_output=True,
            check=True,
        ).stdout
        with open(target, "wb") as handle:
            subprocess.run(["gzip", "-1"], input=archive, stdout=handle, check=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def guest_xml(name: str, directory: str, disks: dict[str, tuple[str, str]], console: str) -> str:
    """disks: target -> (path, format)."""
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, (path, fmt) in disks.items()
    )
    # Software emulation: it boots this kernel in a few seconds everywhere,
    # while nested KVM on these machines hung before the first console line.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{directory}/vmlinuz</kernel>
    <initrd>{directory}/initramfs.gz</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <on_crash>destroy</on_crash>
  <devices>{devices}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
  </devices>
</domain>"""


def wait_for_line(console: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in _read(console):
            return
        time.sleep(0.2)
    tail = _read(console)[-2000:]
    raise TimeoutError(f"guest did not print {text!r} within {timeout} s; console:\n{tail}")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""
