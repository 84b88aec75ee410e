"""End to end: each ship example of examples/ride-along, run by the real
backupninja with its own rsync, borg or restic handler, copies a view whole
and without a Warning.

The example is used as it stands, with only its paths moved into a scratch
folder (the view, the repository or backup folder, the password file, the
log). The view holds what a freeze shows: a sparse raw image, domain.xml,
manifest.json, plus a file named like a backupninja message ("Halt: ..."),
which with rsync's default -v would halt the run and skip the thaw.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.ninja import ROOT

pytestmark = [pytest.mark.backupninja]  # make test installs backupninja, borg and restic

EXAMPLES = os.path.join(ROOT, "examples", "ride-along")
MiB = 1024 * 1024
IMAGE_SIZE, DATA_AT, DATA = 64 * MiB, 8 * MiB, os.urandom(MiB)


def _scratch_example(name: str, root: str) -> str:
    with open(os.path.join(EXAMPLES, name)) as handle:
        text = handle.read()
    for old, new in (
        ("/var/lib/backupninja-kvm/view", f"{root}/view"),
        ("/var/log/backup/rsync.log", f"{root}/rsync.log"),
        ("/root/.restic-pass", f"{root}/restic-pass"),
        ("/srv/", f"{root}/"),
    ):
        text = text.replace(old, new)
    return text


def _make_view(root: str) -> str:
    """A view of one domain as the freeze builds it; returns the image's path."""
    domain = os.path.join(root, "view", "web1")
    os.makedirs(domain, mode=0o700)
    image = os.path.join(domain, "vda-web1.raw")
    with open(image, "wb") as handle:
        handle.truncate(IMAGE_SIZE)
        handle.seek(DATA_AT)
        handle.write(DATA)
    for name, text in (
        ("domain.xml", "<domain><name>web1</name></domain>\n"),
        ("manifest.json", '{"version": 1, "domain": "web1", "files": []}\n'),
        ("Halt: gotcha", ""),
    ):
        with open(os.path.join(domain, name), "w") as handle:
            handle.write(text)
    return image


def _run(root: str, name: str, env: dict[str, str]) -> str:
    """backupninja --now --run on the example; returns its log."""
    configdir = os.path.join(root, "backup.d")
    os.mkdir(configdir, 0o700)
    action = os.path.join(configdir, name)
    with open(action, "w") as handle:
        handle.write(_scratch_example(name, root))
    os.chmod(action, 0o600)
    conf = os.path.join(root, "backupninja.conf")
    with open(conf, "w") as handle:
        handle.write(
            f"loglevel = 5\nreportemail =\nlogfile = {root}/backupninja.log\n"
            f"configdirectory = {configdir}\nscriptdirectory = /usr/share/backupninja\n"
            "usecolors = no\n"
        )
    subprocess.run(
        ["backupninja", "-f", conf, "--now", "--run", action],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    with open(f"{root}/backupninja.log") as handle:
        return handle.read()


def _problems(log: str) -> list[str]:
    """The log's Warning, Error, Fatal and Halt lines ("Dec 02 01:00:00 Level: ...")."""
    levels = ("Warning:", "Error:", "Fatal:", "Halt:")
    return [line for line in log.splitlines() if line.split(" ", 4)[3:4] in ([lv] for lv in levels)]


def _assert_same_image(copy: str, sparse: bool) -> None:
    with open(copy, "rb") as handle:
        handle.seek(DATA_AT)
        assert handle.read(MiB) == DATA
    assert os.path.getsize(copy) == IMAGE_SIZE
    if sparse:
        assert os.stat(copy).st_blocks * 512 < 4 * MiB, "the copy lost its holes"


@pytest.fixture
def environment(scratch):
    """Caches and keys of borg and restic in the scratch folder, not root's home."""
    return dict(
        os.environ,
        LC_ALL="C",
        BORG_BASE_DIR=f"{scratch}/borg-base",
        RESTIC_CACHE_DIR=f"{scratch}/restic-cache",
    )


def test_the_rsync_example_copies_the_view_sparse_and_is_not_halted(scratch, environment):
    _make_view(scratch)
    os.makedirs(f"{scratch}/backup/myhost", mode=0o700)

    log = _run(scratch, "20-vms.rsync", environment)

    assert _problems(log) == [], log
    copy = f"{scratch}/backup/myhost{scratch}/view/view.0/web1"
    _assert_same_image(f"{copy}/vda-web1.raw", sparse=True)
    assert sorted(os.listdir(copy)) == sorted(os.listdir(f"{scratch}/view/web1"))


def test_the_borg_example_archives_the_view_and_extracts_it_sparse(scratch, environment):
    _make_view(scratch)
    env = dict(environment, BORG_PASSPHRASE="CHANGEME")
    # an existing repository, as on every night but the first (whose init warns)
    subprocess.run(
        ["borg", "init", "-e", "repokey", f"{scratch}/borg"],
        env=env,
        check=True,
        capture_output=True,
    )

    log = _run(scratch, "20-vms.borg", environment)

    assert _problems(log) == [], log
    archives = subprocess.run(
        ["borg", "list", "--short", f"{scratch}/borg"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(archives) == 1 and archives[0].startswith("vms-"), archives
    out = f"{scratch}/extracted"
    os.mkdir(out)
    subprocess.run(
        ["borg", "extract", "--sparse", f"{scratch}/borg::{archives[0]}"],
        cwd=out,
        env=env,
        check=True,
    )
    _assert_same_image(f"{out}{scratch}/view/web1/vda-web1.raw", sparse=True)
    assert os.path.exists(f"{out}{scratch}/view/web1/manifest.json")


def test_the_restic_example_snapshots_the_view(scratch, environment):
    _make_view(scratch)
    with open(f"{scratch}/restic-pass", "w") as handle:
        handle.write("scratch\n")
    os.chmod(f"{scratch}/restic-pass", 0o600)
    # an existing repository, as on every night but the first (whose init warns)
    subprocess.run(
        ["restic", "-r", f"{scratch}/restic", "--password-file", f"{scratch}/restic-pass", "init"],
        env=environment,
        check=True,
        capture_output=True,
    )

    log = _run(scratch, "20-vms.restic", environment)

    assert _problems(log) == [], log
    out = f"{scratch}/restored"
    subprocess.run(
        [
            "restic",
            "-r",
            f"{scratch}/restic",
            "--password-file",
            f"{scratch}/restic-pass",
            "restore",
            "latest",
            "--target",
            out,
        ],
        env=environment,
        check=True,
        capture_output=True,
    )
    # restic 0.14 restores holes as zeros: the same bytes, fully allocated
    _assert_same_image(f"{out}{scratch}/view/web1/vda-web1.raw", sparse=False)
    assert os.path.exists(f"{out}{scratch}/view/web1/domain.xml")
