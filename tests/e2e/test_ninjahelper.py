"""End to end: the real ninjahelper runs this checkout's handlers/kvm.helper.

ninjahelper has no option for its configuration: it always reads
/etc/backupninja.conf. So the unmodified /usr/sbin/ninjahelper runs in a private
mount namespace (``unshare --mount``) in which a scratch backupninja.conf is
bind-mounted over /etc/backupninja.conf; the host's file is never touched. That
configuration points ``configdirectory`` at a scratch folder and
``scriptdirectory`` at a scratch folder of symlinks: the shipped helpers and
handlers from /usr/share/backupninja, plus ``kvm`` and ``kvm.helper`` from this
checkout, as an installed system would have them.

The test answers the dialogs with keys through a pseudo-terminal (pexpect), waiting
for each dialog's text first: dialog's output is stripped of escape sequences and
whitespace before matching, as curses places words with cursor moves.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time

import pexpect
import pytest

from backupninja_kvm import config, ninja_run
from tests.support.cli import HELPER
from tests.support.ninja import HANDLERS, ROOT

pytestmark = [pytest.mark.backupninja]

SHIPPED = "/usr/share/backupninja"

TIMEOUT = 30
_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78cDEHM])")
_SPACE = re.compile(r"\s+")

ENTER, DOWN, CLEAR_LINE = "\r", "\x1bOB", "\x15"  # DOWN: xterm's kcud1 (keypad mode)


def _squash(text: str) -> str:
    return _SPACE.sub("", _ESCAPE.sub("", text))


class Dialogs:
    """ninjahelper on a pseudo-terminal: wait for a dialog's text, then send keys."""

    def __init__(self, conf: str, **environment: str) -> None:
        env = dict(os.environ, TERM="xterm", LC_ALL="C", DIALOGRC="/dev/null", **environment)
        script = 'mount --bind "$1" /etc/backupninja.conf && exec /usr/sbin/ninjahelper'
        self.child = pexpect.spawn(
            "unshare",
            ["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", conf],
            dimensions=(40, 120),
            env=env,
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
        )
        self.raw = ""

    def answer(self, text: str, keys: str, **alternatives: str) -> str:
        """Wait until *text* (or a text of *alternatives*, text -> keys) is on the
        screen, then type its keys; returns the text seen."""
        choices = {text: keys, **alternatives}
        deadline = time.monotonic() + TIMEOUT
        while not (seen := [t for t in choices if _squash(t) in _squash(self.raw)]):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no dialog showing {text!r} in {TIMEOUT} s: {self.screen()!r}")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=min(left, 1))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                pytest.fail(f"ninjahelper ended before showing {text!r}: {self.screen()!r}")
        self.raw = ""
        self.child.send(choices[seen[0]])
        return seen[0]

    def open_kvm_wizard(self) -> None:
        """From the main menu to the kvm wizard's first own question, with the
        default schedule and all domains (chosen, or typed when virsh lists none)."""
        self.open_kvm_choice("full")
        self.answer("When to run this action?", ENTER)
        self.answer(
            "Which domains does this action back up?",
            " " + ENTER,  # the first item: all
            **{"Domains to back up: all, or a comma-separated list": "all" + ENTER},
        )

    def open_kvm_choice(self, choice: str) -> None:
        """From the main menu through the kvm wizard's first menu: "full" (a
        full backup) or "pair" (a freeze/thaw pair)."""
        self.answer("create a new backup action", "n" + ENTER)
        self.answer("live backup of libvirt/KVM virtual machines", "k" + ENTER)
        self.answer("What should the new action do?", choice[0] + ENTER)

    def screen(self) -> str:
        return _ESCAPE.sub("", self.raw)[-2000:]

    def wait_exit(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture
def ninjahelper_conf(scratch):
    """A scratch backupninja.conf; returns (conf, configdirectory)."""
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace for ninjahelper: {probe.stderr!r}")
    configdir = os.path.join(scratch, "backup.d")
    scripts = os.path.join(scratch, "scripts")
    os.mkdir(configdir, 0o700)
    os.mkdir(scripts)
    for name in os.listdir(SHIPPED):
        if name not in ("kvm", "kvm.helper"):
            os.symlink(os.path.join(SHIPPED, name), os.path.join(scripts, name))
    for name in ("kvm", "kvm.helper"):
        os.symlink(os.path.join(HANDLERS, name), os.path.join(scripts, name))
    conf = os.path.join(scratch, "backupninja.conf")
    with open(conf, "w") as handle:
        handle.write(
            f"configdirectory = {configdir}\nscriptdirectory = {scripts}\n"
            f"libdirectory = /usr/lib/backupninja\nlogfile = {scratch}/backupninja.log\n"
        )
    return conf, configdir


@pytest.fixture
def wizard_action(ninjahelper_conf, scratch):
    """Create a kvm action with the wizard: merge = pull, quiesce = yes, keep = 3, a new
    scratch folder."""
    conf, configdir = ninjahelper_conf
    backups = os.path.join(scratch, "backups")
    dialogs = Dialogs(conf)
    try:
        dialogs.open_kvm_wizard()
        dialogs.answer("How to merge the overlay back", DOWN + " " + ENTER)
        dialogs.answer("Freeze the guests' filesystems", DOWN + " " + ENTER)
        dialogs.answer("Where do the backup sets go?", ENTER)  # local
        dialogs.answer("Directory where the backup sets go", CLEAR_LINE + backups + ENTER)
        dialogs.answer(f"{backups} does not exist. Create it now", ENTER)
        dialogs.answer("How many complete backup sets to keep", CLEAR_LINE + "3" + ENTER)
        # Back in the main menu, which now lists the new action.
        dialogs.answer(f"{configdir}/50.kvm", "q" + ENTER)
        assert dialogs.wait_exit() == 0
    finally:
        dialogs.child.close(force=True)
    return configdir, backups


def test_wizard_writes_a_valid_private_action(wizard_action):
    configdir, backups = wizard_action

    assert os.listdir(configdir) == ["50.kvm"]
    action = os.path.join(configdir, "50.kvm")
    assert stat.S_IMODE(os.stat(action).st_mode) == 0o600
    with open(action) as handle:
        text = handle.read()
    assert "when = everyday at 01:00\n" in text
    assert os.path.isdir(backups) and stat.S_IMODE(os.stat(backups).st_mode) == 0o700

    settings = config.load(action)

    assert (settings.merge, settings.keep, settings.directory) == ("pull", 3, backups)
    assert settings.quiesce == "yes"
    assert settings.changed_blocks == "no"  # a pull: no question, nothing to follow
    assert settings.domains == ()  # all
    assert (settings.stage, settings.uri, settings.dest) == ("full", "qemu:///system", "local")


@pytest.mark.libvirt
def test_helper_accepts_the_wizard_action(wizard_action):
    configdir, _ = wizard_action
    probe = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.skip("libvirtd does not answer at qemu:///system")

    result = subprocess.run(
        [HELPER, "run", "--test", os.path.join(configdir, "50.kvm")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )

    output = result.stdout + result.stderr
    # The file is valid (no Fatal). A domain of the shared host may still fail
    # its checks as a real run would (quiesce = yes without an agent, a lock
    # held by another suite): those are per-domain Errors of the test run.
    assert result.returncode in (0, 4), output
    lines = output.splitlines()
    assert not [line for line in lines if line.startswith("Fatal:")], output
    assert all(
        line.startswith("Error: test run: ") for line in lines if line.startswith("Error:")
    ), output
    assert any(
        line.startswith("Info: test run, would ") or "no domain selected" in line for line in lines
    ), output


def test_wizard_writes_a_remote_action(ninjahelper_conf):
    conf, configdir = ninjahelper_conf
    dialogs = Dialogs(conf)
    try:
        dialogs.open_kvm_wizard()
        dialogs.answer("How to merge the overlay back", ENTER)
        dialogs.answer("Copy only the blocks changed", DOWN + " " + ENTER)  # no
        dialogs.answer("Freeze the guests' filesystems", ENTER)
        dialogs.answer("Where do the backup sets go?", DOWN + " " + ENTER)
        dialogs.answer("Remote host", "backup.example.org" + ENTER)
        dialogs.answer("ssh user on backup.example.org", CLEAR_LINE + "kvmbackup" + ENTER)
        dialogs.answer("Directory where the backup sets go", CLEAR_LINE + "/srv/kvm" + ENTER)
        dialogs.answer("How many complete backup sets to keep", ENTER)
        dialogs.answer(f"{configdir}/50.kvm", "q" + ENTER)
        assert dialogs.wait_exit() == 0
    finally:
        dialogs.child.close(force=True)

    settings = config.load(os.path.join(configdir, "50.kvm"))

    assert (settings.dest, settings.host, settings.user) == (
        "remote",
        "backup.example.org",
        "kvmbackup",
    )
    assert (settings.directory, settings.keep) == ("/srv/kvm", 7)
    assert (settings.merge, settings.quiesce) == ("commit", "auto")
    assert settings.changed_blocks == "no"
    assert not os.path.exists("/srv/kvm")  # nothing created here for a remote directory


NAMES = ["probe-sp ace", "probe-a,b", "probe-c#d", "plain"]


@pytest.fixture
def test_driver(scratch):
    """libvirt's test driver with domains whose names hold a space, a comma and a #:
    the same libvirt API as the system daemon, and no other suite's domains."""
    node = os.path.join(scratch, "node.xml")
    with open(node, "w") as handle:
        handle.write("<node>\n")
        for number, name in enumerate(NAMES):
            image = os.path.join(scratch, f"disk{number}.raw")  # a disk: --test plans its copy
            with open(image, "wb") as disk:
                disk.truncate(1024 * 1024)
            handle.write(
                f"<domain type='test'><name>{name}</name><memory>65536</memory>"
                "<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
                f"<driver name='qemu' type='raw'/><source file='{image}'/>"
                "<target dev='vda'/></disk></devices></domain>\n"
            )
        handle.write("</node>\n")
    uri = f"test://{node}"
    listed = subprocess.run(
        ["virsh", "-c", uri, "list", "--all", "--name"], capture_output=True, text=True
    )
    assert listed.stdout.split("\n")[: len(NAMES)] == NAMES, listed
    return uri


def test_wizard_writes_names_with_spaces_commas_and_hashes_that_both_parsers_read(
    ninjahelper_conf, test_driver, scratch
):
    conf, configdir = ninjahelper_conf
    backups = os.path.join(scratch, "back#ups,1")  # a path the file must quote too
    dialogs = Dialogs(conf, LIBVIRT_DEFAULT_URI=test_driver)
    try:
        dialogs.open_kvm_choice("full")
        dialogs.answer("When to run this action?", ENTER)
        # Nothing is preselected: Enter alone is not a choice.
        dialogs.answer("Which domains does this action back up?", ENTER)
        dialogs.answer('Choose "all" or "some" with the space bar', ENTER)
        dialogs.answer("Which domains does this action back up?", DOWN + " " + ENTER)  # some
        # One item per domain: the first three are the three odd names.
        dialogs.answer("Domains to back up (space selects)", " " + DOWN + " " + DOWN + " " + ENTER)
        dialogs.answer("How to merge the overlay back", ENTER)
        dialogs.answer("Copy only the blocks changed", ENTER)  # auto, the default
        dialogs.answer("Freeze the guests' filesystems", ENTER)
        dialogs.answer("Where do the backup sets go?", ENTER)
        dialogs.answer("Directory where the backup sets go", CLEAR_LINE + backups + ENTER)
        dialogs.answer(f"{backups} does not exist. Create it now", ENTER)
        dialogs.answer("How many complete backup sets to keep", ENTER)
        dialogs.answer(f"{configdir}/50.kvm", "q" + ENTER)
        assert dialogs.wait_exit() == 0
    finally:
        dialogs.child.close(force=True)
    action = os.path.join(configdir, "50.kvm")

    settings = config.load(action)

    assert settings.domains == ("probe-sp ace", "probe-a,b", "probe-c#d")
    assert settings.changed_blocks == "auto"
    assert settings.uri == test_driver
    assert settings.directory == backups
    # backupninja's own parser still reads its key, when, from the same file.
    when = subprocess.run(
        ["awk", "-f", "/usr/lib/backupninja/parseini", "S=", "P=when", action],
        capture_output=True,
        text=True,
    )
    assert when.stdout == "everyday at 01:00\n"
    # The helper finds each name among libvirt's domains.
    result = subprocess.run(
        [HELPER, "run", "--test", action], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout + result.stderr
    planned = [line for line in result.stdout.splitlines() if "test run, would" in line]
    assert [line.split("would ", 1)[1].split(" (")[0] for line in planned] == [
        "probe-sp ace",
        "probe-a,b",
        "probe-c#d",
    ], result.stdout


# ----------------------------------------------------------------------------
# the freeze/thaw pair

VIEW = "/var/lib/backupninja-kvm/view"
SHIP_EXAMPLE = os.path.join(ROOT, "examples", "ride-along", "20-vms.borg")


def _put(configdir: str, name: str, text: str) -> str:
    path = os.path.join(configdir, name)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
    return path


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def test_pair_wizard_numbers_a_freeze_and_a_thaw_around_the_ship_action(
    ninjahelper_conf, test_driver
):
    conf, configdir = ninjahelper_conf
    _put(configdir, "20-vms.borg", _read(SHIP_EXAMPLE))
    _put(configdir, "19-db.sh", "when = everyday at 01:00\n")  # 19 is taken: the freeze is 18
    dialogs = Dialogs(conf, LIBVIRT_DEFAULT_URI=test_driver)
    try:
        dialogs.open_kvm_choice("pair")
        dialogs.answer("When to run this action?", ENTER)
        # The checklist of the full wizard: "some", then the first domain.
        dialogs.answer("Which domains does this action freeze?", DOWN + " " + ENTER)
        dialogs.answer("Domains to freeze (space selects)", " " + ENTER)
        dialogs.answer("Which action copies the frozen images", ENTER)  # the only one
        dialogs.answer("Written: 18-vms.kvm (freeze) and 21-vms.kvm (thaw)", ENTER)
        dialogs.answer(f"{configdir}/21-vms.kvm", "q" + ENTER)
        assert dialogs.wait_exit() == 0
    finally:
        dialogs.child.close(force=True)
    freeze, thaw = (os.path.join(configdir, name) for name in ("18-vms.kvm", "21-vms.kvm"))

    assert sorted(os.listdir(configdir)) == ["18-vms.kvm", "19-db.sh", "20-vms.borg", "21-vms.kvm"]
    for path in (freeze, thaw):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    # As backupninja and the freeze's pre-flight read them.
    freeze_text, thaw_text = _read(freeze), _read(thaw)
    assert ninja_run.when_lines(freeze_text, "") == ["everyday at 01:00"]
    assert ninja_run.when_lines(thaw_text, "") == ["everyday at 01:00"]
    assert ninja_run.getconf(freeze_text, "general", "stage") == "freeze"
    assert ninja_run.getconf(freeze_text, "general", "view") == VIEW
    assert ninja_run.getconf(freeze_text, "source", "domains") == '"probe-sp ace"'
    assert ninja_run.getconf(freeze_text, "source", "uri") == test_driver
    assert ninja_run.is_kvm_thaw(thaw, thaw_text)
    assert ninja_run.getconf(thaw_text, "general", "view") == VIEW
    assert ninja_run.getconf(thaw_text, "source", "uri") == test_driver
    assert ninja_run.getconf(thaw_text, "source", "domains") == ""  # a thaw has none
    # The freeze would freeze: a thaw and the ship action of the view follow it.
    scripts = os.path.join(os.path.dirname(configdir), "scripts")
    context = ninja_run.Context(
        configdirectory=configdir,
        scriptdirectory=scripts,
        now=ninja_run.Now("01", "8", "monday"),
        file=freeze,
    )
    assert ninja_run.freeze_refusals(context, VIEW) == []


def test_pair_wizard_without_a_ship_action_says_to_create_one_first(ninjahelper_conf):
    conf, configdir = ninjahelper_conf
    dialogs = Dialogs(conf)
    try:
        dialogs.open_kvm_choice("pair")
        dialogs.answer("There is no .rsync, .borg or .restic action in", ENTER)
        dialogs.answer("create a new backup action", "q" + ENTER)
        assert dialogs.wait_exit() == 0
    finally:
        dialogs.child.close(force=True)

    assert os.listdir(configdir) == []


def test_pair_wizard_asks_to_rename_a_ship_action_without_a_two_digit_prefix(ninjahelper_conf):
    conf, configdir = ninjahelper_conf
    _put(configdir, "vms.borg", _read(SHIP_EXAMPLE))
    dialogs = Dialogs(conf)
    try:
        dialogs.open_kvm_choice("pair")
        dialogs.answer("When to run this action?", ENTER)
        dialogs.answer(
            "Which domains does this action freeze?",
            " " + ENTER,
            **{"Domains to freeze: all, or a comma-separated list": "all" + ENTER},
        )
        dialogs.answer("Which action copies the frozen images", ENTER)
        dialogs.answer("vms.borg has no two-digit prefix", ENTER)
        dialogs.answer(f"{configdir}/vms.borg", "q" + ENTER)
        assert dialogs.wait_exit() == 0
    finally:
        dialogs.child.close(force=True)

    assert os.listdir(configdir) == ["vms.borg"]  # nothing written
