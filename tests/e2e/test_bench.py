"""make bench's script, with tiny images: it runs and writes its table, JSON and chart.

No figure is judged here (the machines are shared and noisy): only that the
benchmark works and reports every figure the README shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.libvirt


def test_the_benchmark_runs_and_writes_its_results(connection, scratch):
    results = os.path.join(scratch, "results")
    command = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--results", results]
    command += ["--size", "64M", "--data", "32M", "--window", "4M", "--runs", "2"]
    command += ["--pull-runs", "1", "--ride-runs", "1", "--restore-runs", "1", "--changed", "0.1"]

    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for label in (
        "time on the overlay",
        "merge by commit",
        "merge by pull",
        "flush of the copy to disk",
        "helper overhead per domain",
        "time on overlay / cp baseline",
        "ride-along: frozen time - ship time",
        "restore / cp of the same images",
        "changed blocks on xfs, 10% of the data changed",
        "changed blocks on ext4, 10% of the data changed",
    ):
        assert label in result.stdout, result.stdout
    with open(os.path.join(results, "latest.json")) as handle:
        figures = json.load(handle)
    assert figures["figures"]["overlay"]["runs"] == 2
    assert figures["figures"]["merge_pull"]["runs"] == 1
    assert figures["ratios"]["overlay_vs_cp"]["median"] > 0
    assert figures["figures"]["restore"]["runs"] == 1
    on_xfs, on_ext4 = figures["runs"]["changed_blocks"]
    assert (on_xfs["filesystem"], on_ext4["filesystem"]) == ("xfs", "ext4")
    for changed in (on_xfs, on_ext4):
        assert 0 < changed["read"] < 32 * 1024 * 1024  # a tenth of the data, not all of it
    # reflinks: the sum reads what changed; without them, the whole image
    assert on_xfs["hashed"] < on_ext4["hashed"]
    with open(os.path.join(results, "latest.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [d for d in connection.listAllDomains() if d.name().startswith("bnkvm-bench-")]
