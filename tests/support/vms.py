"""Throwaway QEMU VMs on the real system libvirtd, and image helpers.

VMs have no OS: SeaBIOS finds nothing to boot and idles, which is all the
disk paths need. Guest writes are simulated from the host through the
device, with QEMU's HMP ``qemu-io`` command, so they land in the active layer
exactly as a guest's would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import libvirt
import libvirt_qemu

from backupninja_kvm import journal

URI = "qemu:///system"
# Two checkouts may run their suites side by side on one libvirtd: each run
# removes only the VMs and images of its own prefix (BNKVM_TEST_PREFIX).
PREFIX = os.environ.get("BNKVM_TEST_PREFIX", "bnkvm-t-")
IMAGE_ROOT = f"/var/lib/libvirt/images/{PREFIX}images"

MiB = 1024 * 1024
# Also removes a UEFI domain's variable store (libvirt refuses to undefine
# one without a word about it), an emulated TPM's state, and the records of
# changed blocks' checkpoints (libvirt refuses to undefine a domain with any).
UNDEFINE = (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_TPM
)


@dataclass(frozen=True)
class Write:
    pattern: int
    offset: int
    length: int

    def qemu_io(self) -> str:
        return f"write -P {self.pattern:#x} {self.offset} {self.length}"


@dataclass(frozen=True)
class DiskSpec:
    target: str
    format: str = "qcow2"  # qcow2, raw
    size: int = 64 * MiB
    device: str = "disk"  # disk, cdrom
    backing: str | None = None  # backing file (qcow2 only)
    block_device: str | None = None  # a block disk on this device (/dev/loopN), no image
    data_file: bool = False  # qcow2 with an external raw data file TARGET.data.raw


def data_file_path(image: str) -> str:
    """The external data file of a DiskSpec(data_file=True) image."""
    return os.path.splitext(image)[0] + ".data.raw"


@contextmanager
def loop_device(directory: str, size: int = 64 * MiB) -> Iterator[str]:
    """A real block device for ``<disk type='block'>``: a loop device on a
    file in *directory*, detached afterwards."""
    backing = tempfile.mktemp(prefix="loop-", suffix=".raw", dir=directory)
    with open(backing, "wb") as handle:
        handle.truncate(size)
    device = run("losetup", "-f", "--show", backing).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        os.unlink(backing)


@contextmanager
def xfs_filesystem(folder: str, size: int) -> Iterator[str]:
    """An XFS filesystem with reflinks on a loop device, mounted at
    FOLDER/xfs (its image FOLDER/xfs.img); unmounted and removed afterwards."""
    with loop_filesystem(folder, size, "xfs") as mount:
        yield mount


@contextmanager
def loop_filesystem(folder: str, size: int, kind: str) -> Iterator[str]:
    """A filesystem of *kind* (xfs with reflinks, or ext4: none) on a loop
    device, mounted at FOLDER/KIND; unmounted and removed afterwards."""
    os.makedirs(folder, exist_ok=True)
    image = os.path.join(folder, f"{kind}.img")
    mount = os.path.join(folder, kind)
    with open(image, "wb") as handle:
        handle.truncate(size)
    if kind == "xfs":
        run("mkfs.xfs", "-q", "-m", "reflink=1", image)
    else:
        run(f"mkfs.{kind}", "-q", "-F", image)
    os.mkdir(mount)
    run("mount", "-o", "loop", image, mount)
    try:
        yield mount
    finally:
        subprocess.run(["umount", mount], check=False)
        os.rmdir(mount)
        os.unlink(image)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def create_image(path: str, spec: DiskSpec) -> None:
    if spec.device == "cdrom":
        with open(path, "wb") as handle:
            handle.truncate(MiB)
        return
    if spec.block_device:
        return
    argv = ["qemu-img", "create", "-q", "-f", spec.format]
    if spec.backing:
        argv += ["-b", spec.backing, "-F", "qcow2"]
    if spec.data_file:
        argv += ["-o", f"data_file={data_file_path(path)},data_file_raw=on"]
    argv += [path, str(spec.size)]
    run(*argv)


def write_offline(path: str, fmt: str, writes: list[Write]) -> None:
    """Apply writes to an image that no VM uses (to build references)."""
    if writes:
        argv = ["qemu-io", "-f", fmt]
        for write in writes:
            argv += ["-c", write.qemu_io()]
        run(*argv, path)


def same_content(first: str, first_format: str, second: str, second_format: str) -> bool:
    """True when two images show the same guest-visible bytes."""
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", first_format, "-F", second_format, first, second],
        capture_output=True,
        text=True,
    )
    if result.returncode not in (0, 1):
        raise RuntimeError(result.stderr)
    return result.returncode == 0


def sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def reference_image(directory: str, name: str, spec: DiskSpec, writes: list[Write]) -> str:
    """A fresh image of the same size and format with *writes* applied."""
    path = os.path.join(directory, f"{name}.{spec.format}")
    create_image(path, DiskSpec(spec.target, spec.format, spec.size))
    write_offline(path, spec.format, writes)
    return path


def domain_xml(name: str, disks: list[tuple[DiskSpec, str]], agent_channel: bool = False) -> str:
    lines = [
        "<domain type='qemu'>",
        f"  <name>{name}</name>",
        "  <memory unit='MiB'>64</memory>",
        "  <vcpu>1</vcpu>",
        "  <os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "  <on_crash>destroy</on_crash>",
        "  <devices>",
    ]
    for spec, path in disks:
        if spec.device == "cdrom":
            lines.append(
                f"    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                f"<source file='{path}'/><target dev='{spec.target}' bus='ide'/>"
                f"<readonly/></disk>"
            )
        elif spec.block_device:
            lines.append(
                f"    <disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                f"<source dev='{spec.block_device}'/><target dev='{spec.target}' bus='virtio'/>"
                f"</disk>"
            )
        elif spec.data_file:
            lines.append(
                f"    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file='{path}'><dataStore type='file'><format type='raw'/>"
                f"<source file='{data_file_path(path)}'/></dataStore></source>"
                f"<target dev='{spec.target}' bus='virtio'/></disk>"
            )
        else:
            lines.append(
                f"    <disk type='file' device='disk'><driver name='qemu' type='{spec.format}'/>"
                f"<source file='{path}'/><target dev='{spec.target}' bus='virtio'/></disk>"
            )
    if agent_channel:  # the channel only: no guest agent answers in a VM without an OS
        lines.append(
            "    <channel type='unix'>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        )
    lines += ["    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>", "  </devices>"]
    lines.append("</domain>")
    return "\n".join(lines)


_connection: libvirt.virConnect | None = None


def connect() -> libvirt.virConnect:
    """The tests' connection to the system libvirtd, reopened after a restart."""
    global _connection
    if _connection is None or not _alive(_connection):
        for _ in range(200):
            try:
                _connection = libvirt.open(URI)
                break
            except libvirt.libvirtError:
                time.sleep(0.1)
        else:
            _connection = libvirt.open(URI)
    return _connection


