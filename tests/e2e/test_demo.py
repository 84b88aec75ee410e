"""make demo's script, run on this checkout: the README's first command keeps working."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tests.conftest import ROOT
from tests.support.cli import HELPER
from tests.support.vms import PREFIX

pytestmark = [pytest.mark.libvirt, pytest.mark.backupninja]


def test_the_demo_backs_up_its_vm_checks_the_set_and_removes_the_vm(connection, scratch):
    name = f"{PREFIX}demo-{uuid.uuid4().hex[:6]}"  # removed by the suite if left behind
    env = dict(
        os.environ,
        DEMO_NAME=name,
        DEMO_DIR=os.path.join(scratch, "demo"),
        DEMO_SCRIPTDIR=os.path.join(ROOT, "handlers"),
        BACKUPNINJA_KVM=HELPER,
    )

    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "demo")],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "== Demo passed" in result.stdout
    assert f"{name}/" in result.stdout and ": verified: " in result.stdout  # verify's Info
    assert f"finished action {env['DEMO_DIR']}/backup.d/50-vms.kvm: SUCCESS" in result.stdout
    assert name not in [d.name() for d in connection.listAllDomains()]
    assert not os.path.exists(f"/var/lib/libvirt/images/{name}")
