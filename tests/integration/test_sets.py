"""Sets at a real destination, made by real runs of the helper on test VMs:
names, order and retention, ``latest``, mount points, and ``run --test``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from backupninja_kvm import config, destination
from tests.conftest import write_action
from tests.support.cli import HELPER
from tests.support.cycle import back_up
from tests.support.vms import DiskSpec, MiB, Write

pytestmark = pytest.mark.libvirt

SMALL = [DiskSpec("vda", "qcow2", 16 * MiB)]


def action(scratch: str, vm, directory: str, quiesce: str = "auto", **extra: str) -> str:
    lines = [
        "when = everyday at 01:00",
        f"[general]\nquiesce = {quiesce}",
        f"[source]\ndomains = {vm.name}",
        f"[dest]\ndirectory = {directory}",
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    return write_action(os.path.join(scratch, "sets.kvm"), "\n".join(lines) + "\n")


def run(*args: str, tz: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if tz:
        env["TZ"] = tz
    return subprocess.run(
        [HELPER, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )


def lines(result: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


def backups_of(scratch: str) -> str:
    path = os.path.join(scratch, "backups")
    os.makedirs(path, exist_ok=True)
    return path


def test_a_time_zone_change_never_prunes_the_newest_set(new_vm, scratch):
    vm = new_vm(SMALL)
    backups = backups_of(scratch)
    path = action(scratch, vm, backups, keep="1")

    first = run("run", path, tz="UTC-12")
    second = run("run", path, tz="UTC")

    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    domain_dir = os.path.join(backups, vm.name)
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 1 and sets[0].endswith("Z"), sets
    assert f"set {os.path.join(domain_dir, sets[0])}" in second.stdout
    assert os.readlink(os.path.join(domain_dir, "latest")) == sets[0]
    assert os.path.isfile(os.path.join(domain_dir, "latest", destination.MANIFEST))


def test_two_runs_in_the_same_second_make_two_sets(new_vm, scratch):
    vm = new_vm(SMALL)
    settings = config.load(action(scratch, vm, backups_of(scratch), keep="3"))

    first = back_up(vm, settings, stamp="20261202T025647Z")
    second = back_up(vm, settings, stamp="20261202T025647Z")

    assert first.set_path.endswith("/20261202T025647Z")
    assert second.set_path.endswith("/20261202T025648Z")
    domain_dir = os.path.dirname(second.set_path)
    assert destination.complete_sets(domain_dir) == ["20261202T025647Z", "20261202T025648Z"]
    assert os.readlink(os.path.join(domain_dir, "latest")) == "20261202T025648Z"
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_latest_as_a_folder_is_a_warning_and_old_sets_are_still_pruned(new_vm, scratch):
    vm = new_vm(SMALL)
    backups = backups_of(scratch)
    path = action(scratch, vm, backups, keep="1")
    assert run("run", path).returncode == 0
    domain_dir = os.path.join(backups, vm.name)
    latest = os.path.join(domain_dir, "latest")
    first = os.readlink(latest)
    os.unlink(latest)
    shutil.copytree(os.path.join(domain_dir, first), latest)  # as `cp -rL` leaves it

    result = run("run", path)

    assert result.returncode == 0, result.stdout
    assert lines(result, "Error:") == []
    assert any(f"{latest} is a folder, not a link" in w for w in lines(result, "Warning:"))
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 1 and sets[0] != first  # pruned as keep = 1 says
    assert sorted(os.listdir(domain_dir)) == sorted([sets[0], "latest"])  # no latest.new


@pytest.fixture
def exfat(scratch):
    """A mounted exFAT filesystem (no symbolic links), as on a USB disk or a
    NAS; unmounted and its loop device detached afterwards. (This kernel has
    no vfat module: exFAT through FUSE refuses links the same way.)"""
    image = os.path.join(scratch, "exfat.img")
    mountpoint = os.path.join(scratch, "exfat")
    os.makedirs(mountpoint)
    subprocess.run(["truncate", "-s", "96M", image], check=True)
    subprocess.run(["mkfs.exfat", image], check=True, capture_output=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", image], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(
            ["mount", "-t", "exfat-fuse", "-o", "umask=077", loop, mountpoint], check=True
        )
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", mountpoint], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_a_destination_without_symlinks_gets_a_latest_file(new_vm, scratch, exfat):
    vm = new_vm(SMALL)
    path = action(scratch, vm, exfat, keep="1")

    results = [run("run", path), run("run", path)]

    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert lines(result, "Error:") == [] and lines(result, "Warning:") == [], result.stdout
    domain_dir = os.path.join(exfat, vm.name)
    sets = destination.complete_sets(domain_dir)
    assert len(sets) == 1
    with open(os.path.join(domain_dir, destination.LATEST_FILE)) as pointer:
        assert pointer.read() == sets[0] + "\n"
    assert sorted(os.listdir(domain_dir)) == sorted([sets[0], destination.LATEST_FILE])
    subprocess.run(
        ["b3sum", "--quiet", "-c", "B3SUMS"], cwd=os.path.join(domain_dir, sets[0]), check=True
    )


def test_require_mount_refuses_a_folder_that_is_not_mounted(new_vm, scratch):
    vm = new_vm(SMALL)
    usb = os.path.join(scratch, "usb")
    os.makedirs(usb)
    path = action(scratch, vm, usb, require_mount="yes")

    refused = run("run", path)

    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert any(
        f"{usb} is not a mount point" in f and "require_mount" in f
        for f in lines(refused, "Fatal:")
    ), refused.stdout
    assert os.listdir(usb) == [] and vm.tagged_files() == []
    assert run("run", "--test", path).returncode == 2

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", usb], check=True)
    try:
        mounted = run("run", path)
        assert mounted.returncode == 0, mounted.stdout
        assert destination.complete_sets(os.path.join(usb, vm.name))
    finally:
        subprocess.run(["umount", usb], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder away")
def test_a_domain_folder_owned_by_another_user_is_an_error_and_left_alone(new_vm, scratch):
    vm = new_vm(SMALL)
    backups = backups_of(scratch)
    domain_dir = os.path.join(backups, vm.name)
    os.makedirs(domain_dir)
    os.chown(domain_dir, 65534, 65534)  # made first by `nobody` in a shared folder

    result = run("run", action(scratch, vm, backups))

    assert result.returncode == 4, result.stdout
    assert any(
        f"{vm.name}: {domain_dir} is owned by uid 65534" in e for e in lines(result, "Error:")
    ), result.stdout
    assert os.listdir(domain_dir) == [] and os.stat(domain_dir).st_uid == 65534
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_a_test_run_says_the_space_shortfall_as_the_real_run_does(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 64 * MiB)])
    vm.write("vda", Write(0x11, 0, 24 * MiB))
    small = tempfile.mkdtemp(dir=scratch)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", small], check=True)
    try:
        result = run("run", "--test", action(scratch, vm, small))
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", small], check=True)

    assert result.returncode == 4, result.stdout + result.stderr
    assert any(
        f"test run: {vm.name}: not enough free space for the backup set" in e
        for e in lines(result, "Error:")
    ), result.stdout
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_a_test_run_shows_the_set_it_would_write_and_what_keep_would_prune(new_vm, scratch):
    vm = new_vm(SMALL)
    backups = backups_of(scratch)
    path = action(scratch, vm, backups, keep="2")
    for _ in range(2):
        assert run("run", path).returncode == 0
    domain_dir = os.path.join(backups, vm.name)
    before = sorted(os.listdir(domain_dir))
    oldest = destination.complete_sets(domain_dir)[0]

    result = run("run", "--test", path)

    assert result.returncode == 0, result.stdout + result.stderr
    infos = lines(result, "Info:")
    assert any(f"test run: {vm.name}: would write the set {domain_dir}/" in i for i in infos)
    assert any(f"keep = 2 would remove 1 old set(s): {oldest}" in i for i in infos), infos
    assert sorted(os.listdir(domain_dir)) == before
    assert vm.tops() == vm.paths and vm.tagged_files() == []


HOLD_LOCK = """
import sys, time
from backupninja_kvm.lock import domain_lock
with domain_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_test_run_names_the_holder_of_the_lock_and_leaves_it_held(new_vm, scratch):
    vm = new_vm(SMALL)
    path = action(scratch, vm, backups_of(scratch))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, vm.name, vm.domain.UUIDString()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run("run", "--test", path)
        assert holder.poll() is None  # the holder still runs and holds it
    finally:
        holder.kill()
        holder.wait()

    assert result.returncode == 4, result.stdout
    assert any(
        f"test run: {vm.name}: another backup holds this domain's lock (pid {holder.pid}" in e
        for e in lines(result, "Error:")
    ), result.stdout
    assert run("run", "--test", path).returncode == 0  # free again


