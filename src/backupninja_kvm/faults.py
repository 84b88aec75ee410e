"""Fault injection points for the test suite.

``checkpoint(NAME)`` does nothing unless the environment variable
``BACKUPNINJA_KVM_FAULT`` equals NAME: then the process sends itself
``BACKUPNINJA_KVM_FAULT_SIGNAL`` (default KILL), as a crash or an operator's
kill would at that boundary of the cycle. The names, in the cycle's order:

after-journal, after-freeze, mid-copy, after-copy, before-merge (the
copy's cleanup begins), mid-merge, after-pivot, before-delete; on a night
of changed blocks, after-checkpoint (checkpoint started, not frozen yet),
mid-changes (the first changed chunk written), changes-sent (a remote set:
the changes sent, not committed into the clone yet) and
before-checkpoint-delete (the set complete, the older checkpoint not deleted
yet); and, with quiesce,
after-fsfreeze (guest filesystems frozen, snapshot not taken yet);
in view.build, mid-view (the first image mounted, the others not yet).
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "after-journal",
    "after-freeze",
    "mid-copy",
    "after-copy",
    "before-merge",
    "mid-merge",
    "after-pivot",
    "before-delete",
)
# Reached only on a night that makes a set from changed blocks (changed.py).
CHANGED_POINTS = ("after-checkpoint", "mid-changes", "before-checkpoint-delete")
REMOTE_CHANGED_POINTS = (*CHANGED_POINTS, "changes-sent")  # reached with dest = remote only
QUIESCE_POINTS = ("after-fsfreeze",)  # reached only when a guest agent answers
VIEW_POINTS = ("mid-view",)  # view.build, not yet used by a stage


def checkpoint(name: str) -> None:
    assert name in (*POINTS, *REMOTE_CHANGED_POINTS, *QUIESCE_POINTS, *VIEW_POINTS), name
    if os.environ.get("BACKUPNINJA_KVM_FAULT") == name:
        signame = os.environ.get("BACKUPNINJA_KVM_FAULT_SIGNAL", "KILL")
        os.kill(os.getpid(), getattr(signal, f"SIG{signame}"))
