"""The live cycle against the real libvirtd and QEMU: freeze, ship, merge.

Each test writes into the guest's disks before the freeze, during the backup
window (from the window hook, while the VM runs on its overlays) and after
the merge, then checks the guest-visible bytes of the backup set and of the
live disks against reference images built with the same writes.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backupninja_kvm import config, destination
from backupninja_kvm.backup import back_up_domain
from backupninja_kvm.errors import DomainError
from backupninja_kvm.hypervisor import Hypervisor
from tests.conftest import write_action
from tests.support.cycle import back_up
from tests.support.vms import (
    URI,
    DiskSpec,
    MiB,
    Write,
    reference_image,
    same_content,
    sha256,
    write_offline,
)

TWO_DISKS = [
    DiskSpec("vda", "qcow2", 64 * MiB),
    DiskSpec("vdb", "raw", 32 * MiB),
    DiskSpec("hdc", device="cdrom"),
]

BEFORE = {"vda": [Write(0x11, 0, MiB)], "vdb": [Write(0x21, MiB, MiB)]}
DURING = {
    "vda": [Write(0x12, 0, MiB // 2), Write(0x13, 4 * MiB, MiB)],
    "vdb": [Write(0x22, 3 * MiB, MiB)],
}
AFTER = {"vda": [Write(0x14, 6 * MiB, MiB)], "vdb": [Write(0x23, 5 * MiB, MiB)]}


def settings_for(scratch: str, merge: str = "commit", **extra: str) -> config.Settings:
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups, exist_ok=True)
    lines = [
        "when = everyday at 01:00",
        "[source]",
        "domains = all",  # back_up() is given the VM; nothing is selected by name
        "[general]",
        f"merge = {merge}",
        "merge_timeout = 60",
        "[dest]",
        f"directory = {backups}",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return config.load(write_action(os.path.join(scratch, "vm.kvm"), "\n".join(lines) + "\n"))


class Window:
    """The window hook: records what the VM ran on, and writes into it."""

    def __init__(self, vm, writes):
        self.vm, self.writes, self.tops, self.calls = vm, writes, {}, 0

    def __call__(self, _domain, overlays):
        self.calls += 1
        self.tops = self.vm.tops()
        self.overlays = dict(overlays)
        for target, writes in self.writes.items():
            self.vm.write(target, *writes)


def set_file(set_path: str, target: str, vm) -> str:
    return os.path.join(set_path, f"{target}-{os.path.basename(vm.paths[target])}")


def check_manifest(set_path: str) -> None:
    subprocess.run(["b3sum", "--quiet", "-c", destination.MANIFEST], cwd=set_path, check=True)


@pytest.mark.libvirt
def test_commit_backs_up_the_freeze_instant_and_keeps_every_write(new_vm, scratch):
    vm = new_vm(TWO_DISKS)
    for target, writes in BEFORE.items():
        vm.write(target, *writes)
    window = Window(vm, DURING)

    outcome = back_up(vm, settings_for(scratch), window)
    for target, writes in AFTER.items():
        vm.write(target, *writes)

    # The window really ran on the overlays.
    assert window.calls == 1
    assert window.tops["vda"] == window.overlays["vda"] != vm.paths["vda"]
    assert window.tops["vdb"] == window.overlays["vdb"] != vm.paths["vdb"]

    # The set: complete, with the manifest, the definition and both disks, no cdrom.
    set_path = outcome.set_path
    assert set_path == os.path.join(scratch, "backups", vm.name, "20261127T010000")
    assert sorted(os.listdir(set_path)) == sorted(
        # the qcow2's BLAKE3 tree, for the next night's changed blocks (b3tree)
        ["B3SUMS", "domain.xml", "set.json", "vda-vda.qcow2", "vda-vda.qcow2.b3tree", "vdb-vdb.raw"]
    )
    check_manifest(set_path)
    assert os.readlink(os.path.join(scratch, "backups", vm.name, "latest")) == "20261127T010000"
    assert not any(n.endswith(".partial") for n in os.listdir(os.path.dirname(set_path)))
    definition = Path(set_path, "domain.xml").read_text()
    assert f"<name>{vm.name}</name>" in definition

    # The set holds exactly the disks as of the freeze.
    for spec in TWO_DISKS[:2]:
        expected = reference_image(scratch, f"frozen-{spec.target}", spec, BEFORE[spec.target])
        assert same_content(expected, spec.format, set_file(set_path, spec.target, vm), spec.format)
    frozen_raw = reference_image(scratch, "frozen-raw-vdb", TWO_DISKS[1], BEFORE["vdb"])
    assert sha256(set_file(set_path, "vdb", vm)) == sha256(frozen_raw)

    # The VM runs on its own images again, live and persistent, no overlay left.
    assert vm.is_running()
    assert vm.tops() == vm.paths
    assert vm.tops(inactive=True) == vm.paths
    assert not vm.has_mirror()
    assert vm.tagged_files() == []
    assert outcome.merge == "commit" and outcome.disks == ["vda", "vdb"]

    # Every write is on the live disks: before, during and after the backup.
    vm.stop()
    for spec in TWO_DISKS[:2]:
        writes = BEFORE[spec.target] + DURING[spec.target] + AFTER[spec.target]
        expected = reference_image(scratch, f"live-{spec.target}", spec, writes)
        assert same_content(expected, spec.format, vm.paths[spec.target], spec.format)


@pytest.mark.libvirt
def test_pull_moves_the_disks_onto_the_overlays_and_keeps_every_write(new_vm, scratch):
    vm = new_vm(TWO_DISKS)
    for target, writes in BEFORE.items():
        vm.write(target, *writes)
    window = Window(vm, DURING)

    outcome = back_up(vm, settings_for(scratch, merge="pull"), window)
    for target, writes in AFTER.items():
        vm.write(target, *writes)

    for spec in TWO_DISKS[:2]:
        expected = reference_image(scratch, f"frozen-{spec.target}", spec, BEFORE[spec.target])
        backup = set_file(outcome.set_path, spec.target, vm)
        assert same_content(expected, spec.format, backup, spec.format)
    check_manifest(outcome.set_path)

    # The documented consequence: each disk now runs on the former overlay, a
    # standalone qcow2 image next to the original; the original is unused.
    assert vm.is_running()
    new_tops = {t: p for t, p in vm.tops().items() if t != "hdc"}
    assert new_tops == window.overlays
    assert vm.tops(inactive=True)["vda"] == window.overlays["vda"]
    for path in new_tops.values():
        info = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True
        ).stdout
        assert '"backing-filename"' not in info
    vm.stop()
    for spec in TWO_DISKS[:2]:
        writes = BEFORE[spec.target] + DURING[spec.target] + AFTER[spec.target]
        expected = reference_image(scratch, f"live-{spec.target}", spec, writes)
        assert same_content(expected, spec.format, new_tops[spec.target], "qcow2")
        # The former image holds the freeze instant, like the backup.
        frozen = reference_image(scratch, f"old-{spec.target}", spec, BEFORE[spec.target])
        assert same_content(frozen, spec.format, vm.paths[spec.target], spec.format)


@pytest.mark.libvirt
@pytest.mark.parametrize("merge", ["commit", "pull"])
def test_template_backing_file_is_left_untouched(new_vm, scratch, merge, connection):
    template_dir = os.path.join(scratch, "template")
    os.makedirs(template_dir)
    os.chmod(scratch, 0o755)
    template = os.path.join(template_dir, "template.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, str(64 * MiB)], check=True)
    write_offline(template, "qcow2", [Write(0x77, 0, 8 * MiB)])
    os.chmod(template, 0o644)
    template_sum = sha256(template)

    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB, backing=template)])
    # Another domain on the same template makes it a shared one: not copied.
    new_vm([DiskSpec("vda", "qcow2", 64 * MiB, backing=template)], start=False)
    vm.write("vda", Write(0x11, MiB, MiB))
    outcome = back_up(
        vm, settings_for(scratch, merge=merge), Window(vm, {"vda": [Write(0x12, 2 * MiB, MiB)]})
    )
    vm.write("vda", Write(0x13, 3 * MiB, MiB))

    assert sha256(template) == template_sum
    # The set holds the VM's own layer, which still refers to the template.
    assert sorted(os.listdir(outcome.set_path)) == [
        "B3SUMS",
        "domain.xml",
        "set.json",
        "vda-vda.qcow2",
    ]
    backup = set_file(outcome.set_path, "vda", vm)
    expected_frozen = [Write(0x77, 0, 8 * MiB), Write(0x11, MiB, MiB)]
    reference = reference_image(scratch, "frozen", DiskSpec("vda"), expected_frozen)
    assert same_content(reference, "qcow2", backup, "qcow2")

    top = vm.tops()["vda"]
    vm.stop()
    assert sha256(template) == template_sum
    # The guest's writes are in its own image, on top of the template.
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", top], capture_output=True, text=True
    )
    assert template in info.stdout
    everything = expected_frozen + [Write(0x12, 2 * MiB, MiB), Write(0x13, 3 * MiB, MiB)]
    reference = reference_image(scratch, "live", DiskSpec("vda"), everything)
    assert same_content(reference, "qcow2", top, "qcow2")


@pytest.mark.libvirt
def test_shut_off_domain_is_copied_without_snapshot(new_vm, scratch):
    vm = new_vm(TWO_DISKS, start=False)
    write_offline(vm.paths["vda"], "qcow2", [Write(0x31, 0, MiB)])
    outcome = back_up(vm, settings_for(scratch))
    assert not outcome.live
    reference = reference_image(scratch, "ref", TWO_DISKS[0], [Write(0x31, 0, MiB)])
    assert same_content(reference, "qcow2", set_file(outcome.set_path, "vda", vm), "qcow2")
    check_manifest(outcome.set_path)
    assert not vm.domain.isActive()
    assert vm.tagged_files() == []


@pytest.mark.libvirt
def test_failed_copy_still_merges_reports_error_and_loses_nothing(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB)])
    before, during = [Write(0x11, 0, 8 * MiB)], [Write(0x12, 16 * MiB, MiB)]
    vm.write("vda", *before)
    settings = settings_for(scratch)
    # A file size limit makes the copy fail for real (EFBIG) halfway through
    # the 8 MiB image; Python ignores SIGXFSZ, so the write just fails.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * MiB, limits[1]))
    try:
        with pytest.raises(DomainError, match="copy failed, no backup made"):
            back_up(vm, settings, Window(vm, {"vda": during}))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    domain_dir = os.path.join(settings.directory, vm.name)
    assert os.listdir(domain_dir) == []  # no set, not even a partial one
    assert vm.is_running()
    assert vm.tops() == vm.paths and vm.tops(inactive=True) == vm.paths
    assert vm.tagged_files() == []
    vm.stop()
    reference = reference_image(scratch, "ref", DiskSpec("vda"), before + during)
    assert same_content(reference, "qcow2", vm.paths["vda"], "qcow2")


@pytest.mark.libvirt
def test_destination_without_room_is_refused_before_the_freeze(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB)])
    vm.write("vda", Write(0x11, 0, 8 * MiB))
    small = os.path.join(scratch, "small")
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", small], check=True)
    try:
        settings = config.load(
            write_action(
                os.path.join(scratch, "full.kvm"),
                f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {small}\n",
            )
        )
        window = Window(vm, {})
        with pytest.raises(DomainError, match="not enough free space for the backup set"):
            back_up(vm, settings, window)
        assert window.calls == 0  # never frozen
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", small], check=True)
    assert vm.tops() == vm.paths and vm.tagged_files() == []


@pytest.mark.libvirt
def test_overlay_reserve_is_checked_before_the_freeze(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    overlays = os.path.join(scratch, "overlays")
    os.makedirs(overlays)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", overlays], check=True)
    try:
        lines = f"[source]\ndomains = {vm.name}\noverlaydir = {overlays}\noverlay_reserve = 64\n"
        backups = os.path.join(scratch, "backups")
        os.makedirs(backups)
        lines += f"[dest]\ndirectory = {backups}\n"
        settings = config.load(write_action(os.path.join(scratch, "r.kvm"), lines))
        with pytest.raises(DomainError, match=r"the overlays \(overlay_reserve\)"):
            back_up(vm, settings, Window(vm, {}))
    finally:
        subprocess.run(["umount", overlays], check=True)
    assert vm.tops() == vm.paths


@pytest.mark.libvirt
def test_a_held_domain_lock_skips_the_domain_and_names_the_holder(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = settings_for(scratch)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, vm.name, vm.domain.UUIDString()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            DomainError, match=rf"another backup holds this domain's lock \(pid {holder.pid}"
        ):
            back_up(vm, settings, Window(vm, {}))
    finally:
        holder.kill()
        holder.wait()
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    # Once the holder is gone (even killed), the lock is free again.
    assert back_up(vm, settings).set_path


HOLD_LOCK = """
import sys, time
from backupninja_kvm.lock import domain_lock
with domain_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.libvirt
def test_sets_beyond_keep_are_pruned_and_latest_follows(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    settings = settings_for(scratch, keep="2")
    stamps = ["20261127T010000", "20261128T010000", "20261129T010000"]
    for stamp in stamps:
        back_up(vm, settings, stamp=stamp)
    domain_dir = os.path.join(settings.directory, vm.name)
    assert destination.complete_sets(domain_dir) == stamps[1:]
    assert os.readlink(os.path.join(domain_dir, "latest")) == stamps[-1]


@pytest.mark.libvirt
def test_a_vm_with_snapshots_of_its_own_keeps_them_and_only_our_layer_is_merged(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    vm.write("vda", Write(0x11, 0, MiB))
    theirs = os.path.join(vm.directory, "vda.theirs.qcow2")
    subprocess.run(
        [
            "virsh",
            "-q",
            "-c",
            URI,
            "snapshot-create-as",
            vm.name,
            "theirs",
            "--disk-only",
            "--atomic",
            "--diskspec",
            f"vda,file={theirs}",
        ],
        check=True,
        capture_output=True,
    )
    vm.write("vda", Write(0x12, MiB, MiB))
    original_sum = sha256(vm.paths["vda"])

    outcome = back_up(vm, settings_for(scratch), Window(vm, {"vda": [Write(0x13, 2 * MiB, MiB)]}))

    # Their snapshot and their layer are untouched; our overlay went into theirs.
    listed = subprocess.run(
        ["virsh", "-q", "-c", URI, "snapshot-list", vm.name, "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed == ["theirs"]
    assert vm.tops()["vda"] == theirs and vm.tops(inactive=True)["vda"] == theirs
    assert sha256(vm.paths["vda"]) == original_sum
    assert vm.tagged_files() == []
    # The set holds their layer (the disk's top) as of the freeze.
    backup = os.path.join(outcome.set_path, "vda-vda.theirs.qcow2")
    frozen = reference_image(
        scratch,
        "frozen",
        DiskSpec("vda", "qcow2", 32 * MiB),
        [Write(0x11, 0, MiB), Write(0x12, MiB, MiB)],
    )
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", vm.paths["vda"], backup], check=True
    )
    assert same_content(frozen, "qcow2", backup, "qcow2")
    vm.stop()
    everything = [Write(0x11, 0, MiB), Write(0x12, MiB, MiB), Write(0x13, 2 * MiB, MiB)]
    live = reference_image(scratch, "live", DiskSpec("vda", "qcow2", 32 * MiB), everything)
    assert same_content(live, "qcow2", theirs, "qcow2")
    subprocess.run(
        ["virsh", "-q", "-c", URI, "snapshot-delete", vm.name, "theirs", "--metadata"],
        check=True,
        capture_output=True,
    )


@pytest.mark.libvirt
def test_sparse_raw_image_stays_sparse_at_the_destination(new_vm, scratch):
    vm = new_vm([DiskSpec("vdb", "raw", 256 * MiB)])
    vm.write("vdb", Write(0x21, 0, 2 * MiB), Write(0x22, 200 * MiB, 2 * MiB))

    outcome = back_up(vm, settings_for(scratch))

    backup = set_file(outcome.set_path, "vdb", vm)
    assert os.path.getsize(backup) == 256 * MiB
    allocated = os.stat(backup).st_blocks * 512
    assert allocated <= os.stat(vm.paths["vdb"]).st_blocks * 512 + MiB
    assert allocated < 8 * MiB  # holes stay holes: 4 MiB of data in a 256 MiB image
    frozen = reference_image(
        scratch,
        "frozen",
        DiskSpec("vdb", "raw", 256 * MiB),
        [Write(0x21, 0, 2 * MiB), Write(0x22, 200 * MiB, 2 * MiB)],
    )
    assert same_content(frozen, "raw", backup, "raw")


@pytest.mark.libvirt
def test_a_transient_domain_is_backed_up_with_its_live_definition(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], transient=True)
    vm.write("vda", Write(0x11, 0, MiB))

    outcome = back_up(vm, settings_for(scratch), Window(vm, {"vda": [Write(0x12, MiB, MiB)]}))

    assert not vm.domain.isPersistent()
    assert vm.is_running() and vm.tops() == vm.paths and vm.tagged_files() == []
    assert f"<name>{vm.name}</name>" in Path(outcome.set_path, "domain.xml").read_text()
    frozen = reference_image(
        scratch, "frozen", DiskSpec("vda", "qcow2", 16 * MiB), [Write(0x11, 0, MiB)]
    )
    assert same_content(frozen, "qcow2", set_file(outcome.set_path, "vda", vm), "qcow2")


class CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def set(self) -> None:
        self.count += 1
        super().set()


@pytest.mark.libvirt
@pytest.mark.parametrize("merge", ["commit", "pull"])
def test_libvirt_block_job_events_reach_the_merge(new_vm, scratch, merge):
    # The merge waits on these events (and polls as a fallback): a commit
    # goes on the moment QEMU reports it ready, not at the next poll.
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    hypervisor = Hypervisor(URI)
    events = hypervisor.job_changed = CountingEvent()
    try:
        window = Window(vm, {"vda": [Write(0x31, 0, MiB)]})
        back_up_domain(
            hypervisor.domain(vm.name), settings_for(scratch, merge), "20261127T010000", window
        )
    finally:
        hypervisor.close()

    # commit: ready, then completed after the pivot; pull: completed.
    assert events.count >= (2 if merge == "commit" else 1)
    if merge == "commit":
        assert vm.tops()["vda"] == vm.paths["vda"]
