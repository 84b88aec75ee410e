"""The progress line and the Prometheus textfile, without a hypervisor."""

from __future__ import annotations

import io
import logging
import os
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backupninja_kvm import prometheus, report
from backupninja_kvm.progress import Progress

MiB = 1024 * 1024


def test_progress_line_gives_bytes_rate_and_time_left():
    progress = Progress("web1: vda: copy", 100 * MiB, stream=io.StringIO(), interactive=True)
    progress.started -= 2.0  # two seconds ago
    progress.done = 25 * MiB
    assert progress.line(now=progress.started + 2.0) == (
        "web1: vda: copy  25% 25.0 MiB of 100.0 MiB, 12.5 MiB/s, 0:06 left"
    )


def test_progress_redraws_one_line_on_a_terminal():
    stream = io.StringIO()
    progress = Progress("web1: vda: copy", 4 * MiB, stream=stream, interactive=True)
    for done in (MiB, 2 * MiB, 4 * MiB):
        progress.update(done)
    progress.finish()
    text = stream.getvalue()
    assert text.count("\r\033[K") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "copy 100% 4.0 MiB of 4.0 MiB" in text


def test_progress_without_terminal_writes_debug_lines_at_a_modest_rate():
    out = io.StringIO()
    report.setup(out)
    try:
        progress = Progress("web1: vda: copy", 100 * MiB, interactive=False, interval=10.0)
        for step in range(1, 101):
            progress.update(step * MiB)  # all within far less than 10 s
        progress.last_report -= 11
        progress.update(100 * MiB)
        progress.finish()
    finally:
        report.setup()
    lines = out.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("Debug: web1: vda: copy 100%")


def test_prometheus_file_is_well_formed_and_keeps_the_last_success(tmp_path):
    first = [prometheus.DomainFigures("web1", prometheus.OK, 5 * MiB, 1.25, 3.5)]
    prometheus.write(str(tmp_path), first, now=1_800_000_000)
    second = [
        prometheus.DomainFigures("web1", prometheus.ERROR, duration_seconds=0.5),
        prometheus.DomainFigures('db"1', prometheus.OK, MiB, 0.5, 1.0, quiesced=True),
    ]
    path = prometheus.write(str(tmp_path), second, now=1_800_086_400)

    with open(path) as handle:
        families = {f.name: f for f in text_string_to_metric_families(handle.read())}
    values = {
        name: {s.labels["domain"]: s.value for s in family.samples}
        for name, family in families.items()
    }
    assert values["backupninja_kvm_status"] == {"web1": 1, 'db"1': 0}
    assert values["backupninja_kvm_last_success_timestamp_seconds"] == {
        "web1": 1_800_000_000,  # carried over: this run failed
        'db"1': 1_800_086_400,
    }
    assert values["backupninja_kvm_overlay_seconds"]['db"1'] == 0.5
    assert values["backupninja_kvm_quiesced"] == {"web1": 0, 'db"1': 1}
    assert not list(tmp_path.glob("*.prom.*"))  # no temporary left


def test_report_setup_restores_logging_level():
    handler = report.setup(io.StringIO(), debug=False)
    assert report.log.level == logging.INFO and handler.count(logging.DEBUG) == 0
    report.setup()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_board_redraws_one_line_per_disk_in_place():
    from backupninja_kvm.progress import Board

    terminal = _Terminal()
    board = Board(terminal)
    vda = board.add("web1: vda: copy", 4 * MiB)
    vdb = board.add("web1: vdb: copy", 2 * MiB)
    vda.update(MiB)
    vdb.update(2 * MiB)
    vda.finish()
    frames = terminal.getvalue().split("\033[2F")
    assert len(frames) == 3  # drawn once, then moved up two lines twice
    last = frames[-1].split("\n")
    assert last[0].startswith("\033[Kweb1: vda: copy 100% 4.0 MiB of 4.0 MiB")
    assert last[1].startswith("\033[Kweb1: vdb: copy 100% 2.0 MiB of 2.0 MiB")


def prometheus_values(path) -> dict[str, dict[str, float]]:
    with open(path) as handle:
        families = {f.name: f for f in text_string_to_metric_families(handle.read())}
    return {
        name: {s.labels["domain"]: s.value for s in family.samples}
        for name, family in families.items()
    }


