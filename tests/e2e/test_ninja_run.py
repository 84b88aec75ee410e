"""ninja_run's prediction against the real backupninja 1.2.2.

A scratch backupninja.conf and backup.d whose handlers (in a scratch
scriptdirectory) only append the action they were given to a log; the kvm
handler also dumps the shell variables ninja_run reads (HANDLER_VARIABLES),
NUL-separated, as the real handler will pass them to the helper. The order
and the set of actions backupninja ran must equal the prediction, made both
from the files alone and from those variables. No libvirt needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from backupninja_kvm import ninja_run
from backupninja_kvm.ninja_run import Context

pytestmark = [
    pytest.mark.backupninja,
    pytest.mark.skipif(shutil.which("backupninja") is None, reason="backupninja is not installed"),
]

NAMES = ["05-x", "10-a.kvm", "100-late.sh", "50-data.rsync", "60-x.disabled", "9-early.sh"]
NAMES += ["noext", "70-y.nohandler", "20-b.sh~"]


class Scratch:
    def __init__(self, root: str) -> None:
        self.root = root
        self.configdir = os.path.join(root, "backup.d")
        self.scripts = os.path.join(root, "scripts")
        self.log = os.path.join(root, "ran.log")
        self.variables = os.path.join(root, "variables")
        self.conf = os.path.join(root, "backupninja.conf")
        os.mkdir(self.configdir, 0o700)
        os.mkdir(self.scripts, 0o700)
        for handler in ("sh", "rsync", "kvm"):
            with open(os.path.join(self.scripts, handler), "w") as handle:
                handle.write(f'echo "$1" >> {self.log}\n')
                if handler == "kvm":
                    names = " ".join(ninja_run.HANDLER_VARIABLES)
                    handle.write(
                        f": > {self.variables}\nfor name in {names}; do\n"
                        '  if declare -p "$name" >/dev/null 2>&1; then\n'
                        f'    printf "%s\\0%s\\0" "$name" "${{!name}}" >> {self.variables}\n'
                        "  fi\ndone\n"
                    )
        with open(self.conf, "w") as handle:
            handle.write(
                f"loglevel = 5\nreportemail =\nreportsuccess = no\nreportwarning = no\n"
                f"logfile = {os.path.join(root, 'backupninja.log')}\n"
                f"configdirectory = {self.configdir}\nscriptdirectory = {self.scripts}\n"
                "libdirectory = /usr/lib/backupninja\nusecolors = no\n"
            )

    def path(self, name: str) -> str:
        return os.path.join(self.configdir, name)

    def action(self, name: str, text: str = "") -> str:
        with open(self.path(name), "w") as handle:
            handle.write(text)
        os.chmod(self.path(name), 0o600)
        return self.path(name)

    def run(self, *options: str) -> list[str]:
        for stale in (self.log, self.variables):
            if os.path.exists(stale):
                os.unlink(stale)
        subprocess.run(
            ["backupninja", "-f", self.conf, *options],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, LC_ALL="C"),
        )
        if not os.path.exists(self.log):
            return []
        with open(self.log) as handle:
            return handle.read().splitlines()

    def handler_variables(self) -> dict[str, str]:
        with open(self.variables, "rb") as handle:
            fields = handle.read().decode().split("\0")[:-1]
        return dict(zip(fields[::2], fields[1::2], strict=True))

    def context(self, **keys) -> Context:
        return Context(configdirectory=self.configdir, scriptdirectory=self.scripts, **keys)

    def remove_locks(self) -> None:
        for name in os.listdir(self.configdir):
            lock = "/var/lock/backupninja/" + self.path(name).replace("/", "_")
            if os.path.exists(lock):
                os.unlink(lock)


@pytest.fixture
def bn(scratch):
    made = Scratch(scratch)
    yield made
    made.remove_locks()


def test_order_and_set_of_a_now_run_are_predicted(bn):
    for name in NAMES:
        bn.action(name)
    ran = bn.run("--now")
    assert ran == [bn.path(n) for n in ("10-a.kvm", "100-late.sh", "50-data.rsync", "9-early.sh")]
    from_files = ninja_run.predict(bn.context(processnow=True))
    assert from_files.run() == ran
    variables = bn.handler_variables()
    assert variables["file"] == bn.path("10-a.kvm") and variables["processnow"] == "1"
    from_shell = ninja_run.predict(Context.from_variables(variables))
    assert from_shell.run() == ran
    later = [step.path for step in from_shell.after(variables["file"]) if step.runs]
    assert later == ran[1:]


def test_every_handler_variable_is_visible(bn):
    bn.action("10-a.kvm")
    bn.run("--run", bn.path("10-a.kvm"))
    variables = bn.handler_variables()
    # unset in a plain run: test (only -t), halts is 0 here
    assert set(ninja_run.HANDLER_VARIABLES) - set(variables) == {"test"}
    bn.run("--test", "--now")
    assert set(ninja_run.HANDLER_VARIABLES) - set(bn.handler_variables()) == {"singlerun"}


def test_a_single_run_is_predicted(bn):
    for name in NAMES:
        bn.action(name, "when = manual\n")
    ran = bn.run("--run", bn.path("10-a.kvm"))
    assert ran == [bn.path("10-a.kvm")]
    context = Context.from_variables(bn.handler_variables())
    assert context.singlerun == bn.path("10-a.kvm") and context.processnow
    assert ninja_run.predict(context).run() == ran
    assert "--run" in ninja_run.freeze_refusals(context, "/nonexistent/view")[0]


def test_when_without_now_is_predicted(bn):
    now = subprocess.run(["date", "+%H %-d %A"], capture_output=True, text=True, check=True)
    hour, day, weekday = now.stdout.split()
    other = f"{(int(hour) + 5) % 24:02d}"
    whens = {
        "10-a.kvm": "when = hourly\n",
        "11-now.sh": f"when = everyday at {hour}\n",
        "12-now-minutes.sh": f"when = {weekday.lower()}s at {hour}:30\n",
        "13-day.sh": f"when = {day}th at {hour}\n",
        "14-other.sh": f"when = everyday at {other}\n",
        "15-one-digit.sh": f"when = everyday at {int(hour) % 10}\n",  # "7", never "07"
        "16-manual.sh": "when = manual\n",
        "17-two.sh": f"when = everyday at {other}\nwhen = Everyday at {hour}:00\n",
        "18-section.sh": f"[x]\nwhen = everyday at {other}\n",  # conffile default: 01:00
        "19-hourly-and.sh": f"when = hourly\nwhen = everyday at {other}\n",
    }
    for name, text in whens.items():
        bn.action(name, text)
    ran = bn.run()
    variables = bn.handler_variables()
    assert ninja_run.predict(Context.from_variables(variables)).run() == ran
    never = {"14-other.sh", "15-one-digit.sh", "16-manual.sh", "19-hourly-and.sh"}
    assert not {bn.path(n) for n in never} & set(ran)
    if variables["nowtime"] == hour:  # else the hour turned between date and backupninja
        now_files = ("10-a.kvm", "11-now.sh", "12-now-minutes.sh", "13-day.sh", "17-two.sh")
        assert {bn.path(n) for n in now_files} <= set(ran)


def test_a_later_file_refused_by_check_perms_is_predicted(bn):
    for name in NAMES:
        bn.action(name)
    os.chmod(bn.path("50-data.rsync"), 0o644)
    ran = bn.run("--now")
    assert ran == [bn.path("10-a.kvm"), bn.path("100-late.sh")]
    prediction = ninja_run.predict(Context.from_variables(bn.handler_variables()))
    assert prediction.run() == ran
    assert prediction.ended_by == bn.path("50-data.rsync")
    refusals = ninja_run.freeze_refusals(
        Context.from_variables(bn.handler_variables()), "/nonexistent/view"
    )
    assert any("50-data.rsync would end backupninja" in line for line in refusals)


# ----------------------------------------------------------------------------
# excludes, against the real rsync, borg and restic: does the view folder
# (or a folder above it) get dropped? {r} is the scratch root standing for /.

EXCLUDES = [
    ("rsync", "*.bnkvm-*.qcow2"),
    ("rsync", "/lib/backupninja-kvm"),
    ("rsync", "/lib/backupninja-kvm/"),
    ("rsync", "lib/backupninja-kvm"),
    ("rsync", "backupninja-kvm"),
    ("rsync", "view"),
    ("rsync", "/var/lib/backupninja-kvm"),
    ("rsync", "b*"),
    ("rsync", "/lib"),
    ("rsync", "lib/*/view"),
    ("rsync", "/l*/backupninja-kvm"),
    ("borg", "{r}/var/lib/backupninja-kvm"),
    ("borg", "{r}/var/lib"),
    ("borg", "{r}/var/lib/backupninja-kvm/view"),
    ("borg", "{r}/var/lib/backupninja-kvm/"),
    ("borg", "{r}/var/lib/libvirt"),
    ("borg", "*.bnkvm-*.qcow2"),
    ("borg", "{r}/var/*/backupninja-kvm"),
    ("borg", "pp:{r}/var/lib"),
    ("borg", "pp:{r}/var/li"),
    ("borg", "re:backupninja-kvm"),
    ("borg", "re:^nomatch"),
    ("borg", "sh:{r}/var/lib/*"),
    ("borg", "sh:{r}/var/*/view"),
    ("borg", "fm:{r}/var/l*"),
    ("restic", "{r}/var/lib/backupninja-kvm"),
    ("restic", "{r}/var/lib/backupninja-kvm/"),
    ("restic", "backupninja-kvm"),
    ("restic", "lib/backupninja-kvm"),
    ("restic", "*.bnkvm-*.qcow2"),
    ("restic", "{r}/var/cache"),
    ("restic", "view"),
    ("restic", "{r}/var/*/backupninja-kvm"),
    ("restic", "{r}/var/li*"),
]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("excludes"))
    os.makedirs(f"{root}/r/var/lib/backupninja-kvm/view/vm")
    with open(f"{root}/r/var/lib/backupninja-kvm/view/vm/disk", "w") as handle:
        handle.write("data")
    env = dict(
        os.environ,
        LC_ALL="C",
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_BASE_DIR=f"{root}/borg-base",
        RESTIC_PASSWORD="scratch",
        RESTIC_CACHE_DIR=f"{root}/restic-cache",
    )
    if shutil.which("borg"):
        subprocess.run(["borg", "init", "-e", "none", f"{root}/borg"], env=env, check=True)
    if shutil.which("restic"):
        subprocess.run(["restic", "-q", "-r", f"{root}/restic", "init"], env=env, check=True)
    return root, env


def _tool_keeps_view(kind: str, pattern: str, root: str, env: dict[str, str]) -> bool:
    source = f"{root}/r/var"
    view = f"{source}/lib/backupninja-kvm/view"
    if kind == "rsync":
        argv = ["rsync", "-a", "--dry-run", "--out-format=%n", f"--exclude={pattern}"]
        out = subprocess.run(
            [*argv, f"{source}/", f"{root}/dest/"], env=env, capture_output=True, text=True
        )
        return "lib/backupninja-kvm/view/" in out.stdout.splitlines()
    if kind == "borg":
        argv = ["borg", "create", "--dry-run", "--list", "--exclude", pattern]
        out = subprocess.run(
            [*argv, f"{root}/borg::a", source], env=env, capture_output=True, text=True
        )
        return f"- {view}" in (out.stdout + out.stderr).splitlines()
    argv = ["restic", "-r", f"{root}/restic", "backup", "--dry-run", "-vv", "--exclude", pattern]
    out = subprocess.run([*argv, source], env=env, capture_output=True, text=True)
    return any(line.split()[1:2] == [f"{view}/,"] for line in out.stdout.splitlines())


@pytest.mark.parametrize(("kind", "template"), EXCLUDES)
def test_exclude_prediction_matches_the_real_tool(tools, kind, template):
    if not shutil.which(kind):
        pytest.skip(f"{kind} is not installed")
    root, env = tools
    action = ninja_run.ShipAction(
        f"/b/20-v.{kind}", kind, "source", ("/var",), (template.format(r=""),)
    )
    predicted = ninja_run.reads(action, "/var/lib/backupninja-kvm/view")
    real = _tool_keeps_view(kind, template.format(r=f"{root}/r"), root, env)
    assert predicted is real, (
        f"{kind} exclude {template}: the tool {'keeps' if real else 'drops'} the view"
    )


def _real_handler_test_run(scratch: str, name: str, text: str) -> str:
    """Run one action through backupninja's own handler with --test; its log."""
    for folder in ("backup.d", "dest/host", "src/a", "src/b", "src/c d"):
        os.makedirs(f"{scratch}/{folder}", mode=0o700, exist_ok=True)
    conf = f"{scratch}/backupninja.conf"
    with open(conf, "w") as handle:
        handle.write(
            f"loglevel = 5\nreportemail =\nlogfile = {scratch}/backupninja.log\n"
            f"configdirectory = {scratch}/backup.d\nscriptdirectory = /usr/share/backupninja\n"
            "usecolors = no\n"
        )
    action = f"{scratch}/backup.d/{name}"
    with open(action, "w") as handle:
        handle.write(text)
    os.chmod(action, 0o600)
    try:
        subprocess.run(
            ["backupninja", "-f", conf, "--test", "--run", action],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, LC_ALL="C"),
        )
    finally:
        lock = "/var/lock/backupninja/" + action.replace("/", "_")
        if os.path.exists(lock):
            os.unlink(lock)
    with open(f"{scratch}/backupninja.log") as handle:
        return handle.read()


