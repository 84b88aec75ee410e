"""End to end: the real backupninja runs a .kvm action through handlers/kvm.

As backupninja's own tests do: a scratch backupninja.conf, then
``backupninja -f CONF --now --run FILE``, then the log's lines are read.
"""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

from backupninja_kvm import destination, journal
from tests.support.cli import HELPER, helper
from tests.support.ninja import Ninja
from tests.support.vms import DiskSpec, MiB, Write

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


@pytest.fixture
def ninja(scratch):
    return Ninja(scratch)


def action_text(backups: str, domains: str, merge: str = "commit") -> str:
    return (
        "when = everyday at 01:00\n"
        "when = sunday at 03:00\n"
        "\n"
        "[general]\n"
        f"merge = {merge}\n"
        "\n"
        "[source]\n"
        f"domains = {domains}\n"
        "\n"
        "[dest]\n"
        f"directory = {backups}\n"
        "keep = 3\n"
    )


def backups_dir(scratch: str) -> str:
    path = os.path.join(scratch, "backups")
    os.makedirs(path, exist_ok=True)
    return path


def test_action_backs_up_running_vm_and_reports_success(ninja, new_vm, scratch):
    vm = new_vm(
        [
            DiskSpec("vda", "qcow2", 32 * MiB),
            DiskSpec("vdb", "raw", 16 * MiB),
            DiskSpec("hdc", device="cdrom"),
        ]
    )
    vm.write("vda", Write(0x11, 0, MiB))
    backups = backups_dir(scratch)
    action = ninja.action("20-vms.kvm", action_text(backups, vm.name))

    result = ninja.run(action)

    assert result.returncode == 0, result.output
    assert any("finished action" in line and "SUCCESS" in line for line in result.lines("Info"))
    assert result.lines("Error") == [] and result.lines("Fatal") == []
    assert any(f"{vm.name}: skipping disk hdc: cdrom" in line for line in result.lines("Info"))
    summary = [line for line in result.lines("Info") if f"{vm.name}: backed up vda, vdb" in line]
    assert len(summary) == 1
    assert "on the overlay" in summary[0] and "commit merge in" in summary[0]
    assert os.path.join(backups, vm.name) in summary[0]

    domain_dir = os.path.join(backups, vm.name)
    assert len(destination.complete_sets(domain_dir)) == 1
    assert vm.tops() == vm.paths and vm.is_running() and vm.tagged_files() == []


def test_broken_config_is_fatal_names_lines_and_keys_and_freezes_nothing(ninja, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    backups = backups_dir(scratch)
    text = action_text(backups, f"{vm.name}, no-such-vm").replace("merge = commit", "merge = comit")
    text = text.replace("keep = 3", "keep = 3\nkep = 4")
    action = ninja.action("20-broken.kvm", text)

    result = ninja.run(action)

    fatals = result.lines("Fatal")
    assert any(f"{action} line 5: [general] merge" in line for line in fatals), fatals
    # An unknown name is no problem of the file (tests/e2e/test_input_edges.py): not a Fatal.
    assert not any("no-such-vm" in line for line in fatals), fatals
    assert any(
        f"{action} line 13: [dest] kep: unknown key (did you mean keep?)" in line for line in fatals
    )
    assert any("finished action" in line and "FAILED" in line for line in fatals)
    assert "Traceback" not in result.log
    # Nothing was frozen, nothing written.
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert os.listdir(backups) == []


def test_test_mode_prints_the_plan_and_changes_nothing(ninja, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("hdc", device="cdrom")])
    backups = backups_dir(scratch)
    action = ninja.action("20-vms.kvm", action_text(backups, vm.name))

    result = ninja.run(action, "--test")

    plan = [line for line in result.lines("Info") if "test run, would" in line]
    assert len(plan) == 1
    assert f"{vm.name} (running): back up vda ({vm.paths['vda']}, qcow2)" in plan[0]
    assert "skip hdc (cdrom)" in plan[0]
    assert os.listdir(backups) == [] and vm.tagged_files() == []


