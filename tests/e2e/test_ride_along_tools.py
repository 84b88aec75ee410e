"""End to end: the ride-along examples with a real VM, borg and restic
repositories, ``merge = pull`` in the thaw, the lints, and every refusal to
freeze, each through the real backupninja.

The borg and restic cases use examples/ride-along as they stand, with only
their paths moved into the scratch folder and ``domains`` set to the test's
VM (the example says ``all``, which would freeze other suites' VMs too).
"""

from __future__ import annotations

import os
import subprocess
import time

import libvirt
import pytest

from backupninja_kvm import ride
from tests.e2e.test_examples_ride_along import _scratch_example
from tests.e2e.test_ride_along import (
    BEFORE,
    DURING,
    SPECS,
    assert_back_on_own_images_with_every_write,
    references,
    window_writes,
)
from tests.e2e.test_ride_along import trio as trio  # noqa: F401 - the fixture
from tests.e2e.test_ride_along import vm as vm  # noqa: F401 - the fixture
from tests.integration.test_restore import copies as copies  # noqa: F401 - the fixture
from tests.support.cli import helper
from tests.support.riding import freeze_text, rsync_text, thaw_text, view_mounts
from tests.support.vms import connect, same_content

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


def example(name: str, scratch: str, domain: str) -> str:
    return _scratch_example(name, scratch).replace("domains = all", f"domains = {domain}")


@pytest.fixture
def environment(scratch):
    """borg's and restic's caches and keys in the scratch folder, not root's home."""
    return dict(
        os.environ,
        LC_ALL="C",
        BORG_BASE_DIR=f"{scratch}/borg-base",
        RESTIC_CACHE_DIR=f"{scratch}/restic-cache",
        BORG_PASSPHRASE="CHANGEME",
    )


def problems(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if any(f" {level}: " in line for level in ("Warning", "Error", "Fatal", "Halt"))
    ]


def assert_frozen_images_in(folder: str, scratch: str) -> None:
    expected = references(os.path.join(scratch, "ref-frozen"), BEFORE)
    for spec in SPECS:
        copy = os.path.join(folder, f"{spec.target}-{spec.target}.{spec.format}")
        assert same_content(copy, spec.format, expected[spec.target], spec.format), copy
    assert os.path.exists(os.path.join(folder, "domain.xml"))
    assert os.path.exists(os.path.join(folder, "manifest.json"))


def trio_of_examples(trio, vm, scratch, ship: str) -> None:
    for name in ("10-vms.kvm", ship, "90-vms.kvm"):
        trio.ninja.action(name, example(name, scratch, vm.name))
    window_writes(trio, vm)


def assert_clean_after(trio, vm, scratch) -> None:
    assert_back_on_own_images_with_every_write(vm, scratch)
    assert view_mounts(trio.view) == [] and ride.read(trio.view) is None


