"""End to end: the Debian package, built from a clean clone, checked by
lintian, installed with dpkg, and run by the real backupninja through the
handler it installs and its /usr/bin/backupninja-kvm on Debian's Python.

The package is purged again afterwards, and a handler that `make install`
had put in /usr/share/backupninja is put back, so the other tests (which use
this checkout's handler and venv, tests/support/ninja.py) are not affected.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest

from backupninja_kvm import destination
from tests.support.ninja import ROOT, SHIPPED, Ninja
from tests.support.vms import DiskSpec, MiB, Write

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]

PACKAGE = "backupninja-kvm"
INSTALLED_FILES = [os.path.join(SHIPPED, "kvm"), os.path.join(SHIPPED, "kvm.helper")]


def run(argv: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **options)


def is_installed() -> bool:
    status = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE])
    return status.returncode == 0 and "install ok installed" in status.stdout


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """The .deb built by `make deb` in a fresh clone of this checkout's HEAD."""
    clone = str(tmp_path_factory.mktemp("deb") / "clone")
    subprocess.run(["git", "clone", "--quiet", ROOT, clone], check=True)
    built = run(["make", "-C", clone, "deb"])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = glob.glob(os.path.join(clone, "dist", f"{PACKAGE}_*_amd64.deb"))
    return path


@pytest.fixture
def installed(deb):
    if is_installed():
        pytest.skip(f"{PACKAGE} is installed on this host: not replaced by a test")
    kept = {p: Path(p).read_bytes() for p in INSTALLED_FILES if os.path.isfile(p)}
    result = run(["dpkg", "-i", deb])
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield deb
    finally:
        purged = run(["dpkg", "--purge", PACKAGE])
        for path, data in kept.items():  # what `make install` had put there
            with open(path, "wb") as handle:
                handle.write(data)
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert not is_installed()


def test_lintian_finds_no_error_in_the_package(deb):
    result = run(["lintian", "--fail-on", "error", deb])

    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("E:")]


def test_the_package_has_the_helper_handler_examples_and_manual_pages(deb):
    listing = run(["dpkg-deb", "-c", deb]).stdout

    for path in (
        "./usr/bin/backupninja-kvm",
        "./usr/share/backupninja/kvm",
        "./usr/share/backupninja/kvm.helper",
        "./usr/share/doc/backupninja-kvm/example.kvm",
        "./usr/share/doc/backupninja-kvm/ride-along/20-vms.borg",
        "./usr/share/man/man1/backupninja-kvm.1.gz",
        "./usr/share/man/man5/backupninja-kvm.kvm.5.gz",
    ):
        assert f" {path}\n" in listing + "\n", path
    # the compiled BLAKE3 subtree sums, built from Debian's reference C sources
    assert re.search(r"/backupninja_kvm/_b3tree\.cpython-3\d+-[^ ]*\.so\n", listing), listing
    depends = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
    for package in ("python3-libvirt", "python3-configobj", "backupninja", "b3sum", "rsync"):
        assert package in depends


def test_the_installed_package_backs_up_a_running_vm_through_backupninja(
    installed, new_vm, scratch
):
    helper = "/usr/bin/backupninja-kvm"
    version = run([helper, "--version"])
    assert version.returncode == 0 and version.stdout.startswith(PACKAGE), version
    # Debian's python3, not a venv's
    assert Path(helper).read_text().splitlines()[0] == "#!/usr/bin/python3"
    trees = run(
        [
            "/usr/bin/python3",
            "-c",
            "from backupninja_kvm import b3tree as t; print(t.available(), t.__file__)",
        ]
    )
    assert trees.stdout.startswith("True /usr/lib/python3/dist-packages/"), trees
    vm = new_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)])
    vm.write("vda", Write(0x5A, 0, MiB))
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    ninja = Ninja(scratch, kvm_handlers=SHIPPED)
    assert os.path.realpath(os.path.join(ninja.scriptdir, "kvm")) == INSTALLED_FILES[0]
    action = ninja.action(
        "20-vms.kvm",
        f"when = everyday at 01:00\n\n[source]\ndomains = {vm.name}\n\n"
        f"[dest]\ndirectory = {backups}\nkeep = 2\n",
    )

    result = ninja.run(action, helper=helper)

    assert result.returncode == 0, result.output + result.log
    assert any("finished action" in line and "SUCCESS" in line for line in result.lines("Info"))
    assert result.lines("Error") == [] and result.lines("Fatal") == []
    assert any(f"{vm.name}: backed up vda, vdb" in line for line in result.lines("Info"))
    domain_dir = os.path.join(backups, vm.name)
    (stamp,) = destination.complete_sets(domain_dir)
    check = run(
        ["b3sum", "--check", "--quiet", destination.MANIFEST], cwd=os.path.join(domain_dir, stamp)
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert vm.tops() == vm.paths and vm.is_running() and vm.tagged_files() == []
