"""``mount`` and ``umount`` on a real set: a VM whose disks hold real
filesystems (ext4 in partition 1 of a raw disk, ext4 on a whole qcow2 disk,
ext4 and vfat on logical volumes of a guest volume group) is backed up by
the product, then its files are read back through libguestfs, and the set is
shown to be unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from backupninja_kvm import config, destination
from backupninja_kvm.guestmount import (
    fuse_mount_points,
    guestfs_environment,
    kvm_runs_appliance_cpu,
)
from tests.conftest import write_action
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import DiskSpec, MiB, make_vm

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(shutil.which("guestunmount") is None, reason="needs libguestfs-tools"),
]

PARTITION_START = 2048  # sectors of 512 bytes: partition 1 at 1 MiB
KNOWN = b"restored from partition 1 of vda\n"
DATA = b"restored from the whole disk vdb\n"
LOGICAL = b"restored from the logical volume guestvg/root\n"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _partitioned_ext4(path: str, contents: str) -> None:
    """A raw disk with an msdos partition table; partition 1 is ext4 holding *contents*."""
    with open(path, "wb") as handle:
        handle.truncate(64 * MiB)
    subprocess.run(
        ["sfdisk", "-q", path], input=f"label: dos\nstart={PARTITION_START}, type=83\n",
        text=True, check=True, capture_output=True,
    )  # fmt: skip
    size = 64 * MiB - PARTITION_START * 512
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-d", contents,
         "-E", f"offset={PARTITION_START * 512}", path, f"{size // 1024}k")  # fmt: skip


def _whole_disk_ext4_qcow2(path: str, contents: str, work: str) -> None:
    raw = os.path.join(work, "vdb.raw")
    with open(raw, "wb") as handle:
        handle.truncate(32 * MiB)
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-d", contents, raw)
    _run("qemu-img", "convert", "-O", "qcow2", raw, path)


def _guest_lvm(path: str) -> None:
    """A raw disk whose partition 1 is the physical volume of the volume
    group guestvg: root (ext4, etc/known.txt) and efi (vfat). The host may
    have no device-mapper, so libguestfs's own appliance builds it."""
    import guestfs  # type: ignore[import-not-found]

    handle = guestfs.GuestFS(python_return_dict=True)
    try:  # as mount chooses, without changing the environment the helper sees
        added = guestfs_environment({}, kvm_runs_appliance_cpu)
        handle.set_backend(added["LIBGUESTFS_BACKEND"])
        if "LIBGUESTFS_BACKEND_SETTINGS" in added:
            handle.set_backend_settings([added["LIBGUESTFS_BACKEND_SETTINGS"]])
        handle.add_drive_opts(path, format="raw")
        handle.launch()
        handle.part_disk("/dev/sda", "msdos")
        handle.pvcreate("/dev/sda1")
        handle.vgcreate("guestvg", ["/dev/sda1"])
        handle.lvcreate("root", "guestvg", 24)
        handle.lvcreate_free("efi", "guestvg", 100)
        handle.mkfs("ext4", "/dev/guestvg/root")
        handle.mkfs("vfat", "/dev/guestvg/efi")
        handle.mount("/dev/guestvg/root", "/")
        handle.mkdir("/etc")
        handle.write("/etc/known.txt", LOGICAL)
        handle.umount_all()
        handle.shutdown()
    finally:
        handle.close()


def _fuse_mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return fuse_mount_points(handle.read())


def _unmount_leftovers(under: str) -> None:
    for point in _fuse_mounts():
        if point == under or point.startswith(under + os.sep):
            subprocess.run(["guestunmount", "--retry=5", point], capture_output=True)
            subprocess.run(["fusermount", "-u", "-z", point], capture_output=True)


@pytest.fixture(scope="module")
def backed_up_set(connection):
    """(set path, work folder): a set of a running VM with vda (raw, msdos,
    ext4 in partition 1), vdb (qcow2, ext4 on the whole disk) and vdc (raw,
    LVM in partition 1), each with etc/known.txt."""
    work = tempfile.mkdtemp(prefix="bnkvm-gm-", dir="/var/tmp")
    os.chmod(work, 0o700)
    disks = [
        DiskSpec("vda", "raw", 64 * MiB),
        DiskSpec("vdb", "qcow2", 32 * MiB),
        DiskSpec("vdc", "raw", 64 * MiB),
    ]
    vm = make_vm(disks, start=False)
    try:
        for name, text in (("vda-files", KNOWN), ("vdb-files", DATA)):
            os.makedirs(os.path.join(work, name, "etc"))
            with open(os.path.join(work, name, "etc", "known.txt"), "wb") as handle:
                handle.write(text)
        _partitioned_ext4(vm.paths["vda"], os.path.join(work, "vda-files"))
        _whole_disk_ext4_qcow2(vm.paths["vdb"], os.path.join(work, "vdb-files"), work)
        _guest_lvm(vm.paths["vdc"])
        vm.start()
        backups = os.path.join(work, "backups")
        os.makedirs(backups)
        action = write_action(
            os.path.join(work, "gm.kvm"),
            f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {backups}\n",
        )
        back_up(vm, config.load(action))
        domain_dir = os.path.join(backups, vm.name)
        (stamp,) = destination.complete_sets(domain_dir)
        yield os.path.join(domain_dir, stamp), work
    finally:
        _unmount_leftovers(work)
        vm.remove()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def mount_point(backed_up_set):
    """A path for a mount point (not created); unmounted afterwards whatever happens."""
    path = tempfile.mktemp(prefix="mnt-", dir=backed_up_set[1])
    yield path
    _unmount_leftovers(path)


