"""A signal that arrives while libvirt starts the rehearsal domain waits
until the domain is ours to destroy: the guest is never left running
until libvirt notices our connection closed (CI's stop 15 saw it)."""

from __future__ import annotations

import os
import signal

import pytest

from backupninja_kvm import hypervisor, rehearse
from backupninja_kvm.interrupts import Interrupted

from .test_setinfo import legacy_set


class FakeDomain:
    destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


class SignalledWhileStarting:
    """libvirt's createXML has started the guest when the signal comes."""

    started: FakeDomain | None = None

    def __init__(self, uri: str) -> None:
        pass

    def start_transient(self, xml: str) -> FakeDomain:
        self.__class__.started = FakeDomain()
        os.kill(os.getpid(), signal.SIGINT)
        return self.__class__.started

    def close(self) -> None:
        pass


def test_a_signal_during_the_start_still_destroys_the_domain(
    tmp_path, monkeypatch, interrupt_handlers
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(rehearse, "WORK_ROOT", str(work))
    monkeypatch.setattr(hypervisor, "Hypervisor", SignalledWhileStarting)
    set_folder = tmp_path / "set"
    set_folder.mkdir()

    with pytest.raises(Interrupted):
        rehearse.rehearse_set(legacy_set(set_folder), pattern="never shown", timeout=5)

    assert SignalledWhileStarting.started is not None
    assert SignalledWhileStarting.started.destroyed
    assert os.listdir(work) == []  # the overlays' folder went too
