"""Pure logic of the ride-along stages: their keys, the ride record, process
identity, the handler's variables, the ranking of exit statuses."""

from __future__ import annotations

import os
import subprocess

import pytest

from backupninja_kvm import config, journal, ride, stages
from tests.unit.test_config import problems_of, write


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), (" 2 h ", 7200)],
)
def test_max_frozen_reads_seconds_minutes_and_hours(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "12 hours", "1.5h", "-3m", "h"])
def test_a_malformed_max_frozen_is_none(text):
    assert config.parse_duration(text) is None


def test_a_freeze_gets_the_view_and_max_frozen_defaults(tmp_path):
    settings = config.load(write(tmp_path, "[general]\nstage = freeze\n"))
    assert settings.stage == "freeze"
    assert settings.view == "/var/lib/backupninja-kvm/view"
    assert settings.max_frozen == 12 * 3600


def test_a_thaw_needs_no_domains_and_no_destination(tmp_path):
    path = write(
        tmp_path,
        "[general]\nstage = thaw\nmerge = pull\n[dest]\ndirectory = /nonexistent\n",
        domains=None,
    )
    settings = config.load(path)
    assert (settings.stage, settings.merge, settings.domains) == ("thaw", "pull", ())


def test_a_thaw_with_domains_is_refused_naming_the_key(tmp_path):
    path = write(tmp_path, "[general]\nstage = thaw\n")
    assert problems_of(path) == [
        f"{path} line 4: [source] domains: stage = thaw has no domains: it thaws what the "
        "freeze with the same view froze; remove the key"
    ]


def test_bad_view_and_max_frozen_are_refused_with_their_lines(tmp_path):
    path = write(tmp_path, "[general]\nstage = freeze\nview = relative/view\nmax_frozen = 2 days\n")
    assert problems_of(path) == [
        f"{path} line 3: [general] view: 'relative/view' is not an absolute path",
        f"{path} line 4: [general] max_frozen: '2 days' is not a duration (a number with s, "
        "m or h, such as 12h)",
    ]


def test_a_view_under_tmp_is_refused(tmp_path):
    path = write(tmp_path, "[general]\nstage = freeze\nview = /tmp/view\n")
    assert "cannot hold the view" in problems_of(path)[0]


def test_the_ride_record_round_trips(state_dir):
    owner = ride.Process.of(os.getpid())
    assert owner is not None
    record = ride.Ride(
        view="/srv/view",
        action="/etc/backup.d/10-vms.kvm",
        thaw_action="/etc/backup.d/90-vms.kvm",
        uri="qemu:///system",
        owner=owner,
        deadline=1e9,
        merge="pull",
        merge_timeout=60,
        bandwidth=5,
        domains=(
            ride.Exposed(
                "web1",
                "u-1",
                True,
                (ride.ExposedFile("vda-web1.qcow2", "/img/web1.qcow2", (1, 2, 3)),),
                1.5,
                "quiesced",
            ),
        ),
        guard=owner,
        state=ride.FROZEN,
        report=(("Warning", "text"),),
    )
    ride.write(record)
    assert ride.read("/srv/view") == record
    assert ride.read("/srv/view/") == record  # the same view, however it is spelt
    assert ride.all_rides() == ([record], [])
    assert oct(os.stat(ride.ride_path("/srv/view")).st_mode & 0o777) == "0o600"


def test_an_unreadable_ride_record_is_named(state_dir):
    os.makedirs(ride.ride_dir())
    with open(ride.ride_path("/srv/view"), "w") as handle:
        handle.write('{"schema": 1}')
    rides, problems = ride.all_rides()
    assert rides == [] and "is malformed" in problems[0]
    assert ride.ride_path("/srv/view") in problems[0]


def test_a_process_is_told_apart_from_a_later_one_and_from_a_zombie():
    child = subprocess.Popen(["sleep", "30"])
    try:
        seen = ride.Process.of(child.pid)
        assert seen is not None and seen.alive()
        assert not ride.Process(child.pid, seen.start + 1, seen.boot).alive()  # pid reused
        assert not ride.Process(child.pid, seen.start, "another boot").alive()
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie now, not reaped
        assert not seen.alive()
    finally:
        child.kill()
        child.wait()
    assert ride.Process.of(child.pid) is None


def test_the_handler_variables_make_the_context():
    environ = {
        "BACKUPNINJA_KVM_NINJA_PID": "123",
        "BACKUPNINJA_KVM_NINJA_configdirectory": "/etc/backup.d",
        "BACKUPNINJA_KVM_NINJA_file": "/etc/backup.d/10-vms.kvm",
        "BACKUPNINJA_KVM_NINJA_processnow": "1",
        "BACKUPNINJA_KVM_NINJA_logfile": "/var/log/backupninja.log",
        "LANG": "C.UTF-8",
    }
    ninja = stages.Ninja.from_environ(environ)
    assert ninja is not None
    assert (ninja.pid, ninja.logfile) == (123, "/var/log/backupninja.log")
    assert ninja.context.file == "/etc/backup.d/10-vms.kvm" and ninja.context.processnow
    assert ninja.context.collation == "C.UTF-8"
    assert stages.Ninja.from_environ({"BACKUPNINJA_KVM_NINJA_file": "x"}) is None  # no pid


def test_a_fatal_outranks_an_error():
    ok, fatal, errors = stages.EXIT_OK, stages.EXIT_FATAL, stages.EXIT_DOMAIN_ERRORS
    assert stages.worse(ok, errors) == errors
    assert stages.worse(errors, fatal) == fatal == stages.worse(fatal, errors, ok)
    assert stages.worse(ok, ok) == ok
