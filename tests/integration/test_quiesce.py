"""Quiesce: the guest agent freezes the guest's filesystems for the snapshot.

A real guest (Debian's kernel, busybox, Debian's qemu-ga) keeps writing to
an ext4 filesystem on its disk. With quiesce, the frozen image holds a clean
filesystem (ext4 clears its needs_recovery flag when frozen); without, the
image is only crash-consistent (needs_recovery set, as after a power cut).
Either way the guest goes on writing after the snapshot. The no-OS VMs of
the other tests cover the agent-less cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid

import libvirt
import libvirt_qemu
import pytest

from backupninja_kvm import config, destination, journal
from tests.conftest import write_action
from tests.support import guest
from tests.support.cli import helper
from tests.support.cycle import back_up
from tests.support.vms import IMAGE_ROOT, PREFIX, DiskSpec, MiB, TestVM, connect

pytestmark = pytest.mark.libvirt


def agent(vm: TestVM, command: str) -> dict:
    reply = libvirt_qemu.qemuAgentCommand(vm.domain, json.dumps({"execute": command}), 10, 0)
    return json.loads(reply)["return"]


def freeze_status(vm: TestVM) -> str:
    return agent(vm, "guest-fsfreeze-status")


def last_tick(console: str) -> int:
    with open(console, errors="replace") as handle:
        ticks = re.findall(r"guest: tick (\d+)", handle.read())
    return int(ticks[-1]) if ticks else 0


def wait_for_agent(vm: TestVM, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            agent(vm, "guest-ping")
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def running_agent_guest(cmdline: str = ""):
    assert guest.kernel(), "no kernel in /boot: scripts/setup-host installs linux-image-amd64"
    assert os.path.exists(guest.AGENT), "scripts/setup-host installs qemu-guest-agent"
    name = PREFIX + uuid.uuid4().hex[:8]
    directory = os.path.join(IMAGE_ROOT, name)
    os.makedirs(directory, mode=0o755)
    os.chmod(IMAGE_ROOT, 0o755)
    vm = TestVM(name, directory, [DiskSpec("vda", "raw", 64 * MiB)])
    try:
        shutil.copy(guest.kernel(), os.path.join(directory, "vmlinuz"))
        guest.build_agent_initramfs(os.path.join(directory, "initramfs.gz"))
        vm.paths["vda"] = os.path.join(directory, "vda.raw")
        guest.make_ext4(vm.paths["vda"], 64 * MiB)
        console = os.path.join(directory, "console.log")
        open(console, "w").close()
        os.chmod(console, 0o666)
        disks = {"vda": (vm.paths["vda"], "raw")}
        connect().defineXML(
            guest.guest_xml(name, directory, disks, console, agent_channel=True, cmdline=cmdline)
        )
        vm.start()
        guest.wait_for_line(console, "guest: tick 3")
        wait_for_agent(vm)
        yield vm, console
    finally:
        vm.remove()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def agent_guest(connection, scratch):
    with running_agent_guest() as running:
        yield running


@pytest.fixture
def slow_freeze_guest(connection, scratch):
    """Its agent's fsfreeze hook takes 8 s: a freeze that finishes late."""
    with running_agent_guest("slowfreeze") as running:
        yield running


def settings_for(scratch: str, vm: TestVM, quiesce: str, timeout: int = 60) -> config.Settings:
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups, exist_ok=True)
    text = (
        f"[general]\nquiesce = {quiesce}\nquiesce_timeout = {timeout}\n"
        f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {backups}\n"
    )
    return config.load(write_action(os.path.join(scratch, "q.kvm"), text))