@pytest.mark.parametrize(("quiesce", "prefix"), [("auto", "Warning:"), ("yes", "Error:")])
def test_a_test_run_says_when_the_guest_agent_is_not_connected(new_vm, scratch, quiesce, prefix):
    vm = new_vm(SMALL, agent_channel=True)  # a channel, but no agent answers in the guest
    path = action(scratch, vm, backups_of(scratch), quiesce=quiesce)

    result = run("run", "--test", path)

    assert result.returncode == (0 if quiesce == "auto" else 4), result.stdout
    assert any(
        f"{vm.name}: the guest agent is not connected: the freeze would fail" in line
        for line in lines(result, prefix)
    ), result.stdout


def test_world_writable_directory_and_overlaydir_get_warnings(new_vm, scratch):
    vm = new_vm(SMALL)
    os.chmod(scratch, 0o711)  # QEMU opens the overlays under it
    share = os.path.join(scratch, "share")
    overlays = os.path.join(scratch, "overlays")
    for path in (share, overlays):
        os.makedirs(path)
        os.chmod(path, 0o1777)  # like /tmp, or a share everyone may write
    actions = os.path.join(scratch, "actions")  # closed to others, as backupninja requires
    os.makedirs(actions, mode=0o700)
    path = write_action(
        os.path.join(actions, "shared.kvm"),
        f"[source]\ndomains = {vm.name}\noverlaydir = {overlays}\noverlay_reserve = 0\n"
        f"[dest]\ndirectory = {share}\n",
    )

    for result in (run("run", "--test", path), run("run", path)):
        assert result.returncode == 0, result.stdout
        warnings = lines(result, "Warning:")
        for key, folder in (("[dest] directory", share), ("[source] overlaydir", overlays)):
            assert any(
                f"{key} {folder} is writable by every user (sticky)" in w for w in warnings
            ), result.stdout
    assert destination.complete_sets(os.path.join(share, vm.name))
    assert vm.tops() == vm.paths and vm.tagged_files() == []


