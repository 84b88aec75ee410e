"""wait_until: polling, and waking at once on an event."""

from __future__ import annotations

import threading

from backupninja_kvm.hypervisor import wait_until


def test_a_condition_already_true_returns_at_once():
    assert wait_until(lambda: True, timeout=0)


def test_a_condition_never_true_gives_up_after_the_timeout():
    calls = []
    assert not wait_until(lambda: calls.append(1) or False, timeout=0.05)
    assert len(calls) >= 2


def test_an_event_wakes_the_wait_before_the_next_poll():
    # The poll interval is an hour: only the event can end the wait.
    ready = threading.Event()
    wake = threading.Event()
    calls = []

    def condition() -> bool:
        calls.append(1)
        if len(calls) == 1:
            ready.set()  # the "job" becomes ready during the first check
        return len(calls) > 1

    def event_thread() -> None:
        ready.wait()
        wake.set()

    helper = threading.Thread(target=event_thread, daemon=True)
    helper.start()
    result: list[bool] = []
    waiter = threading.Thread(
        target=lambda: result.append(wait_until(condition, 7200, first=3600, wake=wake)),
        daemon=True,
    )
    waiter.start()
    waiter.join(600)  # a hang, not a slow run, is what this bounds

    assert result == [True]
    assert len(calls) == 2
