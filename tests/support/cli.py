"""Running this checkout's helper, ``backupninja-kvm``, as a separate process."""

from __future__ import annotations

import os
import subprocess
import sys

HELPER = os.path.join(os.path.dirname(sys.executable), "backupninja-kvm")


def helper(*args: str, fault: str | None = None, signal: str = "KILL"):
    """Run the helper with *args*; with *fault*, arm that fault point
    (BACKUPNINJA_KVM_FAULT), where it sends itself SIG*signal*."""
    env = dict(os.environ)
    if fault:
        env.update(BACKUPNINJA_KVM_FAULT=fault, BACKUPNINJA_KVM_FAULT_SIGNAL=signal)
    return subprocess.run(
        [HELPER, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