def test_a_remote_host_without_symlinks_gets_a_latest_file(exfat):
    # The script the remote host runs to complete a set, on a filesystem
    # without links (the ssh part is tested in tests/e2e/test_remote.py).
    domain_dir = os.path.join(exfat, "web1")
    for stamp in ("20261202T025647Z", "20261202T025648Z"):
        partial = os.path.join(domain_dir, stamp + destination.PARTIAL)
        os.makedirs(partial)
        with open(os.path.join(partial, "vda-web1.qcow2"), "wb") as image:
            image.write(b"data")
        done = subprocess.run(
            ["/bin/sh", "-c", destination._COMPLETE, "sh", domain_dir, stamp],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and "warning" not in done.stdout, done.stdout + done.stderr

    with open(os.path.join(domain_dir, destination.LATEST_FILE)) as pointer:
        assert pointer.read() == "20261202T025648Z\n"
    assert sorted(os.listdir(domain_dir)) == [
        "20261202T025647Z",
        "20261202T025648Z",
        destination.LATEST_FILE,
    ]


def test_a_test_run_says_that_the_real_run_would_repair_first(new_vm, scratch):
    vm = new_vm(SMALL)
    path = action(scratch, vm, backups_of(scratch))
    env = {**os.environ, "BACKUPNINJA_KVM_FAULT": "after-freeze"}
    killed = subprocess.run(
        [HELPER, "run", path], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    assert killed.returncode == -9, killed.stdout
    try:
        assert vm.tops() != vm.paths  # left on its overlays, with the journal

        result = run("run", "--test", path)

        assert result.returncode == 0, result.stdout
        assert any(
            f"test run: {vm.name}: the journal " in w and "the real run repairs that first" in w
            for w in lines(result, "Warning:")
        ), result.stdout
        assert vm.tops() != vm.paths  # the test run changed nothing
    finally:
        run("recover", vm.name)
    assert vm.tops() == vm.paths and vm.tagged_files() == []