def test_helper_crash_fails_the_action(ninja, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    action = ninja.action("20-vms.kvm", action_text(backups_dir(scratch), vm.name))
    crashing = os.path.join(scratch, "crashing-helper")
    with open(crashing, "w") as handle:
        handle.write("#!/bin/sh\necho 'Info: starting'\nkill -KILL $$\n")
    os.chmod(crashing, stat.S_IRWXU)

    result = ninja.run(action, helper=crashing)

    fatals = result.lines("Fatal")
    assert any("backupninja-kvm crashed (exit status 137)" in line for line in fatals), result.log
    assert any("finished action" in line and "FAILED" in line for line in fatals)


def test_the_handler_relays_a_last_line_without_newline_and_backslashes_as_written(ninja, scratch):
    action = ninja.action("20-vms.kvm", action_text(backups_dir(scratch), "web1"))
    fake = os.path.join(scratch, "fake-helper")
    with open(fake, "w") as handle:
        handle.write(
            "#!/bin/sh\n"
            "printf 'Warning: web1: disk vdb: block disk (/srv/a\\\\cb\\\\n)\\n'\n"
            "printf 'Fatal: web1: the last line, without a newline'\n"
            "exit 2\n"
        )
    os.chmod(fake, stat.S_IRWXU)

    result = ninja.run(action, helper=fake)

    assert any(
        "web1: disk vdb: block disk (/srv/a\\cb\\n)" in line for line in result.lines("Warning")
    ), result.log
    fatals = result.lines("Fatal")
    assert any("web1: the last line, without a newline" in line for line in fatals), result.log
    assert not any("without saying why" in line for line in fatals), result.log


def test_helper_killed_mid_copy_reports_each_overlay_and_the_recover_command(
    ninja, new_vm, scratch, monkeypatch
):
    # Two disks: the mid-copy fault point is reached once the first copy is done.
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)])
    action = ninja.action("20-vms.kvm", action_text(backups_dir(scratch), vm.name))
    monkeypatch.setenv("BACKUPNINJA_KVM_FAULT", "mid-copy")
    monkeypatch.setenv("BACKUPNINJA_KVM_FAULT_SIGNAL", "KILL")
    try:
        result = ninja.run(action)
        overlays = vm.tagged_files()
    finally:
        monkeypatch.delenv("BACKUPNINJA_KVM_FAULT")
        repaired = helper("recover", vm.name)

    assert len(overlays) == 2, result.log  # the helper really died on the overlays
    fatals = result.lines("Fatal")
    assert any("backupninja-kvm crashed (exit status 137)" in line for line in fatals), result.log
    # Other suites' domains may be listed too: look at this VM's lines only.
    mine = [line for line in fatals if f"left behind: {vm.name} " in line]
    for overlay in overlays:
        assert any(overlay in line for line in mine), (overlay, result.log)
    assert any("run 'backupninja-kvm recover'" in line for line in fatals), result.log
    assert not any("run --test" in line for line in fatals)
    assert any("finished action" in line and "FAILED" in line for line in fatals)
    assert "Traceback" not in result.log
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_helper_exit_4_without_an_error_line_is_fatal_and_checks_for_overlays(
    ninja, new_vm, scratch
):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    action = ninja.action("20-vms.kvm", action_text(backups_dir(scratch), vm.name))
    silent = os.path.join(scratch, "silent-helper")
    with open(silent, "w") as handle:  # `run` says nothing; `status` is the real one
        handle.write(
            f'#!/bin/sh\n[ "$1" = status ] && exec {HELPER} "$@"\necho \'Info: starting\'\nexit 4\n'
        )
    os.chmod(silent, stat.S_IRWXU)

    result = ninja.run(action, helper=silent)

    fatals = result.lines("Fatal")
    assert any(
        "backupninja-kvm exited with status 4 without saying why" in line for line in fatals
    ), result.log
    # status ran (it sees the whole host): nothing needs repair, or what does is
    # listed with the command.
    assert any(
        "no domain was left on an overlay" in line
        or "run 'backupninja-kvm recover' to repair what is listed above" in line
        for line in fatals
    ), result.log
    assert any("finished action" in line and "FAILED" in line for line in fatals)


def test_failed_domain_is_an_error_and_the_next_domain_still_runs(ninja, new_vm, scratch):
    broken = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    healthy = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    backups = backups_dir(scratch)
    # The first domain's folder is a file: its set cannot be created there.
    blocker = os.path.join(backups, broken.name)
    with open(blocker, "w") as handle:
        handle.write("not a folder")
    action = ninja.action("20-vms.kvm", action_text(backups, f"{broken.name}, {healthy.name}"))

    result = ninja.run(action)

    errors = result.lines("Error")
    assert any(f"{broken.name}: cannot write to {blocker}" in line for line in errors), result.log
    assert any("finished action" in line and "ERROR" in line for line in errors)
    assert result.lines("Fatal") == []
    assert any(f"{healthy.name}: backed up vda" in line for line in result.lines("Info"))
    assert broken.tops() == broken.paths and broken.tagged_files() == []