def test_prometheus_never_follows_a_link_planted_at_a_guessable_name(tmp_path):
    directory = tmp_path / "textfile"
    directory.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious root-only content\n")
    victim.chmod(0o600)
    planted = [f"{prometheus.FILE_NAME}.{pid}" for pid in range(os.getpid() - 50, os.getpid() + 50)]
    planted += [f"{prometheus.FILE_NAME}.tmp", f".{prometheus.FILE_NAME}", prometheus.FILE_NAME]
    for name in planted:
        (directory / name).symlink_to(victim)

    path = prometheus.write(str(directory), [prometheus.DomainFigures("web1", prometheus.OK)])

    assert victim.read_text() == "precious root-only content\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not os.path.islink(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert prometheus_values(path)["backupninja_kvm_status"] == {"web1": 0}
    left = sorted(p.name for p in directory.iterdir() if p.name not in planted)
    assert left == []  # no temporary left; the file itself replaced the planted link


def test_prometheus_keeps_the_series_of_an_earlier_actions_domains(tmp_path):
    first_action = [prometheus.DomainFigures("web1", prometheus.ERROR, 3 * MiB, 0.5, 2.0)]
    prometheus.write(str(tmp_path), first_action, now=1_800_000_000)
    second_action = [prometheus.DomainFigures("db1", prometheus.OK, MiB, 0.25, 1.0, True)]
    path = prometheus.write(str(tmp_path), second_action, now=1_800_000_100)

    values = prometheus_values(path)

    assert values["backupninja_kvm_status"] == {"web1": 1, "db1": 0}  # web1's failure stays
    assert values["backupninja_kvm_bytes_copied"] == {"web1": 3 * MiB, "db1": MiB}
    assert values["backupninja_kvm_duration_seconds"] == {"web1": 2.0, "db1": 1.0}
    assert values["backupninja_kvm_quiesced"] == {"web1": 0, "db1": 1}
    assert values["backupninja_kvm_last_success_timestamp_seconds"] == {"db1": 1_800_000_100}


def test_prometheus_replaces_only_the_series_of_this_runs_domains(tmp_path):
    prometheus.write(
        str(tmp_path),
        [
            prometheus.DomainFigures("web1", prometheus.OK, 5 * MiB),
            prometheus.DomainFigures("db1", prometheus.ERROR),
        ],
        now=1_800_000_000,
    )
    path = prometheus.write(
        str(tmp_path), [prometheus.DomainFigures("db1", prometheus.OK, MiB)], now=1_800_000_200
    )

    values = prometheus_values(path)

    assert values["backupninja_kvm_status"] == {"web1": 0, "db1": 0}
    assert values["backupninja_kvm_bytes_copied"] == {"web1": 5 * MiB, "db1": MiB}
    assert values["backupninja_kvm_last_success_timestamp_seconds"] == {
        "web1": 1_800_000_000,
        "db1": 1_800_000_200,
    }


@pytest.mark.parametrize(("mode", "warned"), [(0o777, True), (0o1777, False), (0o755, False)])
def test_a_textfile_directory_writable_by_others_is_a_warning(tmp_path, caplog, mode, warned):
    directory = tmp_path / "textfile"
    directory.mkdir()
    directory.chmod(mode)

    with caplog.at_level(logging.WARNING, logger="backupninja_kvm"):
        prometheus.write(str(directory), [prometheus.DomainFigures("web1", prometheus.OK)])

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert warnings == [
            f"Prometheus textfile directory: {directory} is writable by other users "
            f"(mode {mode:04o}), who can replace or remove the figures written there: "
            f"chmod go-w {directory}"
        ]
    else:
        assert warnings == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_textfile_directory_of_the_exporters_own_user_is_no_warning(tmp_path, caplog):
    # Debian's /var/lib/prometheus/node-exporter belongs to the prometheus user.
    directory = tmp_path / "textfile"
    directory.mkdir()
    os.chown(directory, 65534, 65534)

    with caplog.at_level(logging.WARNING, logger="backupninja_kvm"):
        prometheus.write(str(directory), [prometheus.DomainFigures("web1", prometheus.OK)])

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert (directory / prometheus.FILE_NAME).stat().st_uid == 0
