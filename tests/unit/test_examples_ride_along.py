"""examples/ride-along: the freeze, ship and thaw action files an administrator
copies into /etc/backup.d are read as the freeze's pre-flight reads them, ship
the view without a lint, and the data action never reads a live image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from backupninja_kvm import config, ninja_run
from backupninja_kvm.ninja_run import Context, Now

EXAMPLES = Path(__file__).parents[2] / "examples" / "ride-along"
VIEW = "/var/lib/backupninja-kvm/view"
IMAGES = "/var/lib/libvirt/images"
SHIPS = ["20-vms.rsync", "20-vms.borg", "20-vms.restic"]
ACTIONS = ["10-vms.kvm", *SHIPS, "50-data.borg", "90-vms.kvm"]
ONE_AM = Now("01", "8", "monday")


def _read(name: str) -> str:
    return (EXAMPLES / name).read_text()


def _ship(name: str) -> ninja_run.ShipAction:
    action = ninja_run.read_ship_action(f"/etc/backup.d/{name}", _read(name))
    assert action is not None, name
    return action


@pytest.mark.parametrize("name", SHIPS)
def test_each_ship_example_reads_the_view(name):
    assert ninja_run.reads(_ship(name), VIEW)


@pytest.mark.parametrize("name", SHIPS)
def test_each_ship_example_has_no_lint(name):
    lints = ninja_run.lint_ship_action(
        _ship(name), VIEW, live_dirs=[IMAGES], device_of=lambda _path: 1, image_paths=[IMAGES]
    )
    assert lints == []


def test_the_data_example_reads_neither_the_view_nor_the_live_images():
    data = _ship("50-data.borg")

    assert data.includes  # it does ship /etc, /home...
    assert not ninja_run.reads(data, VIEW)
    assert ninja_run.covering_include(data, IMAGES) == ""
    assert ninja_run.covering_include(data, f"{IMAGES}/web1.qcow2") == ""
    # an overlay outside libvirt's folder (overlaydir, images elsewhere)
    assert ninja_run.covering_include(data, "/var/vms/web1.bnkvm-20261127T011500Z.qcow2") == ""
    lints = ninja_run.lint_ship_action(data, VIEW, live_dirs=[IMAGES])
    assert [lint for lint in lints if IMAGES in lint.message] == []


def test_every_key_of_the_examples_has_a_comment_above_it():
    for name in ACTIONS:
        lines = _read(name).splitlines()
        for number, line in enumerate(lines):
            if "=" in line and not line.startswith("#"):
                above = lines[number - 1] if number else ""
                assert above.startswith("#") or _same_key(above, line), f"{name}: {line}"


def _same_key(above: str, line: str) -> bool:
    """A repeated key (include = ..., exclude = ...) shares the comment above
    the first of its lines."""
    return above.split("=")[0].strip() == line.split("=")[0].strip()


def test_the_trio_runs_at_the_same_time():
    whens = {name: ninja_run.when_lines(_read(name), "") for name in ACTIONS}
    assert set(map(tuple, whens.values())) == {("everyday at 01:00",)}, whens


def _as_root(path: str) -> os.stat_result:
    """os.stat as if root owned the scratch files (the test may run as a user)."""
    info = os.stat(path)
    return os.stat_result((info.st_mode, *info[1:4], 0, 0, *info[6:]))


def _example_layout(tmp_path: Path, ship: str) -> Context:
    """/etc/backup.d as the README says: the trio with one ship action, and the
    data action; the context of the freeze at 01:00."""
    configdir = tmp_path / "backup.d"
    scripts = tmp_path / "scripts"
    configdir.mkdir(mode=0o700)
    scripts.mkdir()
    for handler in ("kvm", "rsync", "borg", "restic"):
        (scripts / handler).write_text("")
    for name in ("10-vms.kvm", ship, "50-data.borg", "90-vms.kvm"):
        shutil.copy(EXAMPLES / name, configdir / name)
        os.chmod(configdir / name, 0o600)
    return Context(
        configdirectory=str(configdir),
        scriptdirectory=str(scripts),
        now=ONE_AM,
        file=str(configdir / "10-vms.kvm"),
    )


@pytest.mark.parametrize("ship", SHIPS)
def test_the_freeze_finds_its_ship_action_and_its_thaw_in_the_example_layout(tmp_path, ship):
    context = _example_layout(tmp_path, ship)

    assert ninja_run.freeze_refusals(context, VIEW, stat=_as_root) == []


@pytest.mark.parametrize("ship", SHIPS)
def test_the_example_layout_has_no_lint(tmp_path, ship):
    context = _example_layout(tmp_path, ship)

    assert ninja_run.ship_lints(context, VIEW, [IMAGES], stat=_as_root) == []


@pytest.mark.parametrize(("name", "stage"), [("10-vms.kvm", "freeze"), ("90-vms.kvm", "thaw")])
def test_the_kvm_examples_are_valid_action_files(name, stage):
    settings = config.load(EXAMPLES / name)

    assert settings.stage == stage
    assert settings.view == VIEW
    if stage == "freeze":
        assert settings.domains == ()  # all
        assert settings.max_frozen == 12 * 3600
