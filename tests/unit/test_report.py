"""Messages for backupninja's report: one prefixed line each; sizes and durations."""

from __future__ import annotations

import io
import logging

import pytest

from backupninja_kvm import report
from backupninja_kvm.report import human_bytes, log, seconds


@pytest.fixture(autouse=True)
def restore_logger():
    """report.setup() reconfigures the package logger: put it back afterwards."""
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def test_each_level_gets_the_prefix_backupninja_counts(stream):
    report.setup(stream=stream)

    log.debug("web1: vda is 20 GiB")
    log.info("web1: backed up vda")
    log.warning("web1: removed a stale set")
    log.error("web1: copy failed")
    log.critical("web1: still on its overlay")

    assert stream.getvalue().splitlines() == [
        "Debug: web1: vda is 20 GiB",
        "Info: web1: backed up vda",
        "Warning: web1: removed a stale set",
        "Error: web1: copy failed",
        "Fatal: web1: still on its overlay",
    ]
    assert stream.getvalue().endswith("\n")


def test_a_message_on_several_lines_is_folded_into_one(stream):
    report.setup(stream=stream)

    log.error("web1: copy failed:\nNo space left on device\nsee the log")

    assert stream.getvalue() == "Error: web1: copy failed: No space left on device see the log\n"


def test_arguments_are_formatted_into_the_message(stream):
    report.setup(stream=stream)

    log.info("%s: copied %s in %s", "web1", human_bytes(1536), seconds(0.5))

    assert stream.getvalue() == "Info: web1: copied 1.5 KiB in 0.50 s\n"


def test_an_exception_never_prints_a_traceback(stream):
    report.setup(stream=stream)

    try:
        raise OSError("disk on fire")
    except OSError:
        log.exception("web1: copy failed")

    assert stream.getvalue() == "Error: web1: copy failed\n"


def test_debug_lines_are_left_out_unless_asked_for(stream):
    report.setup(stream=stream, debug=False)

    log.debug("details")
    log.info("step")

    assert stream.getvalue() == "Info: step\n"


def test_messages_do_not_reach_the_root_logger(stream, caplog):
    report.setup(stream=stream)

    with caplog.at_level(logging.DEBUG):
        log.warning("only once")

    assert stream.getvalue() == "Warning: only once\n"
    assert caplog.records == []


def test_setup_again_replaces_the_previous_output(stream):
    first = io.StringIO()
    report.setup(stream=first)
    report.setup(stream=stream)

    log.info("once")

    assert first.getvalue() == ""
    assert stream.getvalue() == "Info: once\n"


def test_the_handler_counts_messages_at_or_above_a_level(stream):
    handler = report.setup(stream=stream)

    log.info("a")
    log.warning("b")
    log.warning("c")
    log.error("d")
    log.critical("e")

    assert handler.count(logging.INFO) == 5
    assert handler.count(logging.WARNING) == 4
    assert handler.count(logging.ERROR) == 2
    assert handler.count(logging.CRITICAL) == 1


def test_a_fresh_handler_has_counted_nothing(stream):
    handler = report.setup(stream=stream)

    assert handler.count(logging.DEBUG) == 0


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024, "1.0 MiB"),
        (20 * 1024**3, "20.0 GiB"),
        (5.5 * 1024**3, "5.5 GiB"),
        (1024**4, "1.0 TiB"),
        (3 * 1024**5, "3072.0 TiB"),  # TiB is the largest unit
    ],
)
def test_human_bytes(count, shown):
    assert human_bytes(count) == shown


@pytest.mark.parametrize(
    ("duration", "shown"),
    [
        (0, "0.00 s"),
        (0.04, "0.04 s"),
        (0.5, "0.50 s"),
        (1, "1.0 s"),
        (12.34, "12.3 s"),
        (59.9, "59.9 s"),
        (60, "1 min 00 s"),
        (245, "4 min 05 s"),
        (245.6, "4 min 06 s"),
        (3661, "61 min 01 s"),
    ],
)
def test_seconds(duration, shown):
    assert seconds(duration) == shown


def test_human_bytes_never_shows_1024_of_a_unit():
    assert human_bytes(1024 * 1024 - 1) == "1.0 MiB"


@pytest.mark.parametrize(("duration", "shown"), [(59.96, "1 min 00 s"), (0.999, "1.0 s")])
def test_seconds_rounds_before_choosing_the_format(duration, shown):
    assert seconds(duration) == shown
