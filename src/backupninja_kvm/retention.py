"""Which sets a domain keeps: ``keep`` (the newest N) and the calendar rules
``keep_daily``, ``keep_weekly``, ``keep_monthly``, ``keep_yearly``.

A pure function of the list of sets and the policy (``plan``); the
destination removes what it says, locally or over ssh, and ``run --test``
prints it.

The rules are borg's (``borg prune --keep-last/--keep-daily/...``, the
``prune_split`` of borg 1.2 and later), so that what an administrator knows
from borg or Proxmox holds here:

- The rules are applied in order: ``keep``, then daily, weekly, monthly,
  yearly. Each walks the sets with images from the newest to the oldest and
  keeps the newest set of each period (day, ISO week, month, year) until it
  has kept its count. Periods without a set are skipped and do not count: a
  gap of a week leaves ``keep_daily = 7`` reaching further back.
- A set already kept by an earlier rule is not counted again, and its period
  is used up: with ``keep = 1`` and ``keep_daily = 1``, the daily set is the
  newest of the day before the newest set's day, not the newest set again.
- A rule that runs out of periods before its count also keeps the oldest set
  (borg's ``[oldest]``), so that a young destination keeps its first set as
  the start of its monthly or yearly history.

Periods are in local time (the ``TZ`` of the run, as borg does): a nightly
run at 01:00 local time falls on its own day before and after a DST change,
where in UTC it would move between 00:00 and 23:00 of the day before and
leave two sets on one UTC day and none on the next. A set's UTC name is
converted; the local-time names of versions before 0.3 already are local
time and are taken as they are.

Sets without disk images (only ``domain.xml``) never count toward any rule
and never make a set with images go; they go only on a run that removes a
set with images, when they are older than every kept set with images (as
before the calendar rules). The set just made is never removed, and since
``keep`` is at least 1, neither is the newest set with images.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING

# destination imports this module to prune: its names are looked up when used.
from backupninja_kvm import destination

if TYPE_CHECKING:
    from backupninja_kvm.destination import SetEntry

# The calendar rules, in borg's order, each with its period of a local time.
PERIODS: tuple[tuple[str, Callable[[datetime], Hashable]], ...] = (
    ("daily", lambda moment: moment.date()),
    ("weekly", lambda moment: moment.isocalendar()[:2]),  # ISO year and week, as %G-%V
    ("monthly", lambda moment: (moment.year, moment.month)),
    ("yearly", lambda moment: moment.year),
)


@dataclass(frozen=True)
class Policy:
    """How many sets with images to keep: the newest *keep*, plus the newest
    set of each of the last *daily* days, *weekly* weeks, *monthly* months
    and *yearly* years that have one. Raises ValueError when *keep* < 1 or a
    count is negative."""

    keep: int
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep = {self.keep}: at least 1, the newest set, is kept")
        for rule, _ in PERIODS:
            if getattr(self, rule) < 0:
                raise ValueError(f"keep_{rule} = {getattr(self, rule)}: cannot be negative")

    def describe(self) -> str:
        """The policy as the action file spells it: ``keep = 7, keep_daily = 14``."""
        parts = [f"keep = {self.keep}"]
        parts += [
            f"keep_{rule} = {getattr(self, rule)}" for rule, _ in PERIODS if getattr(self, rule)
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class Verdict:
    """One set and why it stays (``daily 2``: the second set the daily rule
    keeps), or ``reason`` None: no rule keeps it and it goes."""

    stamp: str
    reason: str | None

    @property
    def removed(self) -> bool:
        return self.reason is None


def local_time(stamp: str, zone: tzinfo | None = None) -> datetime:
    """The local time of the set *stamp*, in *zone* (None: the run's ``TZ``).
    An old name without ``Z`` is local time already: returned as it is
    (naive)."""
    if not stamp.endswith("Z"):
        return datetime(*time.strptime(stamp, destination.STAMP_FORMAT.removesuffix("Z"))[:6])
    seconds = calendar.timegm(time.strptime(stamp, destination.STAMP_FORMAT))
    return datetime.fromtimestamp(seconds, UTC).astimezone(zone)


def plan(
    entries: Iterable[SetEntry], policy: Policy, current: str = "", zone: tzinfo | None = None
) -> list[Verdict]:
    """A verdict for each set of *entries*, oldest first (creation order),
    under *policy* (see the module's docstring). *current* is the set just
    made, never removed; *zone* is where the periods are counted (None: the
    local time of the run)."""
    ordered = sorted(entries, key=lambda e: destination.creation_key(e.stamp))
    newest_first = [e.stamp for e in reversed(ordered) if e.has_images]
    kept: dict[str, str] = {}
    for count, stamp in enumerate(newest_first[: policy.keep], start=1):
        kept[stamp] = f"keep {count}"
    moments = {stamp: local_time(stamp, zone) for stamp in newest_first}
    for rule, period_of in PERIODS:
        wanted = getattr(policy, rule)
        if not wanted:
            continue
        counted = 0
        last_period: Hashable = None
        stamp = ""
        for stamp in newest_first:
            period = period_of(moments[stamp])
            if period == last_period:
                continue
            last_period = period
            if stamp not in kept:
                counted += 1
                kept[stamp] = f"{rule} {counted}"
                if counted == wanted:
                    break
        if stamp and counted < wanted and stamp not in kept:
            kept[stamp] = f"{rule} {counted + 1}, oldest"  # borg's [oldest]
    # Sets without images go only on a run that removes a set with images,
    # and only when older than every kept set with images.
    sweep_before = None
    if len(kept) < len(newest_first):
        sweep_before = min(destination.creation_key(stamp) for stamp in kept)
    verdicts = []
    for entry in ordered:
        reason = kept.get(entry.stamp)
        swept = sweep_before is not None and destination.creation_key(entry.stamp) < sweep_before
        if reason is None and not entry.has_images and not swept:
            reason = "no images"
        if reason is None and entry.stamp == current:
            reason = "just made"
        verdicts.append(Verdict(entry.stamp, reason))
    return verdicts


def removed(verdicts: Iterable[Verdict]) -> list[str]:
    """The names the verdicts remove, oldest first."""
    return [v.stamp for v in verdicts if v.removed]


def explain(verdicts: Iterable[Verdict]) -> str:
    """What stays and why, newest first: ``20261102T010000Z (keep 1),
    20261101T010000Z (daily 1)``."""
    return ", ".join(f"{v.stamp} ({v.reason})" for v in reversed(list(verdicts)) if not v.removed)