def test_quiesce_gives_a_clean_filesystem_and_the_guest_goes_on(agent_guest, scratch):
    vm, console = agent_guest

    quiesced = back_up(vm, settings_for(scratch, vm, "auto"), stamp="20261127T010000")
    ticks = last_tick(console)
    guest.wait_for_line(console, f"guest: tick {ticks + 3}")  # thawed: writes go on
    crash_consistent = back_up(vm, settings_for(scratch, vm, "no"), stamp="20261127T020000")

    assert quiesced.quiesced == 1, "the agent froze the guest's one filesystem"
    assert "quiesced" in quiesced.summary()
    image = os.path.join(quiesced.set_path, "vda-vda.raw")
    assert not guest.ext4_needs_recovery(image)
    check = subprocess.run(["e2fsck", "-f", "-n", image], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The control: the same guest without quiesce gives a filesystem left mounted.
    assert crash_consistent.quiesced is None
    assert "crash-consistent" in crash_consistent.summary()
    assert guest.ext4_needs_recovery(os.path.join(crash_consistent.set_path, "vda-vda.raw"))

    assert freeze_status(vm) == "thawed"
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_a_run_killed_while_the_guest_is_frozen_is_thawed_by_the_next_run(agent_guest, scratch):
    vm, console = agent_guest
    action = settings_for(scratch, vm, "yes").path

    killed = helper("run", action, fault="after-fsfreeze")

    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert freeze_status(vm) == "frozen"  # the guest's writes are blocked
    assert journal.read(vm.domain.UUIDString()) is not None
    status = helper("status", vm.name)
    assert status.returncode == 4, status.stdout + status.stderr
    assert any(
        line.startswith(f"{vm.name} (running): journal ")
        and "the guest's filesystems may still be frozen" in line
        and f"backupninja-kvm recover {vm.name}" in line
        for line in status.stdout.splitlines()
    ), status.stdout

    prom = os.path.join(scratch, "prom")
    os.makedirs(prom)
    again = helper("run", "--prometheus-dir", prom, action)

    assert again.returncode == 0, again.stdout + again.stderr
    with open(os.path.join(prom, "backupninja_kvm.prom")) as handle:
        assert f'backupninja_kvm_quiesced{{domain="{vm.name}"}} 1\n' in handle.read()
    warnings = [line for line in again.stdout.splitlines() if line.startswith("Warning:")]
    assert any("thawed 1 guest filesystem(s) left frozen" in w for w in warnings), again.stdout
    assert any(
        f"{vm.name}: backed up vda" in line and "quiesced" in line
        for line in again.stdout.splitlines()
    ), again.stdout
    assert freeze_status(vm) == "thawed"
    ticks = last_tick(console)
    guest.wait_for_line(console, f"guest: tick {ticks + 3}")
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert journal.read(vm.domain.UUIDString()) is None


def output_lines(result, prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


def test_auto_without_a_guest_agent_channel_is_crash_consistent(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])

    result = helper("run", settings_for(scratch, vm, "auto").path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert any(
        f"{vm.name}: no guest agent channel: the snapshot will be crash-consistent" in line
        for line in output_lines(result, "Info:")
    ), result.stdout
    assert output_lines(result, "Warning:") == []
    assert any(
        "crash-consistent" in line and "backed up vda" in line
        for line in result.stdout.splitlines()
    )


def test_auto_with_an_agent_that_does_not_answer_warns_and_backs_up(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], agent_channel=True)

    result = helper("run", settings_for(scratch, vm, "auto").path)

    assert result.returncode == 0, result.stdout + result.stderr
    warnings = output_lines(result, "Warning:")
    assert any(
        f"{vm.name}: could not freeze the guest's filesystems" in w
        and "not connected" in w
        and "crash-consistent" in w
        for w in warnings
    ), result.stdout
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    sets = os.listdir(os.path.join(scratch, "backups", vm.name))
    assert "latest" in sets


@pytest.mark.parametrize("agent_channel", [False, True], ids=["no-channel", "no-answer"])
def test_quiesce_yes_that_cannot_freeze_is_an_error_and_nothing_is_done(
    new_vm, scratch, agent_channel
):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], agent_channel=agent_channel)
    settings = settings_for(scratch, vm, "yes")

    result = helper("run", settings.path)

    assert result.returncode == 4, result.stdout + result.stderr  # a domain failed
    errors = output_lines(result, "Error:")
    expected = (
        "could not freeze the guest's filesystems"
        if agent_channel
        else f"{settings.path} line 2: [general] quiesce is yes, but the domain has no guest "
        "agent channel (org.qemu.guest_agent.0)"
    )
    assert any(f"{vm.name}: {expected}" in e and "domain skipped" in e for e in errors), (
        result.stdout
    )
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert journal.read(vm.domain.UUIDString()) is None
    domain_dir = os.path.join(scratch, "backups", vm.name)
    assert destination.complete_sets(domain_dir) == []
    assert not os.path.isdir(domain_dir) or os.listdir(domain_dir) == []


def test_a_test_run_says_that_quiesce_yes_would_skip_a_domain(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])

    result = helper("run", "--test", settings_for(scratch, vm, "yes").path)

    # An Error, as the real run says it, and its exit status.
    assert result.returncode == 4, result.stdout + result.stderr
    assert any(
        f"test run: {vm.name}: " in w and "quiesce is yes, but the domain has no guest agent" in w
        for w in output_lines(result, "Error:")
    ), result.stdout
    assert not os.path.exists(os.path.join(scratch, "backups", vm.name))


@pytest.mark.parametrize("quiesce", ["auto", "yes"])
def test_a_freeze_not_done_in_time_is_given_up_and_the_guest_thawed(
    slow_freeze_guest, scratch, quiesce
):
    # The agent takes 8 s to freeze, the helper waits 2: it gives up, and as
    # the freeze then completes in the guest, it asks for a thaw until the
    # agent answers; only then is the snapshot taken (crash-consistent).
    vm, console = slow_freeze_guest

    result = helper("run", settings_for(scratch, vm, quiesce, timeout=2).path)

    output = result.stdout + result.stderr
    reason = "could not freeze the guest's filesystems (Guest agent is not responding"
    late = f"{vm.name}: the guest agent finished the freeze late; thawed 1 filesystem(s)"
    assert any(late in w for w in output_lines(result, "Warning:")), output
    if quiesce == "auto":
        assert result.returncode == 0, output
        assert any(reason in w for w in output_lines(result, "Warning:")), output
        assert any(
            "backed up vda" in line and "crash-consistent" in line
            for line in output_lines(result, "Info:")
        ), output
    else:
        assert result.returncode == 4, output
        assert any(
            f"{vm.name}: {reason}" in e and "quiesce_timeout 2 s); quiesce = yes: nothing done" in e
            for e in output_lines(result, "Error:")
        ), output
    assert freeze_status(vm) == "thawed"
    ticks = last_tick(console)
    guest.wait_for_line(console, f"guest: tick {ticks + 3}")
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert journal.read(vm.domain.UUIDString()) is None
