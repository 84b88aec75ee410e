"""Changed blocks against the real libvirtd and QEMU: many nights of a
running VM, each set made from the previous one and what changed.

Each night the guest writes before the backup (random data, zero writes,
discards), and again during the window (on the overlay). The window hook
first copies the frozen base with ``qemu-img convert``: the reference of
the freeze instant that the night's set must equal, byte for byte in the
guest's view. Between nights the VM is restarted, its QEMU killed, its disk
resized: the first night after each is a full copy, and the night after
that is changed blocks again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import time

import libvirt
import libvirt_qemu
import pytest

from backupninja_kvm import b3tree, changed, config, destination, faults, setinfo
from tests.conftest import write_action
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import (
    UNDEFINE,
    DiskSpec,
    MiB,
    Write,
    connect,
    reference_image,
    run,
    same_content,
    xfs_filesystem,
)

pytestmark = pytest.mark.libvirt

SIZE = 64 * MiB
DISKS = [DiskSpec("vda", "qcow2", SIZE), DiskSpec("vdb", "raw", 16 * MiB)]
KiB = 1024


@pytest.fixture
def xfs(scratch):
    """An XFS filesystem with reflinks, on a loop device, for the sets."""
    with xfs_filesystem(scratch, 1024 * MiB) as mount:
        yield mount


def action(folder: str, scratch: str, **dest: str) -> config.Settings:
    backups = os.path.join(folder, "backups")
    os.makedirs(backups, exist_ok=True)
    text = "[general]\nmerge_timeout = 60\n[source]\ndomains = all\n[dest]\n"
    text += f"directory = {backups}\n" + "".join(f"{k} = {v}\n" for k, v in dest.items())
    return config.load(write_action(os.path.join(scratch, "vm.kvm"), text))


def io(vm, target: str, command: str) -> None:
    """One qemu-io command on the running guest's disk, through the device."""
    alias = vm._alias(target)
    output = libvirt_qemu.qemuMonitorCommand(
        vm.domain,
        f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "{command}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    assert "error" not in output.lower(), output


GRANULE = 64 * KiB  # the checkpoints' bitmap granularity (the qcow2 cluster size)
WRITES: list[tuple[str, int, int]] = []  # every (kind, offset, length) sent to vda


def random_writes(vm, rng: random.Random, count: int, size: int = SIZE) -> None:
    """Data, zero writes and discards, 4 KiB to 1 MiB, anywhere on vda."""
    for _ in range(count):
        length = rng.choice([4, 60, 64, 256, 1024]) * KiB
        offset = rng.randrange(0, size - length, 512)
        kind = rng.random()
        if kind < 0.7:
            io(vm, "vda", f"write -P {rng.randrange(1, 255):#x} {offset} {length}")
            WRITES.append(("write", offset, length))
        elif kind < 0.85:
            io(vm, "vda", f"write -z {offset} {length}")
            WRITES.append(("write", offset, length))
        else:
            io(vm, "vda", f"discard {offset} {length}")
            WRITES.append(("discard", offset, length))


def granules(writes, kinds) -> int:
    """Bytes of the 64 KiB granules that *writes* of these *kinds* touch."""
    touched = set()
    for kind, offset, length in writes:
        if kind in kinds:
            touched.update(range(offset // GRANULE, -(-(offset + length) // GRANULE)))
    return len(touched) * GRANULE


class Window:
    """Copy the frozen base (the freeze instant's reference), then write."""

    def __init__(self, vm, rng: random.Random, folder: str):
        self.vm, self.rng, self.folder, self.night = vm, rng, folder, 0
        self.references: dict[int, str] = {}

    def __call__(self, _domain, overlays):
        reference = os.path.join(self.folder, f"ref-{self.night}.qcow2")
        run("qemu-img", "convert", "-U", "-O", "qcow2", self.vm.paths["vda"], reference)
        self.references[self.night] = reference
        random_writes(self.vm, self.rng, 10)


def tracking_of(set_path: str) -> setinfo.Tracking:
    tracking = next(f for f in setinfo.read(set_path).disks() if f.target == "vda").tracking
    assert tracking is not None
    return tracking


def our_checkpoints(vm) -> list[str]:
    return [c.getName() for c in vm.domain.listAllCheckpoints() if c.getName().startswith("bnkvm-")]


def qemu_pid(vm) -> int:
    with open(f"/run/libvirt/qemu/{vm.name}.pid") as handle:
        return int(handle.read())


def restart(vm) -> None:
    vm.stop()
    vm.start()


def kill_qemu(vm) -> None:
    os.kill(qemu_pid(vm), signal.SIGKILL)
    for _ in range(200):
        if not vm.domain.isActive():
            break
        time.sleep(0.05)
    vm.start()


def resize(vm) -> None:
    vm.domain.blockResize("vda", SIZE + 16 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)


def test_many_nights_each_set_is_its_freeze_instant_and_stands_alone(new_vm, scratch, xfs):
    vm = new_vm(DISKS)
    settings = action(xfs, scratch, keep="20")
    connect().lookupByName(vm.name).checkpointCreateXML(
        "<domaincheckpoint><name>admins-own</name><disks><disk name='vda' checkpoint='bitmap'/>"
        "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>"
    )
    rng = random.Random(12)
    window = Window(vm, rng, scratch)
    # night -> what happens before it, and whether it may be changed-only
    # (a resize after the kill would be refused: QEMU resizes no disk with an
    # inconsistent bitmap, and the administrator's checkpoint is one then)
    events = {4: restart, 6: resize, 8: kill_qemu}
    expect_full = {1, 4, 6, 8}
    sets = {}
    size = SIZE
    WRITES.clear()
    since = 0  # WRITES[since:]: what was written after the last checkpoint
    for night in range(1, 11):
        if night in events:
            events[night](vm)
            size = SIZE + 16 * MiB if night >= 6 else SIZE
        random_writes(vm, rng, 30, size)
        io(vm, "vdb", f"write -P {night:#x} {night * MiB} {MiB}")
        window.night = night
        written_before = len(WRITES)  # then the window's, after the checkpoint
        outcome = back_up(vm, settings, window, stamp=f"202612{night:02d}T010000")
        changes, since = WRITES[since:written_before], written_before
        sets[night] = outcome.set_path
        tracking = tracking_of(outcome.set_path)
        if night in expect_full:
            assert tracking.how == "full", (night, tracking)
            assert tracking.reason, night
            assert "vda" not in outcome.changes
        else:
            assert tracking.how == "changed", (night, tracking)
            read, written = outcome.changes["vda"]
            assert read == tracking.bytes_read and written == tracking.bytes_written
            # exactly what changed, to the granule: QEMU ignores a discard
            # here (no discard='unmap'), which may or may not mark the bitmap
            least = granules(changes, {"write"})
            assert least <= read <= granules(changes, {"write", "discard"}), (night, read, least)
            assert written <= read
            assert "vda changed blocks only" in outcome.summary()
        image = os.path.join(outcome.set_path, "vda-vda.qcow2")
        assert same_content(window.references[night], "qcow2", image, "qcow2"), night
        # the sum is kept as a tree; a changed night rereads only the leaves
        # whose blocks it no longer shares with the previous set's image
        assert os.path.isfile(image + ".b3tree"), night
        hashed, whole = outcome.hashed["vda-vda.qcow2"], b3tree.hash_file(image).bytes_hashed
        if night in expect_full:
            assert hashed == whole, (night, hashed, whole)
        else:
            assert 0 < hashed < whole, (night, hashed, whole)
        # bitmaps never accumulate: tonight's checkpoint, and the admin's own
        ours = our_checkpoints(vm)
        assert ours == [tracking.checkpoint], (night, ours)
        assert "admins-own" in [c.getName() for c in vm.domain.listAllCheckpoints()]
    assert tracking_of(sets[4]).reason.startswith("the domain was restarted")
    assert tracking_of(sets[6]).reason.startswith("its size changed")
    assert tracking_of(sets[8]).reason.startswith("the domain was restarted")
    assert tracking_of(sets[5]).nights == 1 and tracking_of(sets[10]).nights == 2

    # Every set is whole: its manifest is the file's, and with every other
    # set removed, each still verifies and equals its freeze instant.
    for night, set_path in sets.items():
        checked = subprocess.run(["b3sum", "-c", "B3SUMS"], cwd=set_path, capture_output=True)
        assert checked.returncode == 0, (night, checked.stdout)
    # ... and each one stands alone: with every other set moved away, it
    # verifies, equals its freeze instant, and restores as a copy that starts
    # with that content (a restore reads only the set it is given).
    parking = os.path.join(xfs, "parked")
    os.mkdir(parking)
    for night, set_path in sets.items():
        others = [p for n, p in sets.items() if n != night]
        for other in others:
            os.rename(other, os.path.join(parking, os.path.basename(other)))
        try:
            stands_alone(vm, scratch, night, set_path, window.references[night])
        finally:
            for other in others:
                os.rename(os.path.join(parking, os.path.basename(other)), other)
    image = os.path.join(sets[10], "vda-vda.qcow2")
    # only the administrator's bitmap: ours are stripped from the set's copies
    listed = json.loads(run("qemu-img", "info", "--output=json", image))
    names = [b["name"] for b in listed["format-specific"]["data"].get("bitmaps", [])]
    assert names == ["admins-own"], names


def stands_alone(vm, scratch: str, night: int, set_path: str, reference: str) -> None:
    verified = helper("verify", set_path)
    assert verified.returncode == 0, (night, verified.stdout)
    image = os.path.join(set_path, "vda-vda.qcow2")
    # 0: clean; 3: leaked clusters only, which the image had when its QEMU was
    # killed (night 8): the set copies the file as it was, unused space too
    checked = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    assert checked.returncode in (0, 3), (night, checked.stdout, checked.stderr)
    assert "ERROR" not in checked.stdout and "corrupt" not in checked.stdout, night
    copy_name, copy_dir = f"{vm.name}-copy", os.path.join(scratch, f"restored-{night}")
    os.mkdir(copy_dir)
    try:
        restored = helper("restore", set_path, "--as", copy_name, "--to", copy_dir)
        assert restored.returncode == 0, (night, restored.stdout + restored.stderr)
        images = [n for n in os.listdir(copy_dir) if n.endswith(".qcow2")]
        assert len(images) == 1, (night, images)
        restored_image = os.path.join(copy_dir, images[0])
        assert same_content(reference, "qcow2", restored_image, "qcow2"), night
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            connect().lookupByName(copy_name).undefineFlags(UNDEFINE)
        run("rm", "-rf", copy_dir)


def test_on_a_filesystem_without_reflinks_the_set_starts_as_a_copy(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", SIZE)])
    settings = action(scratch, scratch)
    rng = random.Random(3)
    window = Window(vm, rng, scratch)
    for night in (1, 2):
        random_writes(vm, rng, 20)
        window.night = night
        outcome = back_up(vm, settings, window, stamp=f"202612{night:02d}T010000")
        image = os.path.join(outcome.set_path, "vda-vda.qcow2")
        assert same_content(window.references[night], "qcow2", image, "qcow2")
    assert tracking_of(outcome.set_path).how == "changed"


def test_no_leaves_every_disk_whole_and_starts_no_checkpoint(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = action(scratch, scratch, changed_blocks="no")
    for night in (1, 2):
        outcome = back_up(vm, settings, stamp=f"202612{night:02d}T010000")
        assert not outcome.changes
        item = setinfo.read(outcome.set_path).disks()[0]
        assert item.tracking is None
    assert our_checkpoints(vm) == []


def test_a_changed_previous_image_or_a_failed_verify_means_a_full_copy(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = action(scratch, scratch)
    first = back_up(vm, settings, stamp="20261201T010000").set_path
    image = os.path.join(first, "vda-vda.qcow2")
    os.utime(image, ns=(0, 0))  # as a bit rot repair or an operator's touch would
    second = back_up(vm, settings, stamp="20261202T010000")
    assert "changed since it was written" in tracking_of(second.set_path).reason
    setinfo.record_check(second.set_path, "verify", {"ok": False, "summary": "damaged"})
    third = back_up(vm, settings, stamp="20261203T010000")
    assert "failed its verification" in tracking_of(third.set_path).reason
    fourth = back_up(vm, settings, stamp="20261204T010000")
    assert tracking_of(fourth.set_path).how == "changed"


def test_a_restore_in_place_means_a_full_copy_and_the_stale_checkpoint_goes(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = action(scratch, scratch)
    first = back_up(vm, settings, stamp="20261201T010000").set_path
    back_up(vm, settings, stamp="20261202T010000")
    vm.stop()
    restored = helper("restore", first, "--force", "--start")
    assert restored.returncode == 0, restored.stdout
    night = back_up(vm, settings, stamp="20261203T010000")
    reason = tracking_of(night.set_path).reason
    assert "restarted" in reason or "another file" in reason, reason
    assert our_checkpoints(vm) == [tracking_of(night.set_path).checkpoint]


def test_sets_shows_how_each_set_was_made(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = action(scratch, scratch)
    for night in (1, 2):
        io(vm, "vda", f"write -P 0x5{night} {night * MiB} {MiB}")
        back_up(vm, settings, stamp=f"202612{night:02d}T010000")
    listed = helper("sets", "-d", settings.directory, vm.name, "--json")
    assert listed.returncode == 0, listed.stdout
    rows = json.loads(listed.stdout)
    made = [row["changed_blocks"] for row in rows]
    assert made[0]["vda"]["how"] == "full" and made[1]["vda"]["how"] == "changed", made
    assert made[1]["vda"]["bytes_written"] >= MiB
    assert made[0]["vda"]["bytes_written"] >= MiB  # the full copy counts its bytes too
    text = helper("sets", "-d", settings.directory, vm.name).stdout
    assert "changed" in text


@pytest.mark.parametrize("signame", ["KILL", "TERM"])
@pytest.mark.parametrize("point", faults.CHANGED_POINTS)
def test_a_kill_at_each_new_point_leaves_the_next_night_correct(new_vm, scratch, point, signame):
    spec = DiskSpec("vda", "qcow2", 32 * MiB)
    vm = new_vm([spec])
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    text = f"[general]\nmerge_timeout = 60\n[source]\ndomains = {vm.name}\n"
    action_file = write_action(
        os.path.join(scratch, "vm.kvm"), text + f"[dest]\ndirectory = {backups}\nkeep = 9\n"
    )
    domain_dir = os.path.join(backups, vm.name)
    phases = [
        [Write(0x11, 0, MiB), Write(0x12, 9 * MiB, 3 * MiB)],
        [Write(0x21, MiB // 2, 64 * KiB), Write(0x22, 20 * MiB, MiB)],
        [Write(0x31, 5 * MiB, 4 * KiB)],
        [Write(0x41, 30 * MiB, 2 * MiB)],
    ]

    def night(number: int, **fault: str):
        vm.write("vda", *phases[number])
        return helper("run", action_file, **fault)

    def work_folders() -> set[str]:  # the exports' sockets
        return {n for n in os.listdir(changed.CHANGES_ROOT) if n.startswith("bnkvm-changes-")}

    before = work_folders()
    first = night(0)
    assert first.returncode == 0, first.stdout
    stopped = night(1, fault=point, signal=signame)
    assert stopped.returncode == (-9 if signame == "KILL" else 2), stopped.stdout + stopped.stderr
    for number in (2, 3):
        done = night(number)
        assert done.returncode == 0, done.stdout
        assert work_folders() <= before, "the killed night's exports folder is still here"
        newest = destination.complete_sets(domain_dir)[-1]
        set_path = os.path.join(domain_dir, newest)
        writes = [w for phase in phases[: number + 1] for w in phase]
        expected = reference_image(scratch, f"expected-{number}", spec, writes)
        image = os.path.join(set_path, "vda-vda.qcow2")
        assert same_content(expected, "qcow2", image, "qcow2"), (point, number)
        assert our_checkpoints(vm) == [tracking_of(set_path).checkpoint]
    # the chain was never broken by the kill: the night after it is changed-only
    assert tracking_of(set_path).how == "changed", tracking_of(set_path)
    assert not [n for n in os.listdir(domain_dir) if n.endswith(".partial")]
    assert subprocess.run(["pgrep", "-f", "qemu-storage-daemon.*" + vm.name]).returncode == 1


def test_a_checkpoint_deleted_by_hand_means_a_full_copy(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = action(scratch, scratch)
    first = back_up(vm, settings, stamp="20261201T010000").set_path
    vm.domain.checkpointLookupByName(tracking_of(first).checkpoint).delete(0)
    second = back_up(vm, settings, stamp="20261202T010000").set_path
    assert tracking_of(second).reason == (f"the checkpoint {tracking_of(first).checkpoint} is gone")
    assert tracking_of(back_up(vm, settings, stamp="20261203T010000").set_path).how == "changed"


class Said(logging.Handler):
    """The product's log lines, as the report would show them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


@pytest.fixture
def said():
    handler = Said()
    logger = logging.getLogger("backupninja_kvm")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_each_remaining_doubt_means_a_full_copy_with_its_reason(new_vm, scratch, said):
    """full_every reached, a previous image without a sum, the previous set
    gone, the disk at another path; a template's disk is always whole. Each
    reason is in set.json and in an Info line, and the night after is
    changed-only again."""
    os.chmod(scratch, 0o755)
    template = os.path.join(scratch, "template.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", template, str(16 * MiB))
    vm = new_vm(
        [DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "qcow2", 16 * MiB, backing=template)]
    )
    settings = action(scratch, scratch, full_every="2", keep="20")
    rng = random.Random(7)
    number = 0

    def night() -> tuple[str, setinfo.Tracking]:
        nonlocal number
        number += 1
        random_writes(vm, rng, 5, 16 * MiB)
        said.lines.clear()
        set_path = back_up(vm, settings, stamp=f"202612{number:02d}T010000").set_path
        disks = {d.target: d for d in setinfo.read(set_path).disks()}
        assert disks["vdb"].tracking is None  # the template's disk: never tracked
        assert any(
            line.startswith("INFO:")
            and "vdb: copied whole every night: its image has a backing file" in line
            for line in said.lines
        ), said.lines
        tracking = disks["vda"].tracking
        if tracking.how == "full":
            assert any(
                line.startswith("INFO:") and f"vda: copied whole: {tracking.reason}" in line
                for line in said.lines
            ), (tracking.reason, said.lines)
        return set_path, tracking

    assert night()[1].reason == "no earlier set"
    assert [night()[1].how for _ in range(2)] == ["changed", "changed"]
    assert night()[1].reason == "2 changed-only sets since the last full copy (full_every)"

    # A previous set whose manifest lacks the image's sum
    set_path, tracking = night()
    assert tracking.how == "changed"
    manifest = os.path.join(set_path, destination.MANIFEST)
    with open(manifest) as handle:
        kept = [line for line in handle if not line.rstrip("\n").endswith("vda-vda.qcow2")]
    with open(manifest, "w") as handle:
        handle.writelines(kept)
    stamp = os.path.basename(set_path)
    assert night()[1].reason == f"the previous set {stamp} has no sum of vda-vda.qcow2"

    # The previous set removed: the one before names a checkpoint that is gone
    before, _ = night()
    gone, tracking = night()
    assert tracking.how == "changed"
    run("rm", "-rf", gone)
    assert night()[1].reason == f"the checkpoint {tracking_of(before).checkpoint} is gone"
    assert night()[1].how == "changed"

    # The disk moved to another file name (the domain redefined while off)
    vm.stop()
    original = vm.paths["vda"]
    moved = os.path.join(os.path.dirname(original), "moved-vda.qcow2")
    os.rename(original, moved)
    xml = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(original, moved)
    connect().defineXML(xml)
    vm.paths["vda"] = moved
    vm.start()
    assert night()[1].reason == f"its image is now {moved}, not {original}"
    assert night()[1].how == "changed"


def test_run_test_says_what_changed_blocks_would_do_and_changes_nothing(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)])
    settings = action(scratch, scratch)

    def test_run() -> list[str]:
        result = helper("run", "--test", settings.path)
        assert result.returncode == 0, result.stdout + result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("Info: test run")]

    said = test_run()
    assert f"Info: test run: {vm.name}: vda: would copy whole: no earlier set" in said, said
    assert any(
        f"{vm.name}: vdb: would copy whole every night: its image is raw" in line for line in said
    ), said
    assert our_checkpoints(vm) == []

    first = back_up(vm, settings, stamp="20261201T010000").set_path
    checkpoint = tracking_of(first).checkpoint
    stray = checkpoint.replace("20261201T010000", "20261130T010000")  # one no set names
    vm.domain.checkpointCreateXML(
        f"<domaincheckpoint><name>{stray}</name><disks><disk name='vda' checkpoint='bitmap'/>"
        "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>"
    )
    said = test_run()
    assert (
        f"Info: test run: {vm.name}: vda: would copy only the blocks changed since the "
        f"checkpoint {checkpoint} (the set {os.path.basename(first)})"
    ) in said, said
    assert (
        f"Info: test run: {vm.name}: would delete the checkpoint {stray}: no set needs it" in said
    )
    # nothing deleted, cloned or started
    assert sorted(our_checkpoints(vm)) == sorted([checkpoint, stray])
    domain_dir = os.path.dirname(first)
    assert sorted(os.listdir(domain_dir)) == sorted([os.path.basename(first), "latest"])
