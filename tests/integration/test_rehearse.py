"""``rehearse SET``: a real set boots as a throwaway guest, and the set stays as it was.

The guest is the quiesce tests' tiny Linux (Debian's kernel, busybox,
qemu-ga, ext4 on a qcow2 vda), backed up live by the product; the set's
domain.xml boots it by direct kernel boot, from the test VM's folder. The
original keeps running beside its rehearsals.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import libvirt
import pytest

from backupninja_kvm import config, setinfo
from backupninja_kvm.rehearse import NAME_PREFIX, WORK_ROOT
from tests.conftest import write_action
from tests.support import guest
from tests.support.cli import HELPER, helper
from tests.support.cycle import back_up
from tests.support.vms import IMAGE_ROOT, PREFIX, DiskSpec, MiB, TestVM, connect

pytestmark = pytest.mark.libvirt

STAMP = "20261202T010000Z"


def rehearsals() -> list[str]:
    """The rehearsal domains of this test run (they carry the test VM's name)."""
    return [
        d.name() for d in connect().listAllDomains(0) if d.name().startswith(NAME_PREFIX + PREFIX)
    ]


def work_folders() -> set[str]:
    return set(glob.glob(os.path.join(WORK_ROOT, NAME_PREFIX + "*")))


@pytest.fixture(scope="module")
def live_set(connection):
    """A set of the running agent guest, made by the product: (vm, set path)."""
    assert guest.kernel(), "no kernel in /boot: scripts/setup-host installs linux-image-amd64"
    assert os.path.exists(guest.AGENT), "scripts/setup-host installs qemu-guest-agent"
    name = PREFIX + uuid.uuid4().hex[:8]
    directory = os.path.join(IMAGE_ROOT, name)
    os.makedirs(directory, mode=0o755)
    os.chmod(IMAGE_ROOT, 0o755)
    backups = tempfile.mkdtemp(prefix="bnkvm-test-", dir="/var/tmp")
    vm = TestVM(name, directory, [DiskSpec("vda", "qcow2", 64 * MiB)])
    try:
        shutil.copy(guest.kernel(), os.path.join(directory, "vmlinuz"))
        guest.build_agent_initramfs(os.path.join(directory, "initramfs.gz"))
        raw = os.path.join(directory, "vda.raw")
        guest.make_ext4(raw, 64 * MiB)
        vm.paths["vda"] = os.path.join(directory, "vda.qcow2")
        subprocess.run(
            ["qemu-img", "convert", "-q", "-O", "qcow2", raw, vm.paths["vda"]], check=True
        )
        os.unlink(raw)
        console = os.path.join(directory, "console.log")
        open(console, "w").close()
        os.chmod(console, 0o666)
        disks = {"vda": (vm.paths["vda"], "qcow2")}
        connect().defineXML(guest.guest_xml(name, directory, disks, console, agent_channel=True))
        vm.start()
        guest.wait_for_line(console, "guest: tick 3")
        text = (
            f"[general]\nquiesce = auto\n[source]\ndomains = {name}\n"
            f"[dest]\ndirectory = {backups}\n"
        )
        settings = config.load(write_action(os.path.join(backups, "r.kvm"), text))
        outcome = back_up(vm, settings, stamp=STAMP)
        assert outcome.set_path.endswith(STAMP), outcome.summary()
        yield vm, outcome.set_path
    finally:
        vm.remove()
        shutil.rmtree(backups, ignore_errors=True)


@pytest.fixture
def no_leftovers(connection):
    """Destroys what a failed test left, and checks that nothing was left."""
    before = work_folders()
    yield
    left = rehearsals()
    for name in left:
        with_handle = connect().lookupByName(name)
        try:
            with_handle.destroy()
        except libvirt.libvirtError:
            pass
    new_folders = work_folders() - before
    for folder in new_folders:
        shutil.rmtree(folder, ignore_errors=True)
    assert not left and not new_folders, (left, new_folders)


def copy_of(live_set, scratch: str) -> str:
    """A copy of the set, to damage or to record checks in."""
    vm, set_path = live_set
    copy = os.path.join(scratch, vm.name, STAMP)
    shutil.copytree(set_path, copy)
    return copy


def state_of(set_path: str) -> dict[str, tuple]:
    """Every file of the set, but checks.json: its bytes' mtime, size, owner, mode, xattrs."""
    found = {}
    for name in sorted(os.listdir(set_path)):
        if name == setinfo.CHECKS:
            continue
        path = os.path.join(set_path, name)
        info = os.stat(path)
        found[name] = (info.st_mtime_ns, info.st_size, info.st_uid, info.st_gid, info.st_mode)
        found[name] += tuple(sorted(os.listxattr(path)))
    return found


def b3sum_check(set_path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["b3sum", "-c", "B3SUMS"], cwd=set_path, capture_output=True, text=True)


def rehearsal_check(set_path: str) -> dict:
    return setinfo.read_checks(set_path)["rehearse"]


def test_a_set_boots_and_the_agent_answers_and_the_set_is_unchanged(live_set, no_leftovers):
    vm, set_path = live_set
    before = state_of(set_path)
    assert b3sum_check(set_path).returncode == 0

    result = helper("rehearse", set_path, "--timeout", "120")
    print(result.stdout)

    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Info: "))
    assert line.startswith(f"Info: {vm.name}: set {STAMP} booted in ")
    assert line.endswith(" s: the guest agent answered")
    check = rehearsal_check(set_path)
    assert check["ok"] is True and check["method"] == "agent"
    assert 0 < check["seconds"] < 120 and check["summary"] == line.removeprefix("Info: ")
    assert setinfo.parse_utc(check["time"]) is not None
    verified = b3sum_check(set_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert state_of(set_path) == before  # not a byte, time, owner or label changed
    assert vm.is_running()  # the original went on beside it


def test_a_set_whose_image_is_damaged_does_not_boot(live_set, scratch, no_leftovers):
    damaged = copy_of(live_set, scratch)
    with open(os.path.join(damaged, "vda-vda.qcow2"), "r+b") as image:
        image.write(b"\0\0\0\0")  # the qcow2 magic

    result = helper("rehearse", damaged, "--timeout", "60")
    print(result.stdout)

    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "did not boot: QEMU refused to start it: " in errors[0], errors
    check = rehearsal_check(damaged)
    assert check["ok"] is False and check["summary"] == errors[0].removeprefix("Error: ")


def test_the_console_pattern_tells_when_it_is_up(live_set, scratch, no_leftovers):
    copy = copy_of(live_set, scratch)

    result = helper("rehearse", copy, "--console-pattern", r"guest: (ready|tick)")
    print(result.stdout)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "s: its console showed 'guest: ready'" in result.stdout
    check = rehearsal_check(copy)
    assert check["ok"] is True and check["method"] == "console"


def test_a_guest_that_never_shows_the_pattern_fails_after_the_timeout(
    live_set, scratch, no_leftovers
):
    copy = copy_of(live_set, scratch)

    result = helper("rehearse", copy, "--console-pattern", "login:", "--timeout", "8")
    print(result.stdout)

    assert result.returncode == 1, result.stdout + result.stderr
    error = next(line for line in result.stdout.splitlines() if line.startswith("Error: "))
    assert "did not boot within 8 s: its console did not show 'login:'" in error
    assert "; its console's last line: '" in error  # what the guest got to
    assert rehearsal_check(copy)["ok"] is False


def test_an_interrupted_rehearsal_leaves_no_domain_and_no_folder(live_set, scratch, no_leftovers):
    copy = copy_of(live_set, scratch)
    before = state_of(copy), setinfo.read_checks(copy)
    process = subprocess.Popen(
        [HELPER, "rehearse", copy, "--console-pattern", "never shown"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not rehearsals() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rehearsals(), "the rehearsal domain did not start"

    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 2, stdout + stderr
    assert "Fatal: interrupted by SIGINT" in stdout
    assert not rehearsals()
    assert (state_of(copy), setinfo.read_checks(copy)) == before  # no result: not judged


def test_a_set_without_an_agent_channel_or_pattern_cannot_be_tried(live_set, scratch):
    copy = copy_of(live_set, scratch)
    definition = os.path.join(copy, "domain.xml")
    with open(definition) as handle:
        text = handle.read()
    start = text.index("<channel")
    end = text.index("</channel>") + len("</channel>")
    with open(definition, "w") as handle:
        handle.write(text[:start] + text[end:])
    checks = setinfo.read_checks(copy)

    result = helper("rehearse", copy)
    print(result.stdout)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "Fatal: the definition has no guest agent channel" in result.stdout
    assert setinfo.read_checks(copy) == checks


def test_the_layers_below_are_the_sets_whatever_the_headers_name(live_set, scratch, no_leftovers):
    """A copy of a ride-along view holds the domain's layers, their headers
    naming the domain's own files: rehearse reads the set's layers below
    the top, as set.json lists them."""
    copy = copy_of(live_set, scratch)
    os.rename(os.path.join(copy, "vda-vda.qcow2"), os.path.join(copy, "vda-base.qcow2"))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2"]
        + ["-b", "/var/lib/libvirt/images/gone/base.qcow2", "vda-vda.qcow2", str(64 * MiB)],
        cwd=copy,
        check=True,
    )
    info = setinfo.read(copy)
    (top,) = info.disks()
    base = setinfo.SetImage("vda-base.qcow2", "vda", "backing", "/gone/base.qcow2", "qcow2", 0)
    layered = setinfo.SetInfo(
        info.domain,
        info.uuid,
        info.freeze_time,
        info.consistency,
        (dataclasses.replace(top, backing=base.name), base),
    )
    with open(os.path.join(copy, setinfo.SET_INFO), "w") as handle:
        handle.write(layered.to_json())

    result = helper("rehearse", copy, "--timeout", "120")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "s: the guest agent answered" in result.stdout


def test_rehearse_yes_boots_each_new_set_after_the_backup(live_set, scratch, no_leftovers):
    vm, _ = live_set
    backups = os.path.join(scratch, "nightly")
    os.makedirs(backups)
    text = (
        f"[general]\nquiesce = auto\n[source]\ndomains = {vm.name}\n"
        f"[dest]\ndirectory = {backups}\nrehearse = yes\nrehearse_timeout = 240\n"
    )
    settings = config.load(write_action(os.path.join(scratch, "nightly.kvm"), text))

    outcome = back_up(vm, settings, stamp="20261203T010000Z")

    assert outcome.rehearsed is True and not outcome.problems, outcome.problems
    assert "booted in" in outcome.summary() and "quiesced" in outcome.summary()
    checks = setinfo.read_checks(outcome.set_path)
    assert checks["rehearse"]["ok"] is True and checks["rehearse"]["method"] == "agent"
    assert setinfo.read(outcome.set_path).consistency == "quiesced"
    assert vm.tops() == vm.paths
