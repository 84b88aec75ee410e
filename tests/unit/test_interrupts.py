"""Signals stop the backup at once, except inside a critical section (the
merge), where they are deferred to its end."""

from __future__ import annotations

import os
import signal

import pytest

from backupninja_kvm import interrupts
from backupninja_kvm.interrupts import Interrupted

pytestmark = pytest.mark.usefixtures("interrupt_handlers")


def test_a_signal_outside_a_critical_section_interrupts_at_once():
    with pytest.raises(Interrupted) as raised:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not interrupted")
    assert raised.value.signame == "SIGTERM"


def test_a_signal_inside_a_critical_section_waits_for_its_end():
    steps = []
    with pytest.raises(Interrupted) as raised:
        with interrupts.critical():
            os.kill(os.getpid(), signal.SIGHUP)
            steps.append("merge finished")
        steps.append("after the section")
    assert steps == ["merge finished"]
    assert raised.value.signame == "SIGHUP"


def test_repeated_signals_are_ignored_while_the_merge_runs():
    with pytest.raises(Interrupted), interrupts.critical():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        with interrupts.critical():
            os.kill(os.getpid(), signal.SIGTERM)
        done = True
    assert done


def test_a_signal_deferred_past_a_failing_section_is_still_received():
    """A merge that fails after a signal raises its own error, not
    Interrupted: the caller must still see the signal and stop."""
    assert interrupts.received() is None
    with pytest.raises(ValueError), interrupts.critical():
        os.kill(os.getpid(), signal.SIGTERM)
        raise ValueError("the merge failed")
    assert interrupts.received() == "SIGTERM"
