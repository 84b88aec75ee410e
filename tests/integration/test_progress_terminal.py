"""The progress board on a real pseudo-terminal, during a real backup."""

from __future__ import annotations

import os

import pexpect
import pytest

from tests.conftest import write_action
from tests.support.cli import HELPER
from tests.support.terminal import screen
from tests.support.vms import DiskSpec, MiB, Write

pytestmark = pytest.mark.libvirt


def test_log_lines_printed_during_the_copy_stay_above_the_board(new_vm, scratch):
    vm = new_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 256 * MiB)])
    vm.write("vda", Write(0x11, 0, MiB))
    vm.write("vdb", Write(0x21, 0, 128 * MiB))  # copied after vda is done
    backups = os.path.join(scratch, "backups")
    os.makedirs(backups)
    action = write_action(
        os.path.join(scratch, "vm.kvm"),
        f"[source]\ndomains = {vm.name}\n[dest]\ndirectory = {backups}\n",
    )
    child = pexpect.spawn(
        HELPER, ["run", action], dimensions=(60, 250), encoding="utf-8", timeout=300
    )
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert child.exitstatus == 0, output

    rows = screen(output.replace("\r\n", "\n"))
    # The Debug line each copy prints when it ends, while the board is drawn, is
    # on the screen whole, and each disk's board line is there once, complete.
    for target in ("vda", "vdb"):
        assert any(r.startswith(f"Debug: {vm.name}: {target}: copied ") for r in rows), rows
        board = [r for r in rows if r.startswith(f"{vm.name}: {target}: copy ")]
        assert len(board) == 1 and " 100% " in board[0], rows
    summary = [r for r in rows if r.startswith(f"Info: {vm.name}: backed up vda, vdb")]
    assert len(summary) == 1, rows
