"""Never touch what is not ours, and say the truth about it, against the real
libvirtd and QEMU.

Only a journal makes a layer ours: a disk named like our overlay without one
(what a finished ``merge = pull`` leaves, on top of its template) is the VM's
own disk. ``merge = pull`` keeps the set's names and deletes only the images
its own pulls made. The merge checks what the freeze changed, not more.
``status`` reads journals and locks only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import libvirt
import pytest

from backupninja_kvm import config, destination, journal
from backupninja_kvm.errors import OverlayLeftError
from tests.conftest import write_action
from tests.support.cli import HELPER, helper
from tests.support.cycle import back_up
from tests.support.vms import (
    DiskSpec,
    MiB,
    Write,
    connect,
    reference_image,
    same_content,
    sha256,
    write_offline,
)

pytestmark = pytest.mark.libvirt


@pytest.fixture(autouse=True)
def forget_removed_domains(connection):
    """After the test (and its VMs), remove the journals and the records of
    pulled images that name a domain no longer defined, even when it failed."""
    yield
    # A fresh connection: a test of another file may have restarted libvirtd.
    known = {domain.UUIDString() for domain in connect().listAllDomains(0)}
    for directory in (journal.journal_dir(), os.path.dirname(journal.pulled_path("x"))):
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.endswith(".json") and name[: -len(".json")] not in known:
                os.unlink(os.path.join(directory, name))


def action_for(scratch: str, vms, **general: str) -> str:
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups, exist_ok=True)
    general = {"merge_timeout": "60", **general}
    text = "[general]\n" + "".join(f"{key} = {value}\n" for key, value in general.items())
    text += f"[source]\ndomains = {', '.join(vm.name for vm in vms)}\n"
    text += f"[dest]\ndirectory = {backups}\n"
    # The action file's folder must be closed to others, as backupninja
    # requires; the scratch folder is opened for QEMU in some tests.
    actions = os.path.join(scratch, "actions")
    os.makedirs(actions, mode=0o700, exist_ok=True)
    return write_action(os.path.join(actions, "vms.kvm"), text)


def fresh_second(stamps: list[str]) -> None:
    """Wait until a second later than the last one in *stamps*."""
    while stamps and time.strftime("%Y%m%dT%H%M%S") <= stamps[-1]:
        time.sleep(0.1)


def ended(stamps: list[str]) -> None:
    """A run ended now: the next one must start in a later second."""
    stamps.append(time.strftime("%Y%m%dT%H%M%S"))


def run_night(action: str, last_stamp: list[str]):
    """One nightly run of the helper, in a second of its own (set names are
    stamped to the second)."""
    fresh_second(last_stamp)
    result = helper("run", action)
    ended(last_stamp)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def backing_file(path: str) -> str | None:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True
    )
    return json.loads(info.stdout).get("full-backing-filename")


def latest_set(scratch: str, vm) -> str:
    domain_dir = os.path.join(scratch, "backups", vm.name)
    return os.path.join(domain_dir, destination.complete_sets(domain_dir)[-1])


def make_template(scratch: str) -> str:
    directory = os.path.join(scratch, "template")
    os.makedirs(directory)
    os.chmod(scratch, 0o755)
    template = os.path.join(directory, "template.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, str(64 * MiB)], check=True)
    write_offline(template, "qcow2", [Write(0x77, 0, 8 * MiB)])
    os.chmod(template, 0o644)
    return template


def test_two_vms_on_one_template_pulled_for_nights_keep_their_own_layers(new_vm, scratch):
    template = make_template(scratch)
    template_sum = sha256(template)
    first = new_vm([DiskSpec("vda", "qcow2", 64 * MiB, backing=template)])
    second = new_vm([DiskSpec("vda", "qcow2", 64 * MiB, backing=template)])
    action = action_for(scratch, [first, second], merge="pull")
    written: dict[str, list[Write]] = {first.name: [], second.name: []}
    stamps: list[str] = []

    for night in range(3):
        for number, vm in enumerate([first, second]):
            write = Write(0x30 + 0x10 * number + night, (9 + night) * MiB, MiB)
            vm.write("vda", write)
            written[vm.name].append(write)
        result = run_night(action, stamps)
        assert "repaired" not in result.stdout, result.stdout
        assert sha256(template) == template_sum, f"night {night + 1}: the template changed"
        for vm in (first, second):
            # Each VM on its own layer, which stays on the template.
            top = vm.tops()["vda"]
            assert os.path.dirname(top) == vm.directory
            assert backing_file(top) == template
            assert vm.tops(inactive=True)["vda"] == top
            # The VM's folder: its original image (kept, reported) and the
            # current layer, nothing piling up.
            assert sorted(os.listdir(vm.directory)) == sorted(["vda.qcow2", os.path.basename(top)])
            assert sorted(os.listdir(latest_set(scratch, vm))) == [
                "B3SUMS",
                "domain.xml",
                "set.json",
                "vda-vda.qcow2",
            ]

        # The disk a finished pull leaves is the VM's own: no journal, nothing
        # to report, nothing to repair.
        status = helper("status", first.name, second.name)
        assert status.returncode == 0, status.stdout
        assert "on overlay" not in status.stdout
        recovered = helper("recover", first.name, second.name)
        assert recovered.returncode == 0, recovered.stdout
        assert "repaired" not in recovered.stdout, recovered.stdout
        assert sha256(template) == template_sum

    for vm in (first, second):
        top = vm.tops()["vda"]
        vm.write("vda", Write(0x66, 0, MiB))
        written[vm.name].append(Write(0x66, 0, MiB))
        vm.stop()
        everything = [Write(0x77, 0, 8 * MiB), *written[vm.name]]
        expected = reference_image(scratch, f"expected-{vm.name}", DiskSpec("vda"), everything)
        assert same_content(expected, "qcow2", top, "qcow2"), vm.name
    assert sha256(template) == template_sum
    first.start()  # both start, each on its own layer (no write lock on the template)
    second.start()
    assert first.is_running() and second.is_running()
    assert first.tops()["vda"] != second.tops()["vda"]


def test_pull_over_three_nights_keeps_set_names_and_leaves_no_image_behind(new_vm, scratch):
    specs = [DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)]
    vm = new_vm(specs)
    action = action_for(scratch, [vm], merge="pull")
    stamps: list[str] = []
    written: dict[str, list[Write]] = {"vda": [], "vdb": []}
    names = []
    originals = {target: os.path.basename(path) for target, path in vm.paths.items()}
    for night in range(3):
        for number, target in enumerate(["vda", "vdb"]):
            write = Write(0x40 + 0x10 * number + night, night * MiB, MiB)
            vm.write(target, write)
            written[target].append(write)
        result = run_night(action, stamps)
        warnings = [line for line in result.stdout.splitlines() if line.startswith("Warning:")]
        if night == 0:
            for path in vm.paths.values():
                assert any(
                    path in line and "no longer used; kept, delete it once checked" in line
                    for line in warnings
                ), warnings
        else:
            assert warnings == [], warnings
        tops = vm.tops()
        assert set(os.listdir(vm.directory)) == set(originals.values()) | {
            os.path.basename(tops["vda"]),
            os.path.basename(tops["vdb"]),
        }
        names.append(sorted(os.listdir(latest_set(scratch, vm))))
    assert names[0] == ["B3SUMS", "domain.xml", "set.json", "vda-vda.qcow2", "vdb-vdb.raw"]
    # From the second night on, the raw disk runs on a qcow2 image: named
    # after the disk, the same every night.
    assert (
        names[1]
        == names[2]
        == ["B3SUMS", "domain.xml", "set.json", "vda-vda.qcow2", "vdb-vdb.raw.qcow2"]
    )
    # The record of what our pulls made names only the current images.
    made = journal.read_pulled(vm.domain.UUIDString())
    assert made == journal.Pulled(frozenset(vm.tops().values()), frozenset())

    tops = vm.tops()
    vm.stop()
    for spec in specs:
        expected = reference_image(scratch, f"expected-{spec.target}", spec, written[spec.target])
        assert same_content(expected, spec.format, tops[spec.target], "qcow2")
        # The original holds the first night's freeze, untouched since.
        first = reference_image(scratch, f"first-{spec.target}", spec, written[spec.target][:1])
        assert same_content(first, spec.format, vm.paths[spec.target], spec.format)


def attach_live_only(vm, path: str, target: str) -> None:
    xml = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
    )
    vm.domain.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)


@pytest.mark.parametrize("change", ["hot-plugged live only", "pending detach", "edited definition"])
def test_what_the_freeze_did_not_change_is_no_failure(new_vm, scratch, change):
    vm = new_vm(
        [DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "qcow2", 16 * MiB)], start=False
    )
    with_acpi = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(
        "</os>",
        "</os><features><acpi/></features>",  # PCI hot-plug needs ACPI
    )
    vm.domain.connect().defineXML(with_acpi)
    vm.start()
    if change == "hot-plugged live only":
        hot = os.path.join(vm.directory, "hot.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", hot, str(16 * MiB)], check=True)
        attach_live_only(vm, hot, "vdc")
        assert "vdc" in vm.tops() and "vdc" not in vm.tops(inactive=True)
    elif change == "pending detach":
        disk = (
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{vm.paths['vdb']}'/><target dev='vdb' bus='virtio'/></disk>"
        )
        vm.domain.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert "vdb" in vm.tops() and "vdb" not in vm.tops(inactive=True)
    else:  # the next boot will use another image for vda
        other = os.path.join(vm.directory, "other.qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", other, str(32 * MiB)], check=True
        )
        xml = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        vm.domain.connect().defineXML(xml.replace(vm.paths["vda"], other))
        assert vm.tops(inactive=True)["vda"] == other
    live_before, defined_before = vm.tops(), vm.tops(inactive=True)
    settings = config.load(action_for(scratch, [vm]))

    outcome = back_up(vm, settings, stamp="20261127T010000")

    assert sorted(os.listdir(outcome.set_path)) == sorted(
        [
            "B3SUMS",
            "domain.xml",
            "set.json",
            *(f"{t}-{os.path.basename(p)}" for t, p in live_before.items()),
            # each qcow2's BLAKE3 tree, for the next night's changed blocks
            *(f"{t}-{os.path.basename(p)}.b3tree" for t, p in live_before.items()),
        ]
    )
    assert vm.tops() == live_before
    assert vm.tops(inactive=True) == defined_before  # the pending change is still pending
    assert not vm.has_mirror()
    assert vm.tagged_files() == []  # no overlay left behind
    assert journal.read(vm.domain.UUIDString()) is None


def test_the_journal_phase_never_goes_back_while_merging(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    action = action_for(scratch, [vm])
    try:
        killed = helper("run", action, fault="mid-merge")
        assert killed.returncode == -9, killed.stdout + killed.stderr
        left = journal.read(vm.domain.UUIDString())
        assert left is not None and left.phase == journal.MERGING
        assert [disk.state for disk in left.disks] == [journal.DISK_MERGING]
        status = helper("status", vm.name)
        assert status.returncode == 4 and "phase merging" in status.stdout, status.stdout
    finally:
        repaired = helper("recover", vm.name)
    assert repaired.returncode == 0, repaired.stdout
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_status_during_a_backup_says_it_is_in_progress_and_is_no_alarm(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    action = action_for(scratch, [vm])
    env = dict(
        os.environ, BACKUPNINJA_KVM_FAULT="after-freeze", BACKUPNINJA_KVM_FAULT_SIGNAL="STOP"
    )
    process = subprocess.Popen(
        [HELPER, "run", action],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        while _process_state(process.pid) != "T":  # stopped itself in the window
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        assert vm.tops()["vda"] != vm.paths["vda"]  # on the overlay now

        status = helper("status", vm.name)

        assert status.returncode == 0, status.stdout
        assert f"{vm.name} (running): backup in progress (pid {process.pid}, since " in (
            status.stdout
        )
        assert "on overlay" not in status.stdout
    finally:
        process.send_signal(signal.SIGCONT)
        output, errors = process.communicate()
    assert process.returncode == 0, output + errors
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert helper("status", vm.name).returncode == 0


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def test_status_lists_the_journal_of_a_transient_domain_destroyed_during_the_backup(
    new_vm, scratch
):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)], transient=True)
    uuid = vm.domain.UUIDString()
    settings = config.load(action_for(scratch, [vm]))
    overlays: dict[str, str] = {}

    def window(_domain, paths):
        overlays.update(paths)
        vm.write("vda", Write(0x53, 0, MiB))
        vm.domain.destroy()  # a transient domain is gone once destroyed

    try:
        with pytest.raises(OverlayLeftError):
            back_up(vm, settings, window)
        assert journal.read(uuid) is not None

        status = helper("status", vm.name)

        assert status.returncode == 4, status.stdout
        (line,) = [line for line in status.stdout.splitlines() if uuid in line]
        assert f"{vm.name} ({uuid}, no longer exists)" in line
        assert f"overlay {overlays['vda']} on base {vm.paths['vda']}" in line
        assert f"`backupninja-kvm recover {uuid}`" in line
        assert helper("status", uuid).stdout == status.stdout  # by UUID too
    finally:
        journal.remove(uuid)


def test_a_pull_killed_once_finished_is_closed_recorded_and_cleaned_up_later(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    vm.write("vda", Write(0x61, 0, MiB))
    action = action_for(scratch, [vm], merge="pull")
    uuid = vm.domain.UUIDString()
    stamps: list[str] = []

    fresh_second(stamps)
    killed = helper("run", action, fault="after-pivot")
    ended(stamps)  # pulled, not yet verified
    assert killed.returncode == -9, killed.stdout + killed.stderr
    pulled_to = vm.tops()["vda"]
    assert pulled_to != vm.paths["vda"] and backing_file(pulled_to) is None

    # The journal is left, but the disk runs on what the pull made: nothing on
    # an overlay to merge.
    status = helper("status", vm.name)
    assert status.returncode == 4, status.stdout
    assert "on overlay" not in status.stdout and "phase merging" in status.stdout
    repaired = helper("recover", vm.name)
    assert repaired.returncode == 0, repaired.stdout
    assert f"{vm.paths['vda']} is no longer used; kept, delete it once checked" in repaired.stdout
    assert vm.tops()["vda"] == pulled_to  # never merged back anywhere
    assert journal.read(uuid) is None
    assert journal.read_pulled(uuid).made == {pulled_to}

    # The next pull supersedes the image the first one made: deleted.
    vm.write("vda", Write(0x62, MiB, MiB))
    run_night(action, stamps)
    top = vm.tops()["vda"]
    assert sorted(os.listdir(vm.directory)) == sorted(["vda.qcow2", os.path.basename(top)])
    vm.stop()
    expected = reference_image(
        scratch,
        "expected",
        DiskSpec("vda", size=32 * MiB),
        [Write(0x61, 0, MiB), Write(0x62, MiB, MiB)],
    )
    assert same_content(expected, "qcow2", top, "qcow2")
