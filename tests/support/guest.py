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
    _pack(target, INIT, MODULES, script=script)


# The guest for quiesce: QEMU's guest agent (Debian's qemu-ga, with the
# libraries it links) on the virtio-serial channel, and an ext4 filesystem on
# /dev/vda written to every 0.2 s. Each tick is printed only once its write
# returned: while the filesystem is frozen, the ticks stop.
AGENT_MODULES = [
    *MODULES,
    "kernel/drivers/char/virtio_console.ko",
    "kernel/crypto/crc32c_generic.ko",  # ext4 wants crc32c even without metadata_csum
    "kernel/lib/crc16.ko",
    "kernel/fs/mbcache.ko",
    "kernel/fs/jbd2/jbd2.ko",
    "kernel/fs/ext4/ext4.ko",
]
AGENT = "/usr/sbin/qemu-ga"

AGENT_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for module in {modules}; do /bin/busybox insmod /lib/modules/$module; done
/bin/busybox mount -t ext4 /dev/vda /mnt || echo "guest: mount failed"
port=""
for p in /sys/class/virtio-ports/*; do
   [ "$(/bin/busybox cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/${{p##*/}}
done
# The freeze hook is slow when the kernel command line says so: a guest whose
# agent accepts a freeze and takes long to finish it.
printf '#!/bin/busybox sh\ncase "$1 $(/bin/busybox cat /proc/cmdline)" in\n' > /hook
printf '  "freeze "*slowfreeze*) /bin/busybox sleep 8 ;;\nesac\nexit 0\n' >> /hook
/bin/busybox chmod 755 /hook
{agent} -m virtio-serial -p "$port" -t /tmp -F/hook &
echo "guest: ready"
i=0
while true; do
   i=$((i + 1))
   echo "$i" >> /mnt/ticks
   echo "guest: tick $i"
   /bin/busybox sleep 0.2
done
"""


def build_agent_initramfs(target: str) -> None:
    """The initramfs of the quiesce guest (see AGENT_INIT)."""
    _pack(target, AGENT_INIT, AGENT_MODULES, binaries=(AGENT,), agent=AGENT)


def make_ext4(path: str, size: int) -> None:
    """A raw image holding an empty ext4 filesystem."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-O",
            "^metadata_csum",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            path,
        ],
        check=True,
    )


def ext4_needs_recovery(path: str) -> bool:
    """True when the ext4 image was left mounted (its journal must be
    replayed): what a snapshot without quiesce captures."""
    header = subprocess.run(
        ["dumpe2fs", "-h", path], capture_output=True, text=True, check=True
    ).stdout
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features"))
    return "needs_recovery" in features.split()


def _libraries(binary: str) -> list[str]:
    listing = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            found.append(path)
    return found


def _pack(
    target: str,
    init_template: str,
    modules: list[str],
    binaries: tuple[str, ...] = (),
    **values: str,
) -> None:
    release = os.path.basename(kernel() or "").removeprefix("vmlinuz-")
    root = tempfile.mkdtemp(prefix="bnkvm-initramfs-")
    try:
        os.makedirs(os.path.join(root, "bin"))
        os.makedirs(os.path.join(root, "lib", "modules"))
        shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
        for path in [*binaries, *(lib for b in binaries for lib in _libraries(b))]:
            copy = os.path.join(root, path.lstrip("/"))
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            shutil.copy(path, copy)  # follows symlinks: the file under the linked name
        names = []
        for module in modules:
            shutil.copy(
                os.path.join("/lib/modules", release, module), os.path.join(root, "lib", "modules")
            )
            names.append(os.path.basename(module))
        init = os.path.join(root, "init")
        with open(init, "w") as handle:
            handle.write(init_template.format(modules=" ".join(names), **values))
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


def guest_xml(
    name: str,
    directory: str,
    disks: dict[str, tuple[str, str]],
    console: str,
    agent_channel: bool = False,
    cmdline: str = "",
) -> str:
    """disks: target -> (path, format)."""
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, (path, fmt) in disks.items()
    )
    channel = (
        "\n    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        if agent_channel
        else ""
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
    <cmdline>console=ttyS0 panic=-1 {cmdline}</cmdline>
  </os>
  <on_crash>destroy</on_crash>
  <devices>{devices}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>{channel}
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
