"""Quiesce: the guest agent freezes the guest's filesystems around the
snapshot and thaws them, whatever happens; recovery thaws what a killed run
left frozen."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from backupninja_kvm import faults
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import GUEST_AGENT_CHANNEL, guest_agent_connected
from backupninja_kvm.errors import DomainError, HypervisorError
from backupninja_kvm.hypervisor import Domain
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import Plan
from backupninja_kvm.report import log


def quiesce_wanted(plan: Plan, settings: Settings) -> bool:
    """Whether to freeze the guest's filesystems for the snapshot; raises
    DomainError, before anything is done, when quiesce = yes cannot be met."""
    if settings.quiesce == "no" or not plan.active or not plan.disks:
        return False
    if plan.agent:
        return True
    if settings.quiesce == "yes":
        raise DomainError(
            f"{plan.name}: {settings.where('general', 'quiesce')} is yes, but the domain has "
            f"no guest agent channel ({GUEST_AGENT_CHANNEL}); nothing done, domain skipped"
        )
    log.info("%s: no guest agent channel: the snapshot will be crash-consistent", plan.name)
    return False


@contextmanager
def filesystems_frozen(
    domain: Domain, wanted: bool, settings: Settings, outcome: Outcome
) -> Iterator[None]:
    """Freeze the guest's filesystems around the body (the snapshot) when
    *wanted*; thaw them however the body ends.

    libvirt waits for the agent without limit by default: the freeze and the
    thaw get ``quiesce_timeout`` each. A freeze given up after that may still
    complete in the guest, so the agent is asked to thaw until it answers
    before the snapshot is taken (crash-consistent then).
    """
    if not wanted:
        yield
        return
    timeout = settings.quiesce_timeout
    try:
        domain.set_agent_timeout(timeout)
        try:
            outcome.quiesced = domain.fs_freeze()
        except HypervisorError as error:
            reason = error.reason
            if _agent_connected(domain):  # it may finish the freeze later
                reason += f"; quiesce_timeout {timeout} s"
                _thaw_a_late_freeze(domain, timeout, outcome)
            if settings.quiesce == "yes":
                raise DomainError(
                    "; ".join(
                        [
                            f"{domain.name}: could not freeze the guest's filesystems "
                            f"({reason}); quiesce = yes: nothing done, domain skipped",
                            *outcome.problems,
                        ]
                    )
                ) from None
            log.warning(
                "%s: could not freeze the guest's filesystems (%s); the snapshot is "
                "crash-consistent",
                domain.name,
                reason,
            )
            yield
            return
        try:
            faults.checkpoint("after-fsfreeze")
            yield
        finally:
            _thaw(domain, outcome)
    finally:
        try:
            domain.set_agent_timeout(None)
        except HypervisorError as error:
            log.debug("%s: could not reset the guest agent timeout: %s", domain.name, error)


def _agent_connected(domain: Domain) -> bool:
    try:
        return guest_agent_connected(domain.xml())
    except HypervisorError:
        return True  # cannot tell: ask for the thaw anyway


def _thaw_a_late_freeze(domain: Domain, timeout: int, outcome: Outcome) -> None:
    """The freeze failed with an agent connected: if it timed out, the agent
    may still finish it. Ask for a thaw until the agent answers (at once
    when it is idle; at most max(timeout, 60) s)."""
    deadline = time.monotonic() + max(timeout, 60)
    while True:
        try:
            thawed = domain.fs_thaw()
        except HypervisorError:
            if time.monotonic() < deadline:
                time.sleep(1)
                continue
            outcome.problems.append(
                f"{domain.name}: the guest agent finished neither the freeze nor a thaw in "
                f"time; if the guest's writes hang, run `virsh domfsthaw {domain.name}`"
            )
            return
        if thawed:
            log.warning(
                "%s: the guest agent finished the freeze late; thawed %d filesystem(s)",
                domain.name,
                thawed,
            )
        return


def _thaw(domain: Domain, outcome: Outcome) -> None:
    failure: HypervisorError | None = None
    for attempt in range(3):
        try:
            domain.fs_thaw()
            return
        except HypervisorError as error:
            failure = error
            time.sleep(0.5 * (attempt + 1))
    outcome.problems.append(
        f"{domain.name}: the guest's filesystems could not be thawed after the snapshot "
        f"({failure.reason if failure else 'no answer'}); the guest's writes may be blocked: "
        f"run `virsh domfsthaw {domain.name}`"
    )


THAW_TIMEOUT = 60  # seconds for the guest agent to answer a thaw during recovery


def thaw_left_frozen(domain: Domain) -> list[str]:
    """A run killed between freezing the guest's filesystems and thawing
    them leaves the guest's writes blocked: thaw first (harmless when
    nothing is frozen)."""
    try:
        domain.set_agent_timeout(THAW_TIMEOUT)  # libvirt's default waits without limit
        try:
            thawed = domain.fs_thaw()
        finally:
            domain.set_agent_timeout(None)
    except HypervisorError as error:
        log.warning(
            "%s: could not thaw the guest's filesystems (%s); if its writes hang, run "
            "`virsh domfsthaw %s`",
            domain.name,
            error.reason,
            domain.name,
        )
        return []
    return [f"thawed {thawed} guest filesystem(s) left frozen"] if thawed else []
