"""dest = remote: rsync over ssh to a real sshd on 127.0.0.1, through backupninja."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from backupninja_kvm import config, destination
from tests.conftest import write_action
from tests.support import sshd
from tests.support.cli import HELPER, helper
from tests.support.ninja import Ninja
from tests.support.vms import DiskSpec, MiB, Write, reference_image, same_content

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


def remote_action(backups: str, vm, server, keep: int = 2, port: int | None = None) -> str:
    return (
        "when = everyday at 01:00\n"
        f"[source]\ndomains = {vm.name}\n"
        "[dest]\ndest = remote\nhost = 127.0.0.1\nuser = root\n"
        f"port = {port or server.port}\nsshoptions = {server.options}\n"
        f"directory = {backups}\nkeep = {keep}\n"
    )


def test_remote_destination_gets_complete_checksummed_sparse_sets(server, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 64 * MiB)])
    vm.write("vda", Write(0x11, 0, MiB))
    vm.write("vdb", Write(0x21, 8 * MiB, MiB))
    backups = os.path.join(scratch, "remote-backups")  # "remote": this host, over ssh
    os.makedirs(backups)
    ninja = Ninja(scratch)
    action = ninja.action("20-vms.kvm", remote_action(backups, vm, server))

    for _ in range(3):  # keep = 2: the third run prunes the first set
        result = ninja.run(action)
        assert result.returncode == 0, result.output
        assert any("SUCCESS" in line for line in result.lines("Info")), result.log

    summary = [line for line in result.lines("Info") if f"{vm.name}: backed up" in line]
    assert f"set root@127.0.0.1:{backups}/{vm.name}/" in summary[-1]
    domain_dir = os.path.join(backups, vm.name)
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 2
    assert os.readlink(os.path.join(domain_dir, "latest")) == sets[-1]
    assert not [n for n in os.listdir(domain_dir) if n.endswith(".partial")]
    latest = os.path.join(domain_dir, sets[-1])
    # The remote host has b3sum here; without it, SHA256SUMS (tested in unit).
    subprocess.run(["b3sum", "--quiet", "-c", "B3SUMS"], cwd=latest, check=True)
    raw = os.path.join(latest, "vdb-vdb.raw")
    assert os.stat(raw).st_blocks * 512 < 8 * MiB  # rsync --sparse kept the holes
    expected = reference_image(
        scratch, "vdb", DiskSpec("vdb", "raw", 64 * MiB), [Write(0x21, 8 * MiB, MiB)]
    )
    assert same_content(expected, "raw", raw, "raw")
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_unreachable_host_is_fatal_names_the_key_and_freezes_nothing(server, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    ninja = Ninja(scratch)
    closed = sshd.free_port()
    action = ninja.action("20-vms.kvm", remote_action("/srv/none", vm, server, port=closed))

    result = ninja.run(action)

    fatals = result.lines("Fatal")
    assert any(
        f"{action} line 6: [dest] host: root@127.0.0.1:" in line and "refused" in line
        for line in fatals
    ), result.log
    assert any("FAILED" in line for line in fatals)
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_missing_remote_directory_is_fatal(server, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    ninja = Ninja(scratch)
    action = ninja.action("20-vms.kvm", remote_action("/srv/no-such-dir", vm, server))

    result = ninja.run(action)

    assert any(
        "[dest] host" in line and "directory /srv/no-such-dir is missing or not writable" in line
        for line in result.lines("Fatal")
    ), result.log
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def rsync_lines(result, name: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if f"{name}: rsync sent" in line]


def sent_bytes(line: str, what: str) -> float:
    """The size before *what* in a Debug line, in MiB."""
    value, unit = re.search(rf"([\d.]+) (B|KiB|MiB|GiB) {what}", line).groups()
    return float(value) * {"B": 1 / MiB, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def next_second() -> None:
    """Sets are named by the second: let the next run start in a new one."""
    now = time.strftime("%Y%m%dT%H%M%S")
    while time.strftime("%Y%m%dT%H%M%S") == now:
        time.sleep(0.05)


@pytest.mark.parametrize("delta", ["yes", "no"])
def test_delta_sends_only_what_changed_since_the_previous_set(server, new_vm, scratch, delta):
    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 64 * MiB)])
    vm.write("vda", Write(0x11, 0, 16 * MiB))
    vm.write("vdb", Write(0x21, 0, 16 * MiB))
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    text = remote_action(backups, vm, server, keep=3) + f"delta = {delta}\n"
    action = write_action(os.path.join(scratch, "remote.kvm"), text)

    first = helper("run", action)
    assert first.returncode == 0, first.stdout + first.stderr
    vm.write("vdb", Write(0x22, 32 * MiB, MiB))  # 1 MiB changes; vda does not change
    next_second()
    second = helper("run", action)
    assert second.returncode == 0, second.stdout + second.stderr

    domain_dir = os.path.join(backups, vm.name)
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 2
    [vdb_line] = rsync_lines(second, "vdb-vdb.raw")
    if delta == "yes":
        assert f"matched in the set {sets[0]}" in vdb_line, second.stdout
        assert sent_bytes(vdb_line, "of new data") <= 2  # the changed MiB, not 17
        assert 0 < sent_bytes(vdb_line, "on the wire") <= 3
    else:
        assert "matched" not in vdb_line
        assert sent_bytes(vdb_line, "of new data") >= 17
        assert sent_bytes(vdb_line, "on the wire") >= 17
    # Either way the set is whole: checksums, holes and content.
    latest = os.path.join(domain_dir, sets[-1])
    subprocess.run(["b3sum", "--quiet", "-c", "B3SUMS"], cwd=latest, check=True)
    raw = os.path.join(latest, "vdb-vdb.raw")
    assert os.stat(raw).st_blocks * 512 < 24 * MiB  # holes stay holes
    spec = DiskSpec("vdb", "raw", 64 * MiB)
    expected = reference_image(
        scratch, "vdb", spec, [Write(0x21, 0, 16 * MiB), Write(0x22, 32 * MiB, MiB)]
    )
    assert same_content(expected, "raw", raw, "raw")
    vda = reference_image(
        scratch, "vda", DiskSpec("vda", "qcow2", 64 * MiB), [Write(0x11, 0, 16 * MiB)]
    )
    assert same_content(vda, "qcow2", os.path.join(latest, "vda-vda.qcow2"), "qcow2")


def ssh_masters(port: int) -> list[str]:
    """Command lines of ssh processes still holding a shared connection to *port*."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("ssh") and str(port) in argv and "ControlMaster=auto" in argv:
            found.append(" ".join(argv))
    return found


