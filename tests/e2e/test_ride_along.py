"""End to end: stage = freeze and stage = thaw ride along in backupninja's own
.rsync, .borg and .restic actions, run by the real backupninja on one scratch
backup.d (``backupninja --now``: every action in backupninja's order).

Each test has a running two-disk VM (qcow2 + sparse raw), writes into the
guest before the freeze and, from a backupninja .sh action between the freeze
and the ship, during the window; the shipped images are compared with
reference images holding the first writes only, and the VM's own images
afterwards with references holding both.
"""

from __future__ import annotations

import os

import pytest

from backupninja_kvm import ride
from tests.support.ninja import Ninja
from tests.support.riding import (
    Trio,
    clean_up,
    guest_write_script,
    rsync_text,
    view_mounts,
    wait_for_guard,
)
from tests.support.vms import DiskSpec, MiB, Write, reference_image, same_content

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]

SPECS = [DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 64 * MiB)]
BEFORE = {"vda": [Write(0x11, 0, MiB)], "vdb": [Write(0x22, 8 * MiB, MiB)]}
DURING = {"vda": [Write(0x33, 2 * MiB, MiB)], "vdb": [Write(0x44, 20 * MiB, MiB)]}


@pytest.fixture
def trio(scratch):
    made = Trio(Ninja(scratch), scratch)
    yield made
    clean_up(made.view)


@pytest.fixture
def vm(new_vm):
    made = new_vm(SPECS)
    for target, writes in BEFORE.items():
        made.write(target, *writes)
    return made


def references(directory: str, writes: dict[str, list[Write]]) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    return {
        spec.target: reference_image(directory, spec.target, spec, writes[spec.target])
        for spec in SPECS
    }


def window_writes(trio: Trio, vm) -> None:
    script = "".join(guest_write_script(vm, t, *w) for t, w in DURING.items())
    trio.ninja.action("15-guest-writes.sh", script)


def assert_back_on_own_images_with_every_write(vm, scratch: str) -> None:
    assert vm.tops() == vm.paths and vm.is_running() and vm.tagged_files() == []
    both = {t: BEFORE[t] + DURING[t] for t in BEFORE}
    expected = references(os.path.join(scratch, "ref-after"), both)
    for spec in SPECS:
        assert same_content(vm.paths[spec.target], spec.format, expected[spec.target], spec.format)


def assert_frozen_copies(folder: str, vm, scratch: str) -> None:
    """*folder* holds exactly the frozen images, the definition and the manifest."""
    expected = references(os.path.join(scratch, "ref-frozen"), BEFORE)
    names = sorted(os.listdir(folder))
    assert names == ["domain.xml", "manifest.json", "vda-vda.qcow2", "vdb-vdb.raw"], names
    for spec in SPECS:
        copy = os.path.join(folder, f"{spec.target}-{spec.target}.{spec.format}")
        assert same_content(copy, spec.format, expected[spec.target], spec.format), copy


def test_rsync_ships_the_frozen_images_and_the_thaw_merges_every_write(trio, vm, scratch):
    dest = os.path.join(scratch, "rsync-dest")
    os.makedirs(os.path.join(dest, "host"))
    trio.freeze(vm.name)
    window_writes(trio, vm)
    trio.ninja.action("20-vms.rsync", rsync_text(trio.view, dest))
    trio.thaw()

    result = trio.ninja.run_all()

    assert result.lines("Error") == [] and result.lines("Fatal") == [], result.log
    thawed = [line for line in result.lines("Info") if f"{vm.name}: thawed: frozen" in line]
    assert len(thawed) == 1 and "merged by commit in" in thawed[0], result.log
    shipped = os.path.join(dest, "host", trio.view.lstrip("/"), vm.name)
    assert_frozen_copies(shipped, vm, scratch)
    raw_copy = os.path.join(shipped, "vdb-vdb.raw")
    assert os.stat(raw_copy).st_blocks * 512 <= 4 * MiB  # 1 MiB of data in 64 MiB: holes kept
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert view_mounts(trio.view) == [] and os.listdir(trio.view) == []
    assert wait_for_guard(trio.view) is None and ride.read(trio.view) is None


def test_a_shut_off_domain_is_exposed_and_a_start_while_exposed_is_an_error(trio, new_vm, scratch):
    vm = new_vm(SPECS, start=False)
    dest = os.path.join(scratch, "rsync-dest")
    os.makedirs(os.path.join(dest, "host"))
    trio.freeze(vm.name)
    trio.ninja.action("20-vms.rsync", rsync_text(trio.view, dest))
    trio.thaw()

    quiet = trio.ninja.run_all()

    assert quiet.lines("Error") == [] and quiet.lines("Fatal") == [], quiet.log
    assert any(f"{vm.name}: thawed: shut off" in line for line in quiet.lines("Info")), quiet.log
    shipped = os.path.join(dest, "host", trio.view.lstrip("/"), vm.name)
    assert sorted(os.listdir(shipped)) == [
        "domain.xml",
        "manifest.json",
        "vda-vda.qcow2",
        "vdb-vdb.raw",
    ]

    # the same night, but the domain is started (and written) while exposed
    write = Write(0x55, 0, MiB).qemu_io()
    trio.ninja.action(
        "30-start.sh",
        f"virsh -q start {vm.name}\n"
        f"virsh -q qemu-monitor-command --hmp {vm.name} "
        f"'qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend \"{write}\"'\n",
    )
    started = trio.ninja.run_all()

    changed = [line for line in started.lines("Error") if "changed while it was exposed" in line]
    assert changed and vm.name in changed[0], started.log
    assert vm.is_running() and vm.tops() == vm.paths and vm.tagged_files() == []
    assert view_mounts(trio.view) == [] and ride.read(trio.view) is None