def test_reportprom_writes_per_domain_figures_beside_backupninjas(new_vm, scratch):
    from prometheus_client.parser import text_string_to_metric_families

    prom = os.path.join(scratch, "prom")
    os.makedirs(prom)
    ninja = Ninja(scratch, f"reportprom = yes\nprom_textfile_dir = {prom}\n")
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    vm.write("vda", Write(0x11, 0, MiB))
    action = ninja.action("20-vms.kvm", action_text(backups_dir(scratch), vm.name))

    result = ninja.run(action)

    assert result.returncode == 0, result.output
    path = os.path.join(prom, "backupninja_kvm.prom")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with open(path) as handle:
        families = {f.name: f for f in text_string_to_metric_families(handle.read())}
    values = {
        name: {s.labels["domain"]: s.value for s in family.samples}
        for name, family in families.items()
    }
    assert values["backupninja_kvm_status"] == {vm.name: 0}
    assert values["backupninja_kvm_bytes_copied"][vm.name] >= MiB
    assert values["backupninja_kvm_overlay_seconds"][vm.name] > 0
    assert (
        values["backupninja_kvm_overlay_seconds"][vm.name]
        <= values["backupninja_kvm_duration_seconds"][vm.name]
    )
    assert values["backupninja_kvm_last_success_timestamp_seconds"][vm.name] > 1.7e9
    assert values["backupninja_kvm_quiesced"] == {vm.name: 0}  # no guest agent here
    assert all(f.type == "gauge" for f in families.values())


def test_progress_is_shown_on_a_terminal(new_vm, scratch):
    import pexpect

    from tests.support.ninja import HELPER

    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB)])
    vm.write("vda", Write(0x11, 0, 32 * MiB))
    action = Ninja(scratch).action("20-vms.kvm", action_text(backups_dir(scratch), vm.name))

    child = pexpect.spawn(HELPER, ["run", action], encoding="utf-8", timeout=120)
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    screen = child.before.replace("\r\n", "\n")
    redrawn = [part for line in screen.split("\n") for part in line.split("\r")]
    copy = [p for p in redrawn if f"{vm.name}: vda: copy 100%" in p]
    assert copy, screen
    assert re.search(
        r"copy 100% 3\d\.\d MiB of 3\d\.\d MiB, [\d.]+ [KMG]?i?B/s, in 0:\d\d$", copy[-1]
    )
    # Nothing wrote to the overlay: the commit has nothing to copy, and says so.
    assert any(f"{vm.name}: vda: commit: nothing to copy" in p for p in redrawn), screen
    assert "1 B of 1 B" not in screen


def test_all_with_exclude_backs_up_every_domain_but_the_excluded(ninja, new_vm, scratch):
    kept = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    left_out = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    backups = backups_dir(scratch)
    text = action_text(backups, "all").replace(
        "[dest]", f"exclude = {left_out.name[:-3]}*, nothing-matches-?\n\n[dest]"
    )
    action = ninja.action("20-vms.kvm", text)

    result = ninja.run(action)

    assert result.returncode == 0, result.output
    # "all" may also find other domains of this host; ours are told apart by name.
    assert left_out.name not in os.listdir(backups)
    assert kept.name in os.listdir(backups)
    assert f"{left_out.name}:" not in result.log


def test_vms_of_one_action_are_frozen_one_after_another(ninja, new_vm, scratch):
    # Each VM spends only its own copy time on its overlay: the second is
    # frozen only once the first is merged back onto its images.
    first = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    second = new_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 8 * MiB)])
    backups = backups_dir(scratch)
    action = ninja.action("20-vms.kvm", action_text(backups, f"{first.name}, {second.name}"))

    result = ninja.run(action)

    assert result.returncode == 0, result.output
    info = result.lines("Info")

    def position(text: str) -> int:
        found = [n for n, line in enumerate(info) if text in line]
        assert len(found) == 1, (text, result.log)
        return found[0]

    assert (
        position(f"{first.name}: froze vda in")
        < position(f"{first.name}: merged vda by commit")
        < position(f"{second.name}: froze vda, vdb in")
        < position(f"{second.name}: merged vda, vdb by commit")
    )
    for vm in (first, second):
        assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_pull_reports_the_kept_original_once_and_leaves_nothing_behind(ninja, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    backups = backups_dir(scratch)
    action = ninja.action("20-vms.kvm", action_text(backups, vm.name, merge="pull"))

    record = journal.pulled_path(vm.domain.UUIDString())
    try:
        _two_pulled_nights(ninja, vm, action, backups)
    finally:
        if os.path.exists(record):
            os.unlink(record)


def _two_pulled_nights(ninja, vm, action: str, backups: str) -> None:
    first = ninja.run(action)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    while time.strftime("%Y%m%dT%H%M%S") == stamp:  # sets are stamped to the second
        time.sleep(0.1)
    second = ninja.run(action)

    for result in (first, second):
        assert result.lines("Error") == [] and result.lines("Fatal") == [], result.log
    kept = [line for line in first.lines("Warning") if vm.paths["vda"] in line]
    assert len(kept) == 1 and "no longer used; kept, delete it once checked" in kept[0]
    assert second.lines("Warning") == []  # nothing else is left to say
    assert any("finished action" in line and "SUCCESS" in line for line in second.lines("Info"))
    top = vm.tops()["vda"]
    assert sorted(os.listdir(vm.directory)) == sorted(["vda.qcow2", os.path.basename(top)])
    domain_dir = os.path.join(backups, vm.name)
    for name in destination.complete_sets(domain_dir):
        assert "vda-vda.qcow2" in os.listdir(os.path.join(domain_dir, name))
