"""Shared fixtures: the real system libvirtd, throwaway VMs, scratch folders, an sshd."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def connection():
    """A connection to the system libvirtd, started by scripts/setup-host if needed."""
    if os.geteuid() != 0:
        pytest.fail("the libvirt and backupninja layers run as root (make test)")
    subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "setup-host")], check=True, capture_output=True
    )
    import libvirt

    from tests.support import vms

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    vms.remove_leftover_vms()
    yield vms.connect()
    vms.remove_leftover_vms()


@pytest.fixture
def new_vm(connection):
    """Factory: new_vm([DiskSpec...], start=True) -> TestVM, removed afterwards."""
    from tests.support import vms

    made = []

    def factory(specs, start=True, transient=False, agent_channel=False):
        vm = vms.make_vm(specs, start=start, transient=transient, agent_channel=agent_channel)
        made.append(vm)
        return vm

    yield factory
    failures = []
    for vm in made:  # every VM, even when removing one of them fails
        try:
            vm.remove()
        except Exception as error:  # noqa: BLE001 - reported below, after the others
            failures.append(f"{vm.name}: {error!r}")
    assert not failures, failures


@pytest.fixture
def scratch():
    """A root-only scratch folder outside /tmp's pytest tree, removed afterwards."""
    path = tempfile.mkdtemp(prefix="bnkvm-test-", dir="/var/tmp")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(scratch):
    """A real sshd on 127.0.0.1 with its own keys, stopped afterwards."""
    from tests.support import sshd

    keys = os.path.join(scratch, "ssh")
    os.makedirs(keys, mode=0o700)
    running = sshd.start(keys)
    yield running
    running.stop()


def write_action(path: str, text: str) -> str:
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
    return path
