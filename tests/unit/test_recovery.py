"""The recovery decision table: one disk's journal entry and observed state
in, the steps out. The same scenarios run for real in
tests/integration/test_faults.py."""

from __future__ import annotations

import pytest

from backupninja_kvm.journal import DiskEntry
from backupninja_kvm.recovery import (
    COMMIT,
    COMMIT_OFFLINE,
    DELETE,
    PIVOT,
    REFUSE,
    WAIT_PULL,
    DiskState,
    decide,
)

BASE = "/srv/vm/web1.qcow2"
OVERLAY = "/srv/vm/web1.bnkvm-20261127T010000.qcow2"
ENTRY = DiskEntry("vda", BASE, "qcow2", OVERLAY)
TEMPLATE = "/srv/templates/debian.qcow2"
# web1.qcow2 is a layer on a template shared with other VMs.
ON_TEMPLATE = DiskEntry("vda", BASE, "qcow2", OVERLAY, base_backing=TEMPLATE)


def state(**changes) -> DiskState:
    """A running domain back on its base, overlay gone: the clean state."""
    values = dict(
        target="vda",
        active=True,
        live_top=BASE,
        live_backing=None,
        job=None,
        persistent_top=BASE,
        overlay_exists=False,
        overlay_backing=None,
    )
    values.update(changes)
    return DiskState(**values)


ON_OVERLAY = dict(live_top=OVERLAY, live_backing=BASE, persistent_top=OVERLAY, overlay_exists=True)


@pytest.mark.parametrize(
    ("situation", "entry", "observed", "merge", "steps"),
    [
        # The base of a disk on a template: only the journal's overlay is
        # merged, only into the journal's base, never into the template.
        (
            "on a template: running on our overlay",
            ON_TEMPLATE,
            state(**ON_OVERLAY),
            "pull",
            [COMMIT, DELETE],
        ),
        (
            "on a template: pull finished, the overlay is the disk on the template",
            ON_TEMPLATE,
            state(
                live_top=OVERLAY, live_backing=TEMPLATE, persistent_top=OVERLAY, overlay_exists=True
            ),
            "pull",
            [],
        ),
        (
            "on a template: pull finished, then shut off",
            ON_TEMPLATE,
            state(
                active=False,
                live_top=None,
                persistent_top=OVERLAY,
                overlay_exists=True,
                overlay_backing=TEMPLATE,
            ),
            "pull",
            [],
        ),
        (
            "on a template: our overlay directly on the template in commit mode",
            ON_TEMPLATE,
            state(
                live_top=OVERLAY, live_backing=TEMPLATE, persistent_top=OVERLAY, overlay_exists=True
            ),
            "commit",
            [REFUSE],
        ),
        (
            "on a template: shut off, our overlay directly on the template",
            ON_TEMPLATE,
            state(
                active=False,
                live_top=None,
                persistent_top=OVERLAY,
                overlay_exists=True,
                overlay_backing=TEMPLATE,
            ),
            "commit",
            [REFUSE],
        ),
        (
            "a commit job of our overlay into another layer than the base",
            ON_TEMPLATE,
            state(
                live_top=OVERLAY,
                live_backing=TEMPLATE,
                persistent_top=OVERLAY,
                overlay_exists=True,
                job="active-commit",
            ),
            "commit",
            [REFUSE],
        ),
        (
            "pull finished onto another backing file than the base had",
            ENTRY,
            state(
                live_top=OVERLAY, live_backing=TEMPLATE, persistent_top=OVERLAY, overlay_exists=True
            ),
            "pull",
            [REFUSE],
        ),
        ("clean: nothing to do", ENTRY, state(), "commit", []),
        ("killed before the freeze", ENTRY, state(), "commit", []),
        ("running on our overlay", ENTRY, state(**ON_OVERLAY), "commit", [COMMIT, DELETE]),
        ("running on our overlay, pull mode", ENTRY, state(**ON_OVERLAY), "pull", [COMMIT, DELETE]),
        (
            "commit job running or ready",
            ENTRY,
            state(**ON_OVERLAY, job="active-commit"),
            "commit",
            [PIVOT, DELETE],
        ),
        ("pull job running", ENTRY, state(**ON_OVERLAY, job="pull"), "pull", [WAIT_PULL]),
        (
            "pull finished: the overlay is the disk",
            ENTRY,
            state(live_top=OVERLAY, live_backing=None, persistent_top=OVERLAY, overlay_exists=True),
            "pull",
            [],
        ),
        ("pivoted, overlay not deleted", ENTRY, state(overlay_exists=True), "commit", [DELETE]),
        (
            "shut off on the overlay",
            ENTRY,
            state(
                active=False,
                live_top=None,
                persistent_top=OVERLAY,
                overlay_exists=True,
                overlay_backing=BASE,
            ),
            "commit",
            [COMMIT_OFFLINE, DELETE],
        ),
        (
            "shut off, back on base, overlay left",
            ENTRY,
            state(active=False, live_top=None, overlay_exists=True),
            "commit",
            [DELETE],
        ),
        (
            "foreign layer on top of our overlay",
            ENTRY,
            state(
                live_top="/srv/vm/web1.their-snap.qcow2",
                live_backing=OVERLAY,
                persistent_top="/srv/vm/web1.their-snap.qcow2",
                overlay_exists=True,
            ),
            "commit",
            [REFUSE],
        ),
        (
            "our overlay on top of something else than the journal's base",
            ENTRY,
            state(**{**ON_OVERLAY, "live_backing": "/srv/vm/other.qcow2"}),
            "commit",
            [REFUSE],
        ),
        (
            "a block job that is not ours",
            ENTRY,
            state(live_top=BASE, job="copy", overlay_exists=True),
            "commit",
            [REFUSE],
        ),
        (
            "definition uses the overlay but the file is gone",
            ENTRY,
            state(active=False, live_top=None, persistent_top=OVERLAY, overlay_exists=False),
            "commit",
            [REFUSE],
        ),
    ],
)
def test_decide(situation, entry, observed, merge, steps):
    assert [step.kind for step in decide(entry, observed, merge)] == steps, situation


def test_refusals_say_what_was_found():
    foreign = "/srv/vm/web1.their-snap.qcow2"
    (step,) = decide(
        ENTRY, state(live_top=foreign, live_backing=OVERLAY, overlay_exists=True), "commit"
    )
    assert step.kind == REFUSE and foreign in step.detail


def test_recovery_is_idempotent_on_the_state_it_leaves():
    # After COMMIT + DELETE the disk is clean, and a second pass does nothing.
    assert decide(ENTRY, state(), "commit") == []


class _Named:
    name = "web1"


def test_a_permission_denied_merge_points_at_apparmor_and_says_what_to_run():
    from backupninja_kvm.merge import left_on_overlay

    error = left_on_overlay(_Named(), "vda", OVERLAY, "commit refused: Permission denied")
    text = str(error)
    assert "AppArmor" in text and "backupninja-kvm recover web1" in text and OVERLAY in text
    assert "AppArmor" not in str(left_on_overlay(_Named(), "vda", OVERLAY, "timeout"))
