"""Fixtures of the unit layer."""

from __future__ import annotations

import signal

import pytest

from backupninja_kvm import interrupts


@pytest.fixture
def interrupt_handlers():
    """The helper's signal handlers installed, and this process's put back afterwards."""
    saved = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.reset()
    interrupts.install()
    yield
    interrupts.reset()
    for signum, handler in saved.items():
        signal.signal(signum, handler)