def _snapshot(set_path: str) -> dict[str, tuple[int, int]]:
    """Every file of the set (and the set folder): size and mtime in ns."""
    found = {".": (0, os.stat(set_path).st_mtime_ns)}
    for name in os.listdir(set_path):
        status = os.stat(os.path.join(set_path, name))
        found[name] = (status.st_size, status.st_mtime_ns)
    return found


def _manifest_checks(set_path: str) -> None:
    result = subprocess.run(
        ["b3sum", "-c", destination.MANIFEST], cwd=set_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mount_shows_each_guest_filesystem_read_only_and_umount_removes_it(
    backed_up_set, mount_point
):
    set_path, _ = backed_up_set
    before = _snapshot(set_path)

    mounted = helper("mount", set_path, mount_point)

    assert mounted.returncode == 0, mounted.stdout + mounted.stderr
    assert sorted(os.listdir(mount_point)) == ["guestvg-efi", "guestvg-root", "vda1", "vdb"]
    with open(os.path.join(mount_point, "vda1", "etc", "known.txt"), "rb") as handle:
        assert handle.read() == KNOWN
    with open(os.path.join(mount_point, "vdb", "etc", "known.txt"), "rb") as handle:
        assert handle.read() == DATA
    with open(os.path.join(mount_point, "guestvg-root", "etc", "known.txt"), "rb") as handle:
        assert handle.read() == LOGICAL
    with pytest.raises(OSError), open(os.path.join(mount_point, "vda1", "new.txt"), "wb"):
        pass
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        (line,) = [line for line in handle if f" {mount_point} " in line]
    assert " ro," in line, line  # read-only for the kernel too
    assert f"{mount_point}/vda1 (ext4)" in mounted.stdout
    assert f"{mount_point}/guestvg-efi (vfat)" in mounted.stdout

    unmounted = helper("umount", mount_point)

    assert unmounted.returncode == 0, unmounted.stdout + unmounted.stderr
    assert mount_point not in _fuse_mounts()
    assert not os.path.exists(mount_point)  # mount created it, umount removed it
    assert _snapshot(set_path) == before
    _manifest_checks(set_path)


def test_mount_of_one_disk_shows_only_it_and_keeps_a_mount_point_it_did_not_make(
    backed_up_set, mount_point
):
    set_path, _ = backed_up_set
    os.mkdir(mount_point)

    mounted = helper("mount", set_path, "vdb", mount_point)

    assert mounted.returncode == 0, mounted.stdout + mounted.stderr
    assert os.listdir(mount_point) == ["vdb"]
    with open(os.path.join(mount_point, "vdb", "etc", "known.txt"), "rb") as handle:
        assert handle.read() == DATA
    unmounted = helper("umount", mount_point)
    assert unmounted.returncode == 0, unmounted.stdout + unmounted.stderr
    assert mount_point not in _fuse_mounts()
    assert os.path.isdir(mount_point) and os.listdir(mount_point) == []
    _manifest_checks(set_path)


def test_an_unknown_disk_is_refused_naming_the_set_and_its_disks(backed_up_set, mount_point):
    set_path, _ = backed_up_set

    result = helper("mount", set_path, "vdz", mount_point)

    assert result.returncode == 2
    assert f"Fatal: set {set_path}: no disk 'vdz' in this set; its disks are vda, vdb, vdc" in (
        result.stdout
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not os.path.exists(mount_point)


def test_a_mount_point_that_is_not_empty_is_refused(backed_up_set, mount_point):
    set_path, _ = backed_up_set
    os.mkdir(mount_point)
    with open(os.path.join(mount_point, "keep.txt"), "w") as handle:
        handle.write("mine\n")

    result = helper("mount", set_path, mount_point)

    assert result.returncode == 2
    assert f"Fatal: {mount_point}: the mount point is not empty" in result.stdout
    assert os.listdir(mount_point) == ["keep.txt"]
    assert mount_point not in _fuse_mounts()


def test_a_folder_that_is_not_a_set_and_an_unknown_mount_point_are_refused(scratch):
    result = helper("mount", scratch, os.path.join(scratch, "mnt"))
    assert result.returncode == 2
    assert f"Fatal: {scratch}: not a set (no B3SUMS, SHA256SUMS, set.json" in result.stdout
    assert not os.path.exists(os.path.join(scratch, "mnt"))

    result = helper("umount", scratch)
    assert result.returncode == 2
    assert f"Fatal: {scratch}: no set is mounted there by backupninja-kvm" in result.stdout