def test_rsync_keys_are_read_as_the_real_rsync_handler_reads_them(scratch):
    """backupninja's own rsync handler under --test (rsync --dry-run) logs each
    include it syncs and the command: read_ship_action must agree."""
    action = f"{scratch}/backup.d/20-v.rsync"
    text = (
        f"when = manual\n[general]\nlog = {scratch}/rsync.log\nmountpoint = {scratch}/dest\n"
        f"backupdir = host\nformat = mirror\n[source]\nfrom = local\n"
        f"include = {scratch}/src/a {scratch}/src/b\ninclude = {scratch}/src/c d\n"
        "exclude = *.bnkvm-*.qcow2\nexclude = /x y\n"
        "rsync_options = -aS --delete --recursive --out-format=file:%n\n[dest]\ndest = local\n"
    )
    log = _real_handler_test_run(scratch, "20-v.rsync", text)
    synced = re.findall(r"Info: Syncing (\S+) on ", log)
    command = re.search(r"Debug: .*su -c /usr/bin/rsync (.*?) --dry-run .*", log)
    assert command is not None, log
    excludes = re.findall(r"--exclude='([^']*)'", command.group(0))
    read = ninja_run.read_ship_action(action, text)
    assert read is not None
    # blanks split rsync's includes: "c d" is two includes (and two warnings)
    assert (
        list(read.includes)
        == synced
        == [
            f"{scratch}/src/a",
            f"{scratch}/src/b",
            f"{scratch}/src/c",
            "d",
        ]
    )
    assert list(read.excludes) == excludes == ["*.bnkvm-*.qcow2", "/x y"]
    assert " ".join(read.options) == command.group(1)
    assert read.format == "mirror" and not read.remote