def test_a_run_shares_one_ssh_connection_and_the_summary_says_what_was_sent(
    server, new_vm, scratch
):
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 64 * MiB)])
    vm.write("vdb", Write(0x21, 8 * MiB, MiB))
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    ninja = Ninja(scratch)
    action = ninja.action("20-vms.kvm", remote_action(backups, vm, server, keep=3))
    sshd_log = os.path.join(scratch, "ssh", "sshd.log")

    summaries, logins = [], []
    for _ in range(2):
        with open(sshd_log) as handle:
            before = handle.read().count("Accepted publickey")
        result = ninja.run(action)
        assert result.returncode == 0, result.output
        assert any("SUCCESS" in line for line in result.lines("Info")), result.log
        with open(sshd_log) as handle:
            logins.append(handle.read().count("Accepted publickey") - before)
        summaries += [line for line in result.lines("Info") if f"{vm.name}: backed up" in line]
        deadline = time.monotonic() + 10  # `ssh -O exit` is asynchronous for the master
        while ssh_masters(server.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ssh_masters(server.port) == []  # closed at the end of the run
        next_second()

    # One login per run: the check, the set's steps and each rsync share it.
    assert logins == [1, 1]
    first, second = summaries
    assert " copied, " not in first and " sent, " in first
    # A first set sends whole images: the 64 MiB raw image with its holes as
    # zeros, though it holds 1 MiB of data.
    assert sent_bytes(first, "sent") >= 64
    # The second sends only what differs from the first set (delta).
    assert sent_bytes(second, "sent") < 1


def test_pull_keeps_the_set_names_so_delta_finds_last_nights_copy(server, new_vm, scratch):
    from backupninja_kvm import journal

    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB)])
    vm.write("vda", Write(0x11, 0, 16 * MiB))
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    text = remote_action(backups, vm, server, keep=3).replace(
        "[source]", "[general]\nmerge = pull\n[source]"
    )
    action = write_action(os.path.join(scratch, "remote.kvm"), text)
    try:
        nights = []
        for night in range(3):
            vm.write("vda", Write(0x30 + night, (20 + night) * MiB, MiB))
            next_second()
            nights.append(helper("run", action))
            assert nights[-1].returncode == 0, nights[-1].stdout + nights[-1].stderr
    finally:
        record = journal.pulled_path(vm.domain.UUIDString())
        if os.path.exists(record):
            os.unlink(record)

    sets = destination.complete_sets(os.path.join(backups, vm.name))
    assert len(sets) == 3
    for name in sets:
        assert "vda-vda.qcow2" in os.listdir(os.path.join(backups, vm.name, name))
    # Night 3 copies the image night 2's pull made: rsync finds night 2's copy
    # under the same name and sends little of the 17 MiB again.
    [line] = rsync_lines(nights[2], "vda-vda.qcow2")
    assert f"matched in the set {sets[1]}" in line, nights[2].stdout
    assert sent_bytes(line, "of new data") < 8


