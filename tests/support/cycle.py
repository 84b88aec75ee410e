"""Running the product's backup cycle on a test VM, in process."""

from __future__ import annotations

from backupninja_kvm.backup import Outcome, WindowHook, back_up_domain
from backupninja_kvm.config import Settings
from backupninja_kvm.hypervisor import Hypervisor
from tests.support.vms import URI


def back_up(
    vm, settings: Settings, window: WindowHook | None = None, stamp: str = "20261127T010000"
) -> Outcome:
    """Back up *vm* once on a connection of its own, as a run does."""
    hypervisor = Hypervisor(URI)
    try:
        return back_up_domain(hypervisor.domain(vm.name), settings, stamp, window)
    finally:
        hypervisor.close()
