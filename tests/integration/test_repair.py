"""The repair of what an interrupted backup left, against the real libvirtd.

A run killed on the overlay (SIGKILL at the after-freeze fault point) leaves
a journal, the VM on its overlays and a ``.partial`` set. The repair (the
next run's, or ``backupninja-kvm recover``) must be safe from signals, say
the true state, never crash on a bad bandwidth, clean the ``.partial``, and
handle a transient domain that was destroyed meanwhile.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import time

import libvirt
import pytest

from backupninja_kvm import config, journal, report
from backupninja_kvm.errors import OverlayLeftError
from tests.integration.test_faults import action_for, write_all
from tests.support import vms
from tests.support.cli import HELPER, helper
from tests.support.cycle import back_up
from tests.support.vms import DiskSpec, MiB, Write, reference_image, same_content

pytestmark = pytest.mark.libvirt

DISKS = [DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)]
BEFORE = {"vda": [Write(0x41, 0, MiB)], "vdb": [Write(0x51, 0, MiB)]}
BETWEEN = {"vda": [Write(0x42, 2 * MiB, MiB)], "vdb": [Write(0x52, 2 * MiB, MiB)]}
AFTER = {"vda": [Write(0x43, 4 * MiB, MiB)], "vdb": [Write(0x53, 4 * MiB, MiB)]}


@pytest.fixture(autouse=True)
def no_journal_left_behind():
    """Journals of vanished test domains would outlive a failed test."""
    before = set(journal.all_journals())
    yield
    for uuid in set(journal.all_journals()) - before:
        journal.remove(uuid)


def kill_on_the_overlay(vm, action: str) -> None:
    """A run killed right after the freeze: the VM stays on its overlays."""
    killed = helper("run", action, fault="after-freeze")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert all(".bnkvm-" in top for top in vm.tops().values())


def partials(scratch: str, vm) -> list[str]:
    domain_dir = os.path.join(scratch, "backups", vm.name)
    if not os.path.isdir(domain_dir):
        return []
    return [n for n in os.listdir(domain_dir) if n.endswith(".partial")]


def has_every_write(vm, scratch: str, *phases) -> bool:
    for spec in DISKS:
        writes = [w for phase in phases for w in phase[spec.target]]
        expected = reference_image(scratch, f"expected-{spec.target}", spec, writes)
        if not same_content(expected, spec.format, vm.paths[spec.target], spec.format):
            return False
    return True


def assert_on_own_images_with_every_write(vm, scratch, *phases) -> None:
    assert vm.tops() == vm.paths
    assert not vm.has_mirror()
    assert all(not vm.domain.blockJobInfo(t, 0) for t in vm.paths)
    assert vm.tagged_files() == []
    assert journal.read(vm.domain.UUIDString()) is None
    write_all(vm, AFTER)
    vm.stop()
    assert has_every_write(vm, scratch, *phases, AFTER)


def test_recover_removes_the_partial_set_of_a_killed_run(new_vm, scratch):
    vm = new_vm(DISKS)
    action = action_for(scratch, vm)
    kill_on_the_overlay(vm, action)
    assert len(partials(scratch, vm)) == 1
    assert journal.read(vm.domain.UUIDString()).partial.endswith(".partial")

    repaired = helper("recover", vm.name)

    assert repaired.returncode == 0, repaired.stdout
    assert "removed the incomplete set" in repaired.stdout
    assert partials(scratch, vm) == []
    assert_on_own_images_with_every_write(vm, scratch)


def test_a_signal_during_the_repair_waits_for_it_and_the_fatal_says_the_truth(new_vm, scratch):
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)
    kill_on_the_overlay(vm, action_for(scratch, vm))
    # Written on the overlay: at bandwidth = 1 (MiB/s) the repair's commit
    # of these 6 MiB takes several seconds.
    during = {"vda": [Write(0x44, 8 * MiB, 6 * MiB)], "vdb": [Write(0x54, 8 * MiB, MiB)]}
    write_all(vm, during)
    slow = action_for(scratch, vm, bandwidth="1")

    run = subprocess.Popen(
        [HELPER, "run", slow], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        while run.poll() is None and not vm.domain.blockJobInfo("vda", 0):
            time.sleep(0.02)  # until the repair's commit job runs
        assert run.poll() is None, "the run ended before its repair started a commit"
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    lines = stdout.splitlines()
    assert run.returncode == 2, stdout + stderr
    assert "Traceback" not in stderr, stderr
    fatal = [line for line in lines if line.startswith("Fatal: interrupted by SIGINT")]
    assert len(fatal) == 1, lines
    # The repair finished first, and the Fatal says so; no block job is left.
    assert any(f"Warning: {vm.name}: repaired" in line for line in lines), lines
    assert "it runs on its own images again" in fatal[0], fatal
    assert partials(scratch, vm) == []
    assert_on_own_images_with_every_write(vm, scratch, BEFORE, during)


@pytest.mark.parametrize("bandwidth", [18446744073709551616, 2**43])
def test_an_absurd_bandwidth_never_crashes_the_repair_or_the_merge(new_vm, scratch, bandwidth):
    """libvirt-python raises OverflowError for a bandwidth beyond a C long,
    libvirt refuses one from 2**43 MiB/s (a byte count beyond 2**63): the repair and the merge
    fall back to an unlimited commit and say so."""
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)
    action = action_for(scratch, vm)
    kill_on_the_overlay(vm, action)
    write_all(vm, BETWEEN)
    # Whatever the configspec accepts, the code must be safe with any value.
    settings = dataclasses.replace(config.load(action), bandwidth=bandwidth)
    stream = io.StringIO()
    report.setup(stream)
    try:
        outcome = back_up(vm, settings)
    finally:
        report.setup()
    log = stream.getvalue()
    assert f"{vm.name}: repaired what an interrupted backup left" in log, log
    assert "committing without a bandwidth limit instead" in log, log
    assert outcome.set_path and os.path.isdir(outcome.set_path)
    assert_on_own_images_with_every_write(vm, scratch, BEFORE, BETWEEN)


@pytest.mark.parametrize("named_by", ["name", "uuid"])
def test_a_transient_domain_destroyed_on_its_overlay_is_merged_offline(new_vm, scratch, named_by):
    vm = new_vm(DISKS, transient=True)
    uuid = vm.domain.UUIDString()
    write_all(vm, BEFORE)
    kill_on_the_overlay(vm, action_for(scratch, vm))
    overlays = sorted(vm.tops().values())
    write_all(vm, BETWEEN)  # these writes live only in the overlays
    vm.domain.destroy()  # as `virsh destroy`: the transient domain is gone
    with pytest.raises(libvirt.libvirtError):
        vm.domain  # noqa: B018

    repaired = helper("recover", vm.name if named_by == "name" else uuid)

    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"Warning: {vm.name} (no longer exists): repaired: " in repaired.stdout
    for overlay in overlays:
        assert f"committed {overlay} into" in repaired.stdout
        assert not os.path.exists(overlay)
    assert vm.tagged_files() == []
    assert journal.read(uuid) is None
    assert partials(scratch, vm) == []
    assert has_every_write(vm, scratch, BEFORE, BETWEEN)
    again = helper("recover", uuid)
    assert again.returncode == 2 and "unknown domain(s)" in again.stdout  # nothing is left


def test_the_merge_fatal_for_a_vanished_domain_gives_the_command_that_works(new_vm, scratch):
    vm = new_vm(DISKS, transient=True)
    write_all(vm, BEFORE)
    settings = config.load(action_for(scratch, vm))

    def window(_domain, _overlays):
        write_all(vm, BETWEEN)
        vm.domain.destroy()

    with pytest.raises(OverlayLeftError) as raised:
        back_up(vm, settings, window)
    message = str(raised.value)
    assert "no longer exists" in message, message
    command = f"backupninja-kvm recover {vm.name}"
    assert command in message, message

    repaired = helper(*command.split()[1:])
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert vm.tagged_files() == []
    assert has_every_write(vm, scratch, BEFORE, BETWEEN)


def test_a_vanished_domains_overlay_is_not_committed_while_its_image_is_in_use(new_vm, scratch):
    """The domain was created again (new UUID) on the same images: committing
    the old overlay into an image a VM runs on would corrupt it."""
    vm = new_vm(DISKS, transient=True)
    uuid = vm.domain.UUIDString()
    write_all(vm, BEFORE)
    kill_on_the_overlay(vm, action_for(scratch, vm))
    overlays = sorted(vm.tops().values())
    vm.domain.destroy()
    again = vms.connect().createXML(
        vms.domain_xml(vm.name + "-again", [(s, vm.paths[s.target]) for s in DISKS]), 0
    )
    try:
        refused = helper("recover", uuid)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "is in use by a running domain" in refused.stdout, refused.stdout
        assert "recovery touched nothing" in refused.stdout
        assert all(os.path.exists(overlay) for overlay in overlays)
        assert journal.read(uuid) is not None
    finally:
        again.destroy()

    repaired = helper("recover", vm.name)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert not any(os.path.exists(overlay) for overlay in overlays)
    assert journal.read(uuid) is None


@pytest.mark.parametrize("ended", ["killed on the overlay", "saw the domain vanish"])
def test_an_overlay_never_merged_is_kept_when_the_domain_came_back_on_its_image(
    new_vm, scratch, ended
):
    """A transient domain destroyed on its overlay and created again from a
    definition naming its own image (same UUID): the guest's writes since the
    freeze exist only in the overlay, which must not be deleted silently,
    whether the backup was killed (journal phase frozen) or saw the domain go
    and gave up its merge (phase merging)."""
    vm = new_vm(DISKS[:1], transient=True)
    uuid = vm.domain.UUIDString()
    if ended == "killed on the overlay":
        kill_on_the_overlay(vm, action_for(scratch, vm))
        (overlay,) = vm.tops().values()
        vm.write("vda", Write(0x45, 0, MiB))  # only in the overlay
        vm.domain.destroy()
    else:
        frozen_on: list[str] = []

        def window(_domain, overlays):
            frozen_on.extend(overlays.values())
            vm.write("vda", Write(0x45, 0, MiB))  # only in the overlay
            vm.domain.destroy()

        with pytest.raises(OverlayLeftError):
            back_up(vm, config.load(action_for(scratch, vm)), window)
        (overlay,) = frozen_on
        assert journal.read(uuid).phase == journal.MERGING
    definition = vms.domain_xml(vm.name, [(DISKS[0], vm.paths["vda"])])
    vms.connect().createXML(definition.replace("<name>", f"<uuid>{uuid}</uuid><name>"), 0)
    assert vm.tops() == vm.paths

    kept = helper("recover", vm.name)

    assert kept.returncode == 2, kept.stdout + kept.stderr
    assert f"{overlay} was never merged and holds writes made after the freeze" in kept.stdout
    assert os.path.exists(overlay)
    assert journal.read(uuid) is not None
    os.unlink(overlay)  # as the message says, once the writes are saved or not needed
    cleaned = helper("recover", vm.name)
    assert cleaned.returncode == 0, cleaned.stdout
    assert journal.read(uuid) is None
