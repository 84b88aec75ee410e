"""Space checks before a freeze: refuse rather than start a backup that
will fill a disk.

- Where the overlays go, the guest's writes of the whole backup window must
  fit: ``overlay_reserve`` MiB must be free on each filesystem holding
  overlays (a full overlay filesystem pauses the guest).
- At the destination, the set needs the allocated size of the images plus a
  margin (5 %, at least 64 MiB) for the definition, the manifest and
  filesystem overhead; older sets are only pruned after a successful backup.
  A block device counts its full size (an upper bound: its zero blocks
  become holes in the set, but finding them means reading the device).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from backupninja_kvm.report import human_bytes
from backupninja_kvm.transfer import device_size

MiB = 1024 * 1024
MARGIN_RATIO = 0.05
MARGIN_MINIMUM = 64 * MiB


@dataclass(frozen=True)
class SpaceNeed:
    """*needed* bytes must be free in *directory*, for *purpose*."""

    directory: str
    needed: int
    purpose: str


def allocated_bytes(path: str) -> int:
    """Bytes a file really occupies (holes not counted). A block device
    counts its whole size: which of its blocks are zeros (holes in its
    copy) is only known by reading all of it, as long as the copy itself."""
    status = os.stat(path)
    if stat.S_ISBLK(status.st_mode):
        return device_size(path)
    return status.st_blocks * 512


def destination_need(directory: str, image_paths: list[str]) -> SpaceNeed:
    allocated = sum(allocated_bytes(p) for p in image_paths)
    margin = max(int(allocated * MARGIN_RATIO), MARGIN_MINIMUM)
    return SpaceNeed(directory, allocated + margin, "the backup set")


def overlay_needs(overlay_paths: list[str], reserve_mib: int) -> list[SpaceNeed]:
    if reserve_mib <= 0:
        return []
    directories = sorted({os.path.dirname(p) for p in overlay_paths})
    return [SpaceNeed(d, reserve_mib * MiB, "the overlays (overlay_reserve)") for d in directories]


def free_bytes(directory: str) -> int:
    status = os.statvfs(directory)
    return status.f_bavail * status.f_frsize


def shortfalls(
    needs: list[SpaceNeed],
    free: Callable[[str], int] = free_bytes,
    device: Callable[[str], int] = lambda d: os.stat(d).st_dev,
) -> list[str]:
    """One message per filesystem that lacks room for what it must hold.

    Needs on the same filesystem add up.
    """
    by_device: dict[int, list[SpaceNeed]] = {}
    for need in needs:
        by_device.setdefault(device(need.directory), []).append(need)
    problems = []
    for group in by_device.values():
        total = sum(n.needed for n in group)
        available = free(group[0].directory)
        if available < total:
            purposes = " and ".join(f"{n.purpose} in {n.directory}" for n in group)
            problems.append(
                f"not enough free space for {purposes}: {human_bytes(total)} needed, "
                f"{human_bytes(available)} free"
            )
    return problems
