"""Input at the edges, for real: what the action file and libvirt hand the helper.

A file that is not UTF-8 (under the real backupninja), an action file that
backupninja would refuse, a stale domain name beside a real VM, and a console
password that a restore needs.
"""

from __future__ import annotations

import os
import re
import stat
import uuid

import libvirt
import pytest

from backupninja_kvm import destination
from tests.support.cli import helper
from tests.support.ninja import Ninja
from tests.support.vms import PREFIX, DiskSpec, MiB, Write

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


@pytest.fixture
def ninja(scratch):
    return Ninja(scratch)


def backups_dir(scratch: str) -> str:
    path = os.path.join(scratch, "backups")
    os.makedirs(path, exist_ok=True)
    return path


def action_text(backups: str, domains: str) -> str:
    return (
        f"when = everyday at 01:00\n[source]\ndomains = {domains}\n[dest]\ndirectory = {backups}\n"
    )


def stale_name() -> str:
    """A name of our prefix that no VM has (a decommissioned VM)."""
    return f"{PREFIX}gone-{uuid.uuid4().hex[:6]}"


def test_a_latin1_comment_is_a_fatal_naming_the_file_not_a_traceback(ninja, scratch):
    action = os.path.join(ninja.configdir, "40-latin1.kvm")
    with open(action, "wb") as handle:
        handle.write(
            b"# sauvegarde \xe9t\xe9\n[source]\ndomains = "
            + stale_name().encode()
            + f"\n[dest]\ndirectory = {backups_dir(scratch)}\n".encode()
        )
    os.chmod(action, 0o600)

    result = ninja.run(action)

    fatals = result.lines("Fatal")
    assert any(f"{action}: not UTF-8 text (byte 0xe9 at line 1)" in line for line in fatals), (
        result.log
    )
    assert any("finished action" in line and "FAILED" in line for line in fatals)
    assert "Traceback" not in result.log and "UnicodeDecodeError" not in result.log
    assert "crashed" not in result.log


def test_a_stale_name_is_an_error_of_its_own_and_a_name_listed_twice_is_backed_up_once(
    ninja, new_vm, scratch
):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    vm.write("vda", Write(0x11, 0, MiB))
    backups = backups_dir(scratch)
    stale = stale_name()
    action = ninja.action("20-vms.kvm", action_text(backups, f"{stale}, {vm.name}, {vm.name}"))

    result = ninja.run(action)

    errors = result.lines("Error")
    assert any(
        f"{action} line 3: [source] domains: unknown domain '{stale}'" in line for line in errors
    ), result.log
    assert any("finished action" in line and "ERROR" in line for line in errors)
    assert result.lines("Fatal") == []
    assert any(
        f"{vm.name} is listed more than once; it is backed up once" in line
        for line in result.lines("Warning")
    ), result.log
    backed_up = [line for line in result.lines("Info") if f"{vm.name}: backed up vda" in line]
    assert len(backed_up) == 1, result.log
    assert len(destination.complete_sets(os.path.join(backups, vm.name))) == 1
    assert not os.path.exists(os.path.join(backups, stale))
    assert vm.tops() == vm.paths and vm.tagged_files() == []

    # The helper's own exit status says "some domains failed", for a dry run too.
    dry = helper("run", "--test", action)
    assert dry.returncode == 4, dry.stdout + dry.stderr
    assert f"unknown domain '{stale}'" in dry.stdout + dry.stderr


@pytest.mark.parametrize(
    ("mode", "owner", "folder_mode", "reason"),
    [
        pytest.param(0o666, 0, 0o700, "mode 0666 opens it to every user", id="chmod-666"),
        pytest.param(0o600, 65534, 0o700, "owned by uid 65534, not root", id="chown-nobody"),
        pytest.param(0o604, 0, 0o700, "mode 0604 opens it to every user", id="world-readable"),
        pytest.param(0o600, 0, 0o777, "mode 0777 opens it to every user", id="open-folder"),
    ],
)
@pytest.mark.parametrize("test_run", [True, False], ids=["test-run", "run"])
def test_run_refuses_an_action_file_that_backupninja_would_refuse(
    scratch, mode, owner, folder_mode, reason, test_run
):
    folder = os.path.join(scratch, "backup.d")
    os.makedirs(folder)
    action = os.path.join(folder, "20-vms.kvm")
    with open(action, "w") as handle:
        handle.write(action_text(backups_dir(scratch), stale_name()))
    os.chmod(action, mode)
    os.chown(action, owner, 0)
    os.chmod(folder, folder_mode)

    result = helper("run", *(["--test"] if test_run else []), action)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    fatals = [line for line in output.splitlines() if line.startswith("Fatal: ")]
    assert any(reason in line and "backupninja refuses" in line for line in fatals), output
    assert fatals[-1] == f"Fatal: {action}: invalid configuration, nothing was backed up"
    assert "Traceback" not in output


def test_a_root_file_of_mode_600_in_a_closed_folder_is_accepted(scratch):
    folder = os.path.join(scratch, "backup.d")
    os.makedirs(folder, mode=0o700)
    action = os.path.join(folder, "20-vms.kvm")
    with open(action, "w") as handle:
        handle.write(action_text(backups_dir(scratch), stale_name()))
    os.chmod(action, 0o600)

    result = helper("run", "--test", action)

    output = result.stdout + result.stderr
    assert "backupninja refuses" not in output
    assert result.returncode == 4, output  # only the stale name's Error


def test_the_saved_definition_keeps_the_console_password(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    definition = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    with_password, count = re.subn(
        r"<graphics type='vnc'", "<graphics type='vnc' passwd='s3cret'", definition
    )
    assert count == 1
    vm.domain.connect().defineXML(with_password)
    vm.start()
    backups = backups_dir(scratch)
    action = os.path.join(scratch, "vnc.kvm")
    with open(action, "w") as handle:
        handle.write(action_text(backups, vm.name))
    os.chmod(action, 0o600)

    result = helper("run", action)

    assert result.returncode == 0, result.stdout + result.stderr
    (set_name,) = destination.complete_sets(os.path.join(backups, vm.name))
    set_path = os.path.join(backups, vm.name, set_name)
    saved = os.path.join(set_path, "domain.xml")
    with open(saved) as handle:
        assert "passwd='s3cret'" in handle.read()
    assert stat.S_IMODE(os.stat(set_path).st_mode) == 0o700
    for name in os.listdir(set_path):
        if name != "B3SUMS":  # the manifest holds nothing secret
            assert stat.S_IMODE(os.stat(os.path.join(set_path, name)).st_mode) == 0o600, name
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_backupninjas_admingroup_may_read_the_action_file(scratch):
    # backupninja accepts a file open to its admingroup; so does the helper,
    # which the handler tells the admingroup.
    ninja = Ninja(scratch, "admingroup = users\n")
    os.chown(ninja.configdir, 0, 100)
    os.chmod(ninja.configdir, 0o750)
    stale = stale_name()
    action = ninja.action("20-vms.kvm", action_text(backups_dir(scratch), stale))
    os.chown(action, 0, 100)  # group users
    os.chmod(action, 0o640)

    result = ninja.run(action)

    assert "refuses" not in result.log, result.log
    assert result.lines("Fatal") == [], result.log
    assert any(f"unknown domain '{stale}'" in line for line in result.lines("Error")), result.log