def _alive(connection: libvirt.virConnect) -> bool:
    try:
        connection.getLibVersion()  # a real round trip: isAlive() can be stale
        return bool(connection.isAlive())
    except libvirt.libvirtError:
        return False


@dataclass
class TestVM:
    __test__ = False  # not a test class, whatever pytest thinks of its name

    name: str
    directory: str
    specs: list[DiskSpec]
    paths: dict[str, str] = field(default_factory=dict)
    uuid: str = ""

    @property
    def domain(self) -> libvirt.virDomain:
        return connect().lookupByName(self.name)

    def start(self) -> None:
        self.domain.create()

    def write(self, target: str, *writes: Write) -> None:
        """Write into the running guest's disk *target*, through the device."""
        alias = self._alias(target)
        for write in writes:
            command = f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "{write.qemu_io()}"'
            output = libvirt_qemu.qemuMonitorCommand(
                self.domain, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
            assert "error" not in output.lower(), output

    def _alias(self, target: str) -> str:
        root = ET.fromstring(self.domain.XMLDesc(0))
        for disk in root.findall("./devices/disk"):
            if disk.find("target").get("dev") == target:
                return disk.find("alias").get("name")
        raise KeyError(target)

    def tops(self, inactive: bool = False) -> dict[str, str]:
        """target -> top image path, from the live or the persistent XML."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        root = ET.fromstring(self.domain.XMLDesc(flags))
        return {
            disk.find("target").get("dev"): disk.find("source").get("file")
            for disk in root.findall("./devices/disk")
            if disk.get("type") == "file"
        }

    def has_mirror(self) -> bool:
        return "<mirror" in self.domain.XMLDesc(0)

    def is_running(self) -> bool:
        return self.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    def stop(self) -> None:
        """Graceful destroy: QEMU flushes its images before exiting."""
        domain = self.domain
        if domain.isActive():
            domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        for _ in range(100):
            if not domain.isActive():
                return
            time.sleep(0.05)

    def tagged_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if ".bnkvm-" in n)

    def remove(self) -> None:
        try:
            domain = self.domain
            if domain.isActive():
                domain.destroy()
            domain.undefineFlags(UNDEFINE)
        except libvirt.libvirtError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.uuid:
            remove_state(self.uuid)


def make_vm(
    specs: list[DiskSpec], start: bool = True, transient: bool = False, agent_channel: bool = False
) -> TestVM:
    name = PREFIX + uuid.uuid4().hex[:8]
    directory = os.path.join(IMAGE_ROOT, name)
    os.makedirs(directory, mode=0o755)
    os.chmod(IMAGE_ROOT, 0o755)
    vm = TestVM(name, directory, specs)
    disks = []
    for spec in specs:
        extension = "iso" if spec.device == "cdrom" else spec.format
        path = os.path.join(directory, f"{spec.target}.{extension}")
        if spec.block_device:
            path = spec.block_device
        create_image(path, spec)
        if spec.data_file:
            # libvirt 9.0 has no <dataStore>: QEMU opens the data file the
            # header names, which libvirt does not hand over to its user.
            shutil.chown(data_file_path(path), "libvirt-qemu")
        if not spec.block_device:
            vm.paths[spec.target] = path
        disks.append((spec, path))
    if transient:  # exists only while it runs: no persistent definition
        vm.uuid = connect().createXML(domain_xml(name, disks, agent_channel), 0).UUIDString()
        return vm
    vm.uuid = connect().defineXML(domain_xml(name, disks, agent_channel)).UUIDString()
    if start:
        vm.start()
    return vm


def remove_leftover_vms() -> None:
    """Remove test VMs that an interrupted earlier run left behind."""
    for domain in connect().listAllDomains(0):
        if domain.name().startswith(PREFIX):
            persistent = domain.isPersistent()
            if domain.isActive():
                domain.destroy()
            if persistent:
                domain.undefineFlags(UNDEFINE)
    shutil.rmtree(IMAGE_ROOT, ignore_errors=True)
    for journal_uuid in journal.all_journals():
        try:
            left = journal.read(journal_uuid)
        except journal.JournalError:
            continue
        if left is not None and left.domain.startswith(PREFIX):
            remove_state(journal_uuid)


def remove_state(domain_uuid: str) -> None:
    """Forget a test VM's journal and pull record: a test that failed may
    leave them, and a later `status` or `recover` would take them for the
    journal of a vanished domain."""
    for path in (journal.journal_path(domain_uuid), journal.pulled_path(domain_uuid)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
