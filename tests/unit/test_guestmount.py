"""What mount names its folders, what it leaves out, and what it finds mounted."""

from __future__ import annotations

import pytest

from backupninja_kvm.guestmount import (
    GuestMountError,
    Planned,
    Skipped,
    choose_disks,
    folder_name,
    fuse_mount_points,
    guestfs_environment,
    plan_mounts,
)
from backupninja_kvm.setinfo import SetImage, SetInfo

TARGETS = ["vda", "vdb", "sdc"]


@pytest.mark.parametrize(
    ("device", "name"),
    [
        ("/dev/sda1", "vda1"),  # partition 1 of the first disk added: vda
        ("/dev/sdb", "vdb"),  # a filesystem on the whole second disk
        ("/dev/sdc15", "sdc15"),
        ("/dev/vg0/root", "vg0-root"),  # a logical volume in the guest
        ("/dev/md127", "md127"),
        ("/dev/mapper/luks-1234", "luks-1234"),
        ("/dev/sdaa1", "sdaa1"),  # a 27th disk that was not added: libguestfs's name
    ],
)
def test_folders_are_named_after_the_guests_disks(device, name):
    assert folder_name(device, TARGETS) == name


def test_swap_physical_volumes_and_subvolumes_are_left_out_with_a_reason():
    planned, skipped = plan_mounts(
        {
            "/dev/sda2": "swap",
            "/dev/sda3": "unknown",  # an LVM physical volume
            "/dev/sda1": "ext4",
            "btrfsvol:/dev/sdb/@home": "btrfs",
            "/dev/sdb": "btrfs",
            "/dev/vg0/root": "xfs",
        },
        TARGETS,
    )

    assert planned == [
        Planned("/dev/sda1", "ext4", "vda1"),
        Planned("/dev/sdb", "btrfs", "vdb"),
        Planned("/dev/vg0/root", "xfs", "vg0-root"),
    ]
    assert [(s.name, s.reason) for s in skipped] == [
        ("vda2", "swap"),
        ("vda3", "no filesystem libguestfs recognises"),
        ("btrfsvol:/dev/sdb/@home", "a btrfs subvolume: a folder of its filesystem"),
    ]
    assert all(isinstance(s, Skipped) for s in skipped)


def test_partitions_come_in_numeric_order_and_names_stay_unique():
    planned, _ = plan_mounts(
        {"/dev/sda10": "ext4", "/dev/sda2": "ext4", "/dev/a/b": "ext4", "/dev/a-b": "ext4"},
        ["vda"],
    )
    assert [p.name for p in planned] == ["vda2", "vda10", "a-b", "a-b-2"]


def test_fuse_mount_points_are_read_from_mountinfo_with_escapes():
    mountinfo = (
        "24 1 0:21 / / rw,relatime - ext4 /dev/root rw\n"
        "45 27 0:40 / /var/tmp/restore\\040web1 rw,nosuid,nodev - fuse /dev/fuse rw,user_id=0\n"
        "46 27 0:41 / /mnt/usb rw - fuseblk /dev/sdz1 rw\n"
        "47 27 0:42 / /mnt/sshfs rw - fuse.sshfs host:/ rw\n"
    )
    assert fuse_mount_points(mountinfo) == ["/var/tmp/restore web1", "/mnt/usb", "/mnt/sshfs"]


def _info(*targets: str) -> SetInfo:
    files = tuple(
        SetImage(f"{t}-img.qcow2", t, "disk", f"/images/{t}.qcow2", "qcow2", 0) for t in targets
    )
    return SetInfo("web1", "", "", "unknown", files)


def test_a_disk_is_chosen_by_its_target_and_an_unknown_one_lists_the_others():
    info = _info("vdb", "vda")
    assert [d.target for d in choose_disks(info, None, "set S")] == ["vda", "vdb"]
    assert [d.target for d in choose_disks(info, "vdb", "set S")] == ["vdb"]
    with pytest.raises(
        GuestMountError, match="set S: no disk 'vdc' in this set; its disks are vda, vdb"
    ):
        choose_disks(info, "vdc", "set S")


def test_the_environment_keeps_what_the_administrator_set():
    assert guestfs_environment({}, lambda: True) == {"LIBGUESTFS_BACKEND": "direct"}
    assert guestfs_environment({}, lambda: False) == {
        "LIBGUESTFS_BACKEND": "direct",
        "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
    }
    chosen = {"LIBGUESTFS_BACKEND": "libvirt", "LIBGUESTFS_BACKEND_SETTINGS": ""}
    assert guestfs_environment(chosen, lambda: False) == {}