def run_helper(action: str, tz: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HELPER, "run", action],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": tz},
        stdin=subprocess.DEVNULL,
    )


def test_remote_sets_are_named_in_utc_and_a_time_zone_change_keeps_the_newest(
    server, new_vm, scratch
):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    backups = os.path.join(scratch, "remote-backups")
    os.makedirs(backups)
    action = write_action(os.path.join(scratch, "r.kvm"), remote_action(backups, vm, server, 1))

    first = run_helper(action, "UTC-12")
    second = run_helper(action, "UTC")

    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    domain_dir = os.path.join(backups, vm.name)
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 1 and sets[0].endswith("Z"), sets
    assert f"set root@127.0.0.1:{domain_dir}/{sets[0]}" in second.stdout
    assert os.readlink(os.path.join(domain_dir, "latest")) == sets[0]
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def plant_set(domain_dir: str, stamp: str, files: dict[str, bytes]) -> None:
    path = os.path.join(domain_dir, stamp)
    os.makedirs(path, mode=0o700)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as handle:
            handle.write(data)
    subprocess.run(f"b3sum -- * > {destination.MANIFEST}", shell=True, cwd=path, check=True)


def test_remote_sets_without_images_never_push_a_good_set_out(server, scratch):
    domain_dir = os.path.join(scratch, "remote-backups", "web1")
    os.makedirs(domain_dir, mode=0o700)
    plant_set(domain_dir, "20261201T010000", {"domain.xml": b"<d/>", "vda-a.qcow2": b"data"})
    plant_set(domain_dir, "20261202T010000Z", {"domain.xml": b"<d/>"})  # disks moved to LVM
    plant_set(domain_dir, "20261203T010000Z", {"domain.xml": b"<d/>"})
    remote = config.make_remote("127.0.0.1", "root", server.port, server.options)
    backup_set = destination.RemoteBackupSet(domain_dir, "20261203T010000Z", remote)

    assert backup_set.prune(1) == []
    assert destination.complete_sets(domain_dir) == [
        "20261201T010000",
        "20261202T010000Z",
        "20261203T010000Z",
    ]
    assert backup_set.choose_stamp() == "20261203T010001Z"  # after the newest, whatever the clock


def test_remote_domain_folder_owned_by_another_user_is_an_error(server, new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    backups = os.path.join(scratch, "remote-backups")
    domain_dir = os.path.join(backups, vm.name)
    os.makedirs(domain_dir)
    os.chown(domain_dir, 65534, 65534)
    action = write_action(os.path.join(scratch, "r.kvm"), remote_action(backups, vm, server))

    result = run_helper(action, "UTC")

    assert result.returncode == 4, result.stdout
    assert f"{domain_dir} is owned by uid 65534" in result.stdout
    assert os.listdir(domain_dir) == [] and vm.tagged_files() == []
