"""Fixtures of the end-to-end layer."""

from __future__ import annotations

import os

import pytest

from tests.support import sshd


@pytest.fixture
def server(scratch):
    """A real sshd on 127.0.0.1 with its own keys, stopped afterwards."""
    keys = os.path.join(scratch, "ssh")
    os.makedirs(keys, mode=0o700)
    running = sshd.start(keys)
    yield running
    running.stop()
