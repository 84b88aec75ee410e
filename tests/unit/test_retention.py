"""Retention: which sets ``keep`` and the calendar rules keep, and why
(borg prune's semantics, periods in local time)."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from backupninja_kvm import destination, retention
from backupninja_kvm.destination import SetEntry
from backupninja_kvm.retention import Policy
from backupninja_kvm.transfer import Remote

BERLIN = ZoneInfo("Europe/Berlin")


def z(when: str) -> str:
    """The UTC set name of ``2026-03-27 00:30`` (UTC)."""
    moment = datetime.strptime(when, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    return moment.strftime(destination.STAMP_FORMAT)


def old(when: str) -> str:
    """The local-time name a version before 0.3 gave a set made at *when*."""
    return datetime.strptime(when, "%Y-%m-%d %H:%M").strftime("%Y%m%dT%H%M%S")


def nightly(first: str, nights: int) -> list[str]:
    start = datetime.strptime(first, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()
    return [
        z(time.strftime("%Y-%m-%d %H:%M", time.gmtime(start + n * 86400))) for n in range(nights)
    ]


def kept(
    stamps: list[str], policy: Policy, zone=UTC, without_images: tuple[str, ...] = ()
) -> dict[str, str]:
    """The sets *policy* keeps, with the reason; checks that the others go."""
    entries = [SetEntry(s, s not in without_images) for s in stamps]
    verdicts = retention.plan(entries, policy, zone=zone)
    assert [v.stamp for v in verdicts] == [e.stamp for e in destination.order_sets(entries)]
    return {v.stamp: v.reason for v in verdicts if v.reason is not None}


TEN_NIGHTS = nightly("2026-11-01 01:00", 10)

CASES = {
    "keep alone keeps the newest sets, as before": (
        TEN_NIGHTS,
        Policy(keep=3),
        UTC,
        (),
        {TEN_NIGHTS[9]: "keep 1", TEN_NIGHTS[8]: "keep 2", TEN_NIGHTS[7]: "keep 3"},
    ),
    "the sets keep holds do not count again for daily": (
        TEN_NIGHTS,
        Policy(keep=3, daily=3),
        UTC,
        (),
        {
            TEN_NIGHTS[9]: "keep 1",
            TEN_NIGHTS[8]: "keep 2",
            TEN_NIGHTS[7]: "keep 3",
            TEN_NIGHTS[6]: "daily 1",
            TEN_NIGHTS[5]: "daily 2",
            TEN_NIGHTS[4]: "daily 3",
        },
    ),
    "two sets in one day: the day's newest counts, the other goes": (
        [z(f"2026-05-0{d} {h}") for d in (1, 2, 3) for h in ("01:00", "13:00")],
        Policy(keep=1, daily=2),
        UTC,
        (),
        {
            z("2026-05-03 13:00"): "keep 1",  # its day is used up: 01:00 goes
            z("2026-05-02 13:00"): "daily 1",
            z("2026-05-01 13:00"): "daily 2",
        },
    ),
    "gaps of days do not count: daily reaches back over them": (
        [
            z("2026-01-01 01:00"),
            z("2026-01-02 01:00"),
            z("2026-01-20 01:00"),
            z("2026-03-05 01:00"),
        ],
        Policy(keep=1, daily=3),
        UTC,
        (),
        {
            z("2026-03-05 01:00"): "keep 1",
            z("2026-01-20 01:00"): "daily 1",
            z("2026-01-02 01:00"): "daily 2",
            z("2026-01-01 01:00"): "daily 3",
        },
    ),
    "months without a set are skipped": (
        [
            z("2026-01-10 01:00"),
            z("2026-02-10 01:00"),
            z("2026-06-10 01:00"),
            z("2026-06-11 01:00"),
        ],
        Policy(keep=1, monthly=2),
        UTC,
        (),
        {
            z("2026-06-11 01:00"): "keep 1",
            z("2026-02-10 01:00"): "monthly 1",
            z("2026-01-10 01:00"): "monthly 2",
        },
    ),
    "month ends: a month's last set, whatever its length": (
        [
            z("2026-01-15 01:00"),
            z("2026-01-31 01:00"),
            z("2026-02-14 01:00"),
            z("2026-02-28 01:00"),
            z("2026-03-31 01:00"),
            z("2026-04-01 01:00"),
        ],
        Policy(keep=1, monthly=3),
        UTC,
        (),
        {
            z("2026-04-01 01:00"): "keep 1",
            z("2026-03-31 01:00"): "monthly 1",
            z("2026-02-28 01:00"): "monthly 2",
            z("2026-01-31 01:00"): "monthly 3",
        },
    ),
    "a month's last UTC evening is the next month in Berlin": (
        [
            z("2026-01-20 12:00"),
            z("2026-01-31 23:30"),
            z("2026-02-27 12:00"),
            z("2026-03-15 12:00"),
        ],
        Policy(keep=1, monthly=2),
        BERLIN,
        (),
        {
            z("2026-03-15 12:00"): "keep 1",
            z("2026-02-27 12:00"): "monthly 1",  # February's newest; 01-31 23:30Z is Feb 1
            z("2026-01-20 12:00"): "monthly 2",
        },
    ),
    "the same sets counted in UTC: January ends on the 31st": (
        [
            z("2026-01-20 12:00"),
            z("2026-01-31 23:30"),
            z("2026-02-27 12:00"),
            z("2026-03-15 12:00"),
        ],
        Policy(keep=1, monthly=2),
        UTC,
        (),
        {
            z("2026-03-15 12:00"): "keep 1",
            z("2026-02-27 12:00"): "monthly 1",
            z("2026-01-31 23:30"): "monthly 2",
        },
    ),
    "a leap day is a day of its own and February's last": (
        nightly("2028-02-27 01:00", 5),  # 27, 28, 29 February, 1, 2 March
        Policy(keep=1, daily=2, monthly=2),
        UTC,
        (),
        {
            z("2028-03-02 01:00"): "keep 1",
            z("2028-03-01 01:00"): "daily 1",
            z("2028-02-29 01:00"): "daily 2",  # February's newest: monthly skips it
            z("2028-02-27 01:00"): "monthly 1, oldest",  # borg's [oldest]
        },
    ),
    "an ISO week spans the new year": (
        [
            z("2026-12-21 01:00"),  # Monday of week 52
            z("2026-12-30 01:00"),  # week 53 of 2026 ...
            z("2026-12-31 01:00"),
            z("2027-01-01 01:00"),  # ... until Sunday 3 January
            z("2027-01-04 01:00"),  # week 1 of 2027
        ],
        Policy(keep=1, weekly=2),
        UTC,
        (),
        {
            z("2027-01-04 01:00"): "keep 1",
            z("2027-01-01 01:00"): "weekly 1",
            z("2026-12-21 01:00"): "weekly 2",
        },
    ),
    "yearly keeps each year's last set, in local time": (
        [
            z("2024-06-01 01:00"),
            z("2024-12-31 23:00"),
            z("2025-03-01 01:00"),
            z("2026-01-01 00:30"),
        ],
        Policy(keep=1, yearly=2),
        BERLIN,
        (),
        {
            z("2026-01-01 00:30"): "keep 1",
            z("2025-03-01 01:00"): "yearly 1",  # 2024-12-31 23:00Z is 2025 in Berlin
            z("2024-06-01 01:00"): "yearly 2",
        },
    ),
    "a young destination keeps its oldest set for yearly": (
        nightly("2026-11-01 01:00", 5),
        Policy(keep=2, yearly=3),
        UTC,
        (),
        {
            z("2026-11-05 01:00"): "keep 1",
            z("2026-11-04 01:00"): "keep 2",
            z("2026-11-01 01:00"): "yearly 1, oldest",
        },
    ),
    "DST starts: a nightly 01:30 run has its own day in local time": (
        [
            z("2026-03-27 00:30"),
            z("2026-03-28 00:30"),
            z("2026-03-29 00:30"),
            z("2026-03-29 23:30"),
        ],
        Policy(keep=1, daily=3),
        BERLIN,
        (),
        {
            z("2026-03-29 23:30"): "keep 1",  # Monday 01:30 CEST
            z("2026-03-29 00:30"): "daily 1",  # Sunday 01:30 CET
            z("2026-03-28 00:30"): "daily 2",
            z("2026-03-27 00:30"): "daily 3",
        },
    ),
    "DST starts: counted in UTC, two of those runs share a day": (
        [
            z("2026-03-27 00:30"),
            z("2026-03-28 00:30"),
            z("2026-03-29 00:30"),
            z("2026-03-29 23:30"),
        ],
        Policy(keep=1, daily=3),
        UTC,
        (),
        {
            z("2026-03-29 23:30"): "keep 1",
            z("2026-03-28 00:30"): "daily 1",
            z("2026-03-27 00:30"): "daily 2",
        },
    ),
    "DST ends: the repeated hour changes nothing": (
        [
            z("2026-10-23 23:30"),
            z("2026-10-24 23:30"),
            z("2026-10-26 00:30"),
            z("2026-10-27 00:30"),
        ],
        Policy(keep=1, daily=2),
        BERLIN,
        (),
        {
            z("2026-10-27 00:30"): "keep 1",
            z("2026-10-26 00:30"): "daily 1",  # Monday 01:30 CET
            z("2026-10-24 23:30"): "daily 2",  # Sunday 01:30 CEST
        },
    ),
    "old local-time names are local days, older than every UTC name": (
        [
            old("2026-03-08 01:30"),
            old("2026-03-09 01:30"),
            old("2026-03-10 01:30"),
            z("2026-03-10 00:30"),  # 01:30 in Berlin, the same day: upgraded and run again
        ],
        Policy(keep=1, daily=2),
        BERLIN,
        (),
        {
            z("2026-03-10 00:30"): "keep 1",
            old("2026-03-09 01:30"): "daily 1",
            old("2026-03-08 01:30"): "daily 2",
        },
    ),
    "sets without images never count, and go only below every kept set": (
        nightly("2026-04-01 01:00", 6),
        Policy(keep=1, daily=1),
        UTC,
        (z("2026-04-03 01:00"), z("2026-04-05 01:00")),
        {
            z("2026-04-06 01:00"): "keep 1",
            z("2026-04-05 01:00"): "no images",
            z("2026-04-04 01:00"): "daily 1",
        },
    ),
    "a set without images stays when no set with images goes": (
        nightly("2026-04-01 01:00", 3),
        Policy(keep=2),
        UTC,
        (z("2026-04-01 01:00"),),
        {
            z("2026-04-03 01:00"): "keep 1",
            z("2026-04-02 01:00"): "keep 2",
            z("2026-04-01 01:00"): "no images",
        },
    ),
    "only sets without images: nothing goes": (
        nightly("2026-04-01 01:00", 3),
        Policy(keep=1, daily=1),
        UTC,
        tuple(nightly("2026-04-01 01:00", 3)),
        dict.fromkeys(nightly("2026-04-01 01:00", 3), "no images"),
    ),
}


@pytest.mark.parametrize(
    ("stamps", "policy", "zone", "without_images", "expected"), CASES.values(), ids=CASES.keys()
)
def test_retention_keeps_each_rule_s_sets_and_nothing_else(
    stamps, policy, zone, without_images, expected
):
    assert kept(stamps, policy, zone, without_images) == expected


def test_the_newest_set_with_images_is_always_kept():
    for stamps, policy, zone, without_images, _ in CASES.values():
        ordered = destination.order_sets(SetEntry(s) for s in stamps)
        with_images = [e.stamp for e in ordered if e.stamp not in without_images]
        if with_images:
            assert with_images[-1] in kept(stamps, policy, zone, without_images)


def test_the_set_just_made_is_never_removed():
    entries = [SetEntry(s) for s in TEN_NIGHTS]
    verdicts = retention.plan(entries, Policy(keep=1), current=TEN_NIGHTS[0])

    assert verdicts[0] == retention.Verdict(TEN_NIGHTS[0], "just made")
    assert retention.removed(verdicts) == TEN_NIGHTS[1:9]


@pytest.mark.parametrize(("tz", "removed"), [("Europe/Berlin", []), ("UTC", ["20260329T003000Z"])])
def test_periods_are_counted_in_the_time_zone_of_the_run(monkeypatch, tz, removed):
    stamps = [z("2026-03-27 00:30"), z("2026-03-28 00:30"), z("2026-03-29 00:30")]
    stamps.append(z("2026-03-29 23:30"))
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        verdicts = retention.plan([SetEntry(s) for s in stamps], Policy(keep=1, daily=3))
    finally:
        monkeypatch.undo()
        time.tzset()

    assert retention.removed(verdicts) == removed


def test_an_old_local_time_name_is_read_as_the_local_time_it_was():
    assert retention.local_time("20261127T013000", BERLIN) == datetime(2026, 11, 27, 1, 30)
    assert retention.local_time("20260701T003000Z", BERLIN) == datetime(
        2026, 7, 1, 2, 30, tzinfo=BERLIN
    )


def test_a_policy_says_itself_as_the_action_file_does():
    assert Policy(7).describe() == "keep = 7"
    assert (
        Policy(7, daily=14, monthly=6).describe() == "keep = 7, keep_daily = 14, keep_monthly = 6"
    )


@pytest.mark.parametrize("policy", [{"keep": 0}, {"keep": 1, "weekly": -1}])
def test_a_policy_that_could_remove_the_newest_set_is_refused(policy):
    with pytest.raises(ValueError):
        Policy(**policy)


def test_the_explanation_lists_what_stays_newest_first():
    stamps = nightly("2026-11-01 01:00", 3)
    verdicts = retention.plan([SetEntry(s) for s in stamps], Policy(keep=1, daily=1), zone=UTC)

    assert retention.removed(verdicts) == [stamps[0]]
    assert retention.explain(verdicts) == f"{stamps[2]} (keep 1), {stamps[1]} (daily 1)"


def test_prune_at_a_destination_follows_the_plan(tmp_path):
    domain_dir = tmp_path / "web1"
    for stamp in TEN_NIGHTS:
        (domain_dir / stamp).mkdir(parents=True)
        (domain_dir / stamp / destination.MANIFEST).write_text(f"{'0' * 64}  vda-web1.qcow2\n")

    removed = destination.prune(str(domain_dir), Policy(keep=2, daily=2), TEN_NIGHTS[-1])

    assert removed == TEN_NIGHTS[:6]
    assert destination.complete_sets(str(domain_dir)) == TEN_NIGHTS[6:]


class ShellHere(Remote):
    """A remote host that is this one: the destination's shell snippets run here."""

    def run(self, script: str, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            ["/bin/sh", "-c", script, "sh", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def test_a_remote_destination_prunes_by_the_same_plan(tmp_path):
    domain_dir = tmp_path / "web1"
    for stamp in TEN_NIGHTS:
        (domain_dir / stamp).mkdir(parents=True)
        (domain_dir / stamp / destination.MANIFEST).write_text(f"{'0' * 64}  vda-web1.qcow2\n")
    remote_set = destination.RemoteBackupSet(str(domain_dir), TEN_NIGHTS[-1], ShellHere("here"))

    assert remote_set.prune(Policy(keep=2, daily=2)) == TEN_NIGHTS[:6]
    assert destination.complete_sets(str(domain_dir)) == TEN_NIGHTS[6:]