def test_borg_keys_are_read_as_the_real_borg_handler_reads_them(scratch):
    """backupninja's own borg handler under --test logs its borg create command."""
    text = (
        f"when = manual\n[source]\ninclude = {scratch}/src/a\ninclude = {scratch}/src/c d\n"
        "exclude = *.bnkvm-*.qcow2\nexclude = /var/lib/libvirt\n"
        "create_options = --chunker-params fixed,4194304 --sparse\nignore_missing = yes\n"
        f"init = no\n[dest]\nhost = localhost\ndirectory = {scratch}/borg\narchive = vms\n"
    )
    log = _real_handler_test_run(scratch, "20-v.borg", text)
    command = re.search(r"Debug: .*borg create --stats --compression lz4 (.*)", log)
    assert command is not None, log
    read = ninja_run.read_ship_action(f"{scratch}/backup.d/20-v.borg", text)
    assert read is not None
    line = command.group(1)
    assert line.startswith(" ".join(read.options) + " ")
    assert re.findall(r"--exclude '([^']*)'", line) == list(read.excludes)
    assert re.findall(r"'([^']*)'", line.split("::vms", 1)[1]) == list(read.includes)
    assert read.includes == (f"{scratch}/src/a", f"{scratch}/src/c d")  # newlines only
    assert read.ignore_missing


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed")
def test_restic_keys_are_read_as_the_real_restic_handler_reads_them(scratch):
    """backupninja's own restic handler under --test logs its restic backup command."""
    subprocess.run(
        ["restic", "-q", "-r", f"{scratch}/restic", "init"],
        env=dict(os.environ, RESTIC_PASSWORD="scratch", RESTIC_CACHE_DIR=f"{scratch}/cache"),
        check=True,
        capture_output=True,
    )
    text = (
        f"when = manual\n[general]\nrun_backup = yes\nrepository = {scratch}/restic\n"
        f"password = scratch\ncache_dir = {scratch}/cache\n[backup]\n"
        f"include = {scratch}/src/a\ninclude = {scratch}/src/c d\n"
        "exclude = *.bnkvm-*.qcow2\nexclude = /var/lib/libvirt\none_file_system = no\n"
    )
    log = _real_handler_test_run(scratch, "20-v.restic", text)
    command = re.search(r"Debug: (restic backup .*)", log)
    assert command is not None, log
    line = command.group(1)
    read = ninja_run.read_ship_action(f"{scratch}/backup.d/20-v.restic", text)
    assert read is not None
    assert read.includes == (f"{scratch}/src/a", f"{scratch}/src/c d")
    for include in read.includes:
        assert f"'{include}'" in line
    assert re.findall(r"--exclude '([^']*)'", line) == list(read.excludes)
    # "no" turns it on too: [ -n "$one_file_system" ]
    assert read.one_file_system and "--one-file-system" in line