def test_borg_ships_the_frozen_images_with_the_examples(trio, vm, scratch, environment, copies):
    repository = f"{scratch}/borg"
    subprocess.run(["borg", "init", "-e", "repokey", repository], env=environment, check=True)
    trio_of_examples(trio, vm, scratch, "20-vms.borg")

    result = trio.ninja.run_all(env=environment)

    assert problems(result.log) == [], result.log
    assert any(f"{vm.name}: thawed: frozen" in line for line in result.lines("Info"))
    archives = subprocess.run(
        ["borg", "list", "--short", repository],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(archives) == 1, archives
    out = f"{scratch}/extracted"
    os.mkdir(out)
    subprocess.run(
        ["borg", "extract", "--sparse", f"{repository}::{archives[0]}"],
        cwd=out,
        env=environment,
        check=True,
    )
    assert_frozen_images_in(f"{out}{scratch}/view/{vm.name}", scratch)
    raw = f"{out}{scratch}/view/{vm.name}/vdb-vdb.raw"
    assert os.stat(raw).st_blocks * 512 <= 8 * 1024 * 1024  # holes kept
    assert_clean_after(trio, vm, scratch)

    # The extracted folder restores as it is, beside the running original.
    extracted = f"{out}{scratch}/view/{vm.name}"
    copies.append(f"{vm.name}-borg")
    verified = helper("verify", extracted)
    restored = helper("restore", extracted, "--as", f"{vm.name}-borg", "--start")

    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "borg check or restic check verify their own copies" in verified.stdout
    assert restored.returncode == 0, restored.stdout + restored.stderr
    copy = connect().lookupByName(f"{vm.name}-borg")
    assert copy.isActive() and vm.is_running()
    copy.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    expected = references(os.path.join(scratch, "ref-restored"), BEFORE)
    for spec in SPECS:
        restored_image = os.path.join(vm.directory, f"{vm.name}-borg-{spec.target}-{spec.target}")
        restored_image += f".{spec.format}"
        assert same_content(restored_image, spec.format, expected[spec.target], spec.format)


def test_restic_ships_the_frozen_images_with_the_examples(trio, vm, scratch, environment):
    repository, password = f"{scratch}/restic", f"{scratch}/restic-pass"
    with open(password, "w") as handle:
        handle.write("scratch\n")
    os.chmod(password, 0o600)
    subprocess.run(
        ["restic", "-q", "-r", repository, "--password-file", password, "init"],
        env=environment,
        check=True,
    )
    trio_of_examples(trio, vm, scratch, "20-vms.restic")

    result = trio.ninja.run_all(env=environment)

    assert problems(result.log) == [], result.log
    out = f"{scratch}/restored"
    subprocess.run(
        ["restic", "-q", "-r", repository, "--password-file", password, "restore", "latest"]
        + ["--target", out],
        env=environment,
        check=True,
    )
    assert_frozen_images_in(f"{out}{scratch}/view/{vm.name}", scratch)
    assert_clean_after(trio, vm, scratch)


def rsync_trio(trio, vm, scratch, rsync_options: str = "", merge: str = "commit") -> str:
    dest = os.path.join(scratch, "rsync-dest")
    os.makedirs(os.path.join(dest, "host"), exist_ok=True)
    trio.freeze(vm.name)
    window_writes(trio, vm)
    trio.ninja.action("20-vms.rsync", rsync_text(trio.view, dest, rsync_options))
    trio.thaw(merge)
    return os.path.join(dest, "host", trio.view.lstrip("/"), vm.name)


def test_merge_by_pull_in_the_thaw(trio, vm, scratch):
    shipped = rsync_trio(trio, vm, scratch, merge="pull")

    result = trio.ninja.run_all()

    assert result.lines("Error") == [] and result.lines("Fatal") == [], result.log
    thawed = [line for line in result.lines("Info") if f"{vm.name}: thawed: frozen" in line]
    assert thawed and "merged by pull in" in thawed[0], result.log
    assert_frozen_images_in(shipped, scratch)
    tops = vm.tops()
    assert all(".bnkvm-" in tops[t] for t in vm.paths), tops  # the former overlays
    vm.stop()  # QEMU flushes the qcow2 metadata it caches
    expected = references(
        os.path.join(scratch, "ref-after"), {t: BEFORE[t] + DURING[t] for t in BEFORE}
    )
    for spec in SPECS:
        assert same_content(tops[spec.target], "qcow2", expected[spec.target], spec.format)
    assert view_mounts(trio.view) == [] and ride.read(trio.view) is None


def test_ship_settings_that_ship_a_bloated_copy_are_warnings(trio, vm, scratch):
    shipped = rsync_trio(trio, vm, scratch, rsync_options="-av --delete --recursive")

    result = trio.ninja.run_all()

    warnings = result.lines("Warning")
    assert any("has no -S" in line for line in warnings), result.log
    assert any("has -v" in line for line in warnings), result.log
    assert result.lines("Error") == [] and result.lines("Fatal") == [], result.log
    assert_frozen_images_in(shipped, scratch)
    assert_clean_after(trio, vm, scratch)


# --- refusals: Fatal, nothing frozen -------------------------------------------


def assert_refused(result, vm, trio, *words: str) -> None:
    fatal = result.lines("Fatal")
    assert fatal and all(any(w in line for line in fatal) for w in words), result.log
    assert any("nothing is frozen" in line for line in fatal), result.log
    assert vm.tops() == vm.paths and vm.tagged_files() == []
    assert view_mounts(trio.view) == [] and ride.read(trio.view) is None


def test_the_freeze_run_alone_is_refused(trio, vm, scratch):
    rsync_trio(trio, vm, scratch)
    result = trio.ninja.run(os.path.join(trio.ninja.configdir, "10-vms.kvm"))
    assert_refused(result, vm, trio, "run alone")


def test_no_thaw_is_refused(trio, vm, scratch):
    rsync_trio(trio, vm, scratch)
    os.unlink(os.path.join(trio.ninja.configdir, "90-vms.kvm"))
    assert_refused(trio.ninja.run_all(), vm, trio, "is a thaw that runs now")


def test_a_thaw_of_another_view_is_no_thaw(trio, vm, scratch):
    rsync_trio(trio, vm, scratch)
    trio.ninja.action("90-vms.kvm", thaw_text(f"{scratch}/another-view"))
    assert_refused(trio.ninja.run_all(), vm, trio, "is a thaw that runs now")


def test_no_ship_action_reading_the_view_is_refused(trio, vm, scratch):
    rsync_trio(trio, vm, scratch)
    other = os.path.join(scratch, "other")
    os.makedirs(other)
    trio.ninja.action("20-vms.rsync", rsync_text(other, os.path.join(scratch, "rsync-dest")))
    assert_refused(trio.ninja.run_all(), vm, trio, "reads", trio.view)


def test_a_later_file_with_bad_permissions_is_refused(trio, vm, scratch):
    rsync_trio(trio, vm, scratch)
    later = trio.ninja.action("95-x.sh", "true\n")
    os.chmod(later, 0o644)
    assert_refused(trio.ninja.run_all(), vm, trio, "95-x.sh would end backupninja")


def test_a_thaw_whose_when_does_not_match_now_is_refused(trio, vm, scratch):
    for _ in range(3):  # again if the hour turns during the run
        hour = time.strftime("%H")
        other = f"{(int(hour) + 6) % 24:02d}"
        freeze = freeze_text(trio.view, vm.name).replace("01:00", f"{hour}:00")
        trio.ninja.action("10-vms.kvm", freeze)
        dest = os.path.join(scratch, "rsync-dest")
        os.makedirs(os.path.join(dest, "host"), exist_ok=True)
        ship = rsync_text(trio.view, dest).replace("01:00", f"{hour}:00")
        trio.ninja.action("20-vms.rsync", ship)
        trio.ninja.action("90-vms.kvm", thaw_text(trio.view).replace("01:00", f"{other}:00"))
        result = trio.ninja.run_all(now=False)
        if time.strftime("%H") == hour:
            break
    assert_refused(result, vm, trio, "is a thaw that runs now")
