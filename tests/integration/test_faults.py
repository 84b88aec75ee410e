"""Interrupted backups, against the real libvirtd and QEMU.

The helper runs as a separate process with a fault point armed
(BACKUPNINJA_KVM_FAULT): at that boundary of the cycle it sends itself
SIGKILL (a crash) or SIGTERM (an operator or a shutdown). Then the next run,
or ``backupninja-kvm recover``, must bring the VM back onto its own images
with every guest write, leave no file of ours, and say what it repaired.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import time

import pytest

from backupninja_kvm import config, destination, faults, journal, report
from backupninja_kvm.errors import OverlayLeftError
from tests.conftest import ROOT, write_action
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import DiskSpec, MiB, Write, reference_image, same_content

pytestmark = pytest.mark.libvirt

DISKS = [DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)]
BEFORE = {"vda": [Write(0x11, 0, MiB)], "vdb": [Write(0x21, 0, MiB)]}
BETWEEN = {"vda": [Write(0x12, 2 * MiB, MiB)], "vdb": [Write(0x22, 2 * MiB, MiB)]}
AFTER = {"vda": [Write(0x13, 4 * MiB, MiB)], "vdb": [Write(0x23, 4 * MiB, MiB)]}


def action_for(scratch: str, vm, **general: str) -> str:
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups, exist_ok=True)
    general = {"merge_timeout": "60", **general}
    text = "[general]\n" + "".join(f"{key} = {value}\n" for key, value in general.items())
    text += f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {backups}\n"
    return write_action(os.path.join(scratch, "vm.kvm"), text)


def write_all(vm, writes) -> None:
    for target, items in writes.items():
        vm.write(target, *items)


def assert_back_on_own_images_with_every_write(vm, scratch, *phases) -> None:
    assert vm.is_running()
    assert vm.tops() == vm.paths
    assert vm.tops(inactive=True) == vm.paths
    assert not vm.has_mirror()
    assert vm.tagged_files() == []
    assert journal.read(vm.domain.UUIDString()) is None
    vm.stop()
    for spec in DISKS:
        writes = [w for phase in phases for w in phase[spec.target]]
        expected = reference_image(scratch, f"expected-{spec.target}", spec, writes)
        assert same_content(expected, spec.format, vm.paths[spec.target], spec.format)


@pytest.mark.parametrize("repair", ["next-run", "recover"])
@pytest.mark.parametrize("point", faults.POINTS)
def test_sigkill_at_each_boundary_is_repaired(new_vm, scratch, point, repair):
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)
    action = action_for(scratch, vm)

    killed = helper("run", action, fault=point)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    # The guest goes on writing, on whatever layer it is on now.
    write_all(vm, BETWEEN)

    if repair == "next-run":
        repaired = helper("run", action)
        assert repaired.returncode == 0, repaired.stdout
        domain_dir = os.path.join(scratch, "backups", vm.name)
        assert len(destination.complete_sets(domain_dir)) == 1
        assert not [n for n in os.listdir(domain_dir) if n.endswith(".partial")]
    else:
        repaired = helper("recover", vm.name)
        assert repaired.returncode == 0, repaired.stdout
    warnings = [line for line in repaired.stdout.splitlines() if line.startswith("Warning:")]
    assert any(f"{vm.name}: repaired" in line for line in warnings), repaired.stdout
    if point not in ("after-journal",):
        assert any(".bnkvm-" in line for line in warnings), warnings  # names the overlay

    write_all(vm, AFTER)
    assert_back_on_own_images_with_every_write(vm, scratch, BEFORE, BETWEEN, AFTER)


@pytest.mark.parametrize("point", faults.POINTS)
def test_sigterm_merges_before_exit(new_vm, scratch, point):
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)

    stopped = helper("run", action_for(scratch, vm), fault=point, signal="TERM")

    lines = stopped.stdout.splitlines()
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal: interrupted by SIGTERM")]
    assert len(fatal) == 1, lines
    assert "it runs on its own images again" in lines[fatal[0]]
    if point != "after-journal":
        merged = [i for i, line in enumerate(lines) if f"{vm.name}: merged vda, vdb" in line]
        assert merged and merged[0] < fatal[0], lines
    domain_dir = os.path.join(scratch, "backups", vm.name)
    assert destination.complete_sets(domain_dir) == []
    assert not os.path.exists(domain_dir) or os.listdir(domain_dir) == []
    write_all(vm, AFTER)
    assert_back_on_own_images_with_every_write(vm, scratch, BEFORE, AFTER)


def test_merge_not_ready_in_time_is_retried_then_fatal_and_recover_repairs(new_vm, scratch):
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)
    # At 1 MiB/s, the commit of 12 MiB written on the overlay cannot be ready
    # within 1 s, twice: the VM is left on its overlay, which is Fatal.
    settings = config.load(action_for(scratch, vm, bandwidth="1", merge_timeout="1"))
    during = {"vda": [Write(0x31, 8 * MiB, 12 * MiB)], "vdb": [Write(0x32, 8 * MiB, 4 * MiB)]}
    overlays = {}

    def window(_domain, paths):
        overlays.update(paths)
        write_all(vm, during)

    with pytest.raises(OverlayLeftError) as raised:
        back_up(vm, settings, window)
    message = str(raised.value)
    assert "still running on the overlay" in message and "commit not ready within 1 s" in message
    assert f"backupninja-kvm recover {vm.name}" in message
    assert vm.tops()["vda"] == overlays["vda"]  # left on the overlay, nothing deleted
    assert os.path.exists(overlays["vda"])
    assert journal.read(vm.domain.UUIDString()) is not None

    status = helper("status", vm.name)
    assert status.returncode == 4 and f"{vm.name} (running): vda on overlay" in status.stdout

    repaired = helper("recover", vm.name)
    assert repaired.returncode == 0, repaired.stdout
    assert f"Warning: {vm.name}: repaired: vda: " in repaired.stdout
    assert helper("status", vm.name).returncode == 0
    write_all(vm, AFTER)
    assert_back_on_own_images_with_every_write(vm, scratch, BEFORE, during, AFTER)


def test_domain_shut_down_during_the_window_is_merged_offline(new_vm, scratch):
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)
    settings = config.load(action_for(scratch, vm))

    def window(_domain, _overlays):
        write_all(vm, BETWEEN)
        vm.stop()

    outcome = back_up(vm, settings, window)
    # The frozen images were consistent, so the set is a good backup.
    for spec in DISKS:
        expected = reference_image(scratch, f"frozen-{spec.target}", spec, BEFORE[spec.target])
        backup = os.path.join(
            outcome.set_path, f"{spec.target}-{os.path.basename(vm.paths[spec.target])}"
        )
        assert same_content(expected, spec.format, backup, spec.format)
    assert not vm.domain.isActive()
    assert vm.tops(inactive=True) == vm.paths
    assert vm.tagged_files() == []
    for spec in DISKS:
        writes = BEFORE[spec.target] + BETWEEN[spec.target]
        expected = reference_image(scratch, f"live-{spec.target}", spec, writes)
        assert same_content(expected, spec.format, vm.paths[spec.target], spec.format)
    vm.start()  # and it boots on its own images
    assert vm.tops() == vm.paths


def test_libvirtd_restart_during_the_window_is_survived(new_vm, scratch):
    vm = new_vm(DISKS)
    write_all(vm, BEFORE)
    settings = config.load(action_for(scratch, vm))

    def window(_domain, _overlays):
        write_all(vm, BETWEEN)
        subprocess.run(["pkill", "-x", "libvirtd"], check=True)
        for _ in range(100):
            if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode:
                break
            time.sleep(0.1)
        subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "setup-host")], check=True, capture_output=True
        )

    stream = io.StringIO()
    handler = report.setup(stream)
    try:
        outcome = back_up(vm, settings, window)
    finally:
        report.setup()
    assert "lost the connection to libvirt" in stream.getvalue()
    assert handler.count(logging.ERROR) == 0
    assert destination.complete_sets(os.path.dirname(outcome.set_path))
    write_all(vm, AFTER)
    assert_back_on_own_images_with_every_write(vm, scratch, BEFORE, BETWEEN, AFTER)
