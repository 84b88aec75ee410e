"""ninja_run: backupninja 1.2.2's order, skips, when, check_perms, getconf and
the ship actions' includes, replayed in Python (issue 9's freeze pre-flight)."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from backupninja_kvm import ninja_run
from backupninja_kvm.ninja_run import Context, Now, ShipAction

BACKUPNINJA = "/usr/sbin/backupninja"
PARSEINI = "/usr/lib/backupninja/parseini"
MONDAY_8TH_01H = Now("01", "8", "monday")

# ----------------------------------------------------------------------------
# when: isnow (l.209-270) and process_action (l.322-344)

IS_NOW = [
    ("everyday at 01", True),
    ("everyday at 01:00", True),
    ("Everyday at 01:30", True),
    ("daily at 01", True),
    ("everyday at 1", False),  # the hour needs two digits
    ("everyday at 02", False),
    ("everyday at 01:5", False),
    ("everyday 01", False),  # no 'at'
    ("monday at 01", True),
    ("Mondays at 01", True),
    ("tuesday at 01", False),
    ("8th at 01", True),
    ("8 at 01:00", True),
    ("08th at 01", True),
    ("9th at 01", False),
    ("8th at", False),
    ("8th at 1", False),
    ("manual", False),
    ("hourly", False),  # as one of several lines, hourly is not a weekday
    ("mondays", False),
]


@pytest.mark.parametrize(("when", "expected"), IS_NOW)
def test_is_now_matches_isnow(when, expected):
    assert ninja_run.is_now(when, MONDAY_8TH_01H) is expected


def _real_isnow(when: str, now: Now) -> bool:
    """backupninja's own isnow, cut out of /usr/sbin/backupninja and run by bash."""
    with open(BACKUPNINJA) as handle:
        script = handle.read()
    functions = "".join(
        re.search(r"^function " + name + r"\(\) \{.*?^\}\n", script, re.S | re.M).group(0)  # type: ignore[union-attr]
        for name in ("tolower", "toint", "isnow")
    )
    program = (
        "warning() { :; }\n" + functions + f"nowtime={now.hour}; nowday={now.day}; "
        f"nowdayofweek={now.weekday}\n" + 'isnow "$1"; echo $?\n'
    )
    result = subprocess.run(
        ["bash", "-c", program, "bash", when], capture_output=True, text=True, check=True
    )
    return result.stdout.strip() == "1"


@pytest.mark.skipif(not os.path.exists(BACKUPNINJA), reason="backupninja is not installed")
@pytest.mark.parametrize(("when", "expected"), IS_NOW)
def test_is_now_table_is_backupninjas_own_answer(when, expected):
    assert _real_isnow(when, MONDAY_8TH_01H) is expected


STARTS = [
    ("when = hourly\n", False, True, "hourly"),
    ("when = hourly\nwhen = everyday at 05\n", False, False, ""),  # not == "hourly"
    ("when = manual\n", False, False, ""),
    ("when = manual\n", True, True, "--now"),
    ("when = everyday at 05\nwhen = everyday at 01\n", False, True, "everyday at 01"),
    ("", False, True, "Everyday at 01:00"),  # the conffile's default
    ("[general]\nwhen = everyday at 05\n", False, True, "Everyday at 01:00"),  # in a section
    ("when = everyday at 05\n[general]\nwhen = everyday at 01\n", False, False, ""),
]


@pytest.mark.parametrize(("text", "processnow", "expected", "why"), STARTS)
def test_starts_as_process_action(text, processnow, expected, why):
    runs, reason = ninja_run.starts(text, "Everyday at 01:00", MONDAY_8TH_01H, processnow)
    assert runs is expected
    assert why in reason


# ----------------------------------------------------------------------------
# parseini / getconf

INI = textwrap.dedent(
    """\
    when = everyday at 01
    when = sunday at 02
    # include = /commented
    top = before
    [source]
    include = /var/lib/a
     include  =  /var/lib/b\t
    exclude = *.bnkvm-*.qcow2
    rsync_options = -aS \\
      --delete
    empty =
    [dest]
    include = /not/source
    [source]
    include = /again
    """
)

INI_CASES = [
    ("", "when", ["everyday at 01", "sunday at 02"]),
    ("", "top", ["before"]),
    ("", "include", []),
    ("source", "include", ["/var/lib/a", "/var/lib/b", "/again"]),
    ("source", "exclude", ["*.bnkvm-*.qcow2"]),
    # parseini never ends a continuation: every later line read is a value
    ("source", "rsync_options", ["-aS", "--delete", "empty =", "include = /again"]),
    ("source", "empty", []),
    ("source", "top", []),
    ("dest", "include", ["/not/source"]),
    ("missing", "include", []),
]


@pytest.mark.parametrize(("section", "key", "expected"), INI_CASES)
def test_ini_values_as_parseini(section, key, expected):
    assert ninja_run.ini_values(INI, section, key) == expected


@pytest.mark.skipif(not os.path.exists(PARSEINI), reason="backupninja is not installed")
@pytest.mark.parametrize(("section", "key", "expected"), INI_CASES)
def test_ini_table_is_parseinis_own_answer(tmp_path, section, key, expected):
    path = tmp_path / "action"
    path.write_text(INI)
    result = subprocess.run(
        ["awk", "-f", PARSEINI, f"S={section}", f"P={key}", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.stdout.splitlines() == expected


def test_ini_values_with_a_section_and_no_headers_gives_nothing():
    assert ninja_run.ini_values("include = /x\n", "source", "include") == []
    assert ninja_run.getconf("include = /x\n", "source", "include", "dflt") == "dflt"


# ----------------------------------------------------------------------------
# order and skips


def test_sort_is_lexicographic_in_c():
    names = ["/b/9-early.sh", "/b/50-data.rsync", "/b/100-late.sh", "/b/10-a.kvm", "/b/05-x"]
    assert ninja_run.sort_lines(names, "C") == [
        "/b/05-x",
        "/b/10-a.kvm",  # '-' sorts before '0'
        "/b/100-late.sh",
        "/b/50-data.rsync",
        "/b/9-early.sh",
    ]


@pytest.mark.parametrize("collation", ["C", "C.UTF-8", "POSIX", "xx_NO.LOCALE"])
def test_sort_matches_sort_n(tmp_path, collation):
    names = ["/b/9-early.sh", "/b/50-Data.rsync", "/b/100-late.sh", "/b/10-a.kvm", "/b/_x", "/b/a"]
    result = subprocess.run(
        ["sort", "-n"],
        input="\n".join(names) + "\n",
        capture_output=True,
        text=True,
        env=dict(os.environ, LC_ALL=collation),
    )
    assert ninja_run.sort_lines(names, collation) == result.stdout.splitlines()


def _conf(tmp_path: Path, files: dict[str, str], handlers=("kvm", "rsync", "sh")) -> Context:
    configdir = tmp_path / "backup.d"
    scripts = tmp_path / "scripts"
    configdir.mkdir(mode=0o700)
    scripts.mkdir()
    for handler in handlers:
        (scripts / handler).write_text("")
    for name, text in files.items():
        (configdir / name).write_text(text)
        os.chmod(configdir / name, 0o600)
    return Context(
        configdirectory=str(configdir),
        scriptdirectory=str(scripts),
        now=MONDAY_8TH_01H,
        file=str(configdir / "10-a.kvm"),
    )


def test_order_and_skips(tmp_path):
    names = ["05-x", "10-a.kvm", "100-late.sh", "50-data.rsync", "60-x.disabled"]
    names += ["9-early.sh", "noext", "20-x.sh~", ".30-x.sh.swp", "70-y.nohandler"]
    context = _conf(tmp_path, dict.fromkeys(names, ""))
    (tmp_path / "backup.d" / "80-dir.sh").mkdir()
    prediction = ninja_run.predict(context)
    d = context.configdirectory
    assert [step.path.rsplit("/", 1)[1] for step in prediction.steps] == [
        "05-x",
        "10-a.kvm",
        "100-late.sh",
        "50-data.rsync",
        "60-x.disabled",
        "70-y.nohandler",
        "9-early.sh",
        "noext",
    ]
    assert prediction.run() == [f"{d}/10-a.kvm", f"{d}/100-late.sh", f"{d}/50-data.rsync"] + [
        f"{d}/9-early.sh"
    ]
    assert [s.path for s in prediction.after(context.file)][:2] == [
        f"{d}/100-late.sh",
        f"{d}/50-data.rsync",
    ]


def test_files_variable_is_used_as_given(tmp_path):
    context = _conf(tmp_path, {"10-a.kvm": "", "20-b.sh": ""})
    d = context.configdirectory
    given = Context(**{**context.__dict__, "files": f"{d}/20-b.sh\n{d}/10-a.kvm"})
    assert ninja_run.predict(given).run() == [f"{d}/20-b.sh", f"{d}/10-a.kvm"]


def test_singlerun_runs_only_that_file(tmp_path):
    context = _conf(tmp_path, {"10-a.kvm": "", "90-b.kvm": "[general]\nstage = thaw\n"})
    alone = Context(**{**context.__dict__, "singlerun": context.file, "processnow": True})
    assert ninja_run.predict(alone).run() == [context.file]
    refusals = ninja_run.freeze_refusals(alone, "/var/lib/backupninja-kvm/view")
    assert len(refusals) == 1 and "--run" in refusals[0]


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "admingroup", "ends"),
    [
        (0o600, 0, 0, "root", False),
        (0o640, 0, 0, "root", False),  # group root is fine
        (0o644, 0, 0, "root", True),
        (0o640, 0, 4242, "root", True),
        (0o640, 0, 4242, "4242", False),  # admingroup
        (0o600, 1000, 0, "root", True),
    ],
)
def test_check_perms_of_a_later_file_ends_the_run(tmp_path, mode, uid, gid, admingroup, ends):
    context = _conf(tmp_path, {"10-a.kvm": "", "05-off": "", "90-b.sh": ""})
    context = Context(**{**context.__dict__, "admingroup": admingroup})
    target = f"{context.configdirectory}/05-off"  # skipped, but checked first

    def fake_stat(path):
        info = os.stat(path)
        if path != target:
            return info
        values = list(info)
        values[0], values[4], values[5] = (info.st_mode & ~0o7777) | mode, uid, gid
        return os.stat_result(values)

    prediction = ninja_run.predict(context, stat=fake_stat)
    assert (prediction.ended_by == target) is ends
    assert (f"{context.configdirectory}/90-b.sh" in prediction.run()) is not ends


# ----------------------------------------------------------------------------
# includes, excludes and what reads the view

VIEW = "/var/lib/backupninja-kvm/view"


def _action(kind, includes, excludes=(), **keys):
    section = "backup" if kind == "restic" else "source"
    return ShipAction(f"/b/20-v.{kind}", kind, section, tuple(includes), tuple(excludes), **keys)


@pytest.mark.parametrize(
    ("kind", "includes", "excludes", "expected"),
    [
        ("rsync", [VIEW], [], True),
        ("rsync", ["/var"], [], True),
        ("rsync", ["/var/lib/backupninja-kvm/view/vm1"], [], False),  # below: not all of it
        ("rsync", ["/var"], ["*.bnkvm-*.qcow2"], True),
        ("rsync", ["/var"], ["/lib/backupninja-kvm"], False),  # anchored at the include
        ("rsync", ["/var"], ["/lib/backupninja-kvm/"], False),
        ("rsync", ["/var"], ["lib/backupninja-kvm"], False),
        ("rsync", ["/var"], ["backupninja-kvm"], False),
        ("rsync", ["/var"], ["view"], False),
        ("rsync", ["/var"], ["/var/lib/backupninja-kvm"], True),  # rsync: relative to /var
        ("rsync", ["/var"], ["b*"], False),
        ("rsync", ["/etc", "/var"], ["/lib"], False),
        ("borg", ["/var"], ["/var/lib/backupninja-kvm"], False),
        ("borg", ["/var"], ["/var/lib"], False),
        ("borg", ["/var"], ["var/lib/backupninja-kvm/view"], False),
        ("borg", ["/var"], ["/var/lib/libvirt"], True),
        ("borg", ["/var"], ["*.bnkvm-*.qcow2"], True),
        ("borg", ["/var"], ["/var/*/backupninja-kvm"], False),
        ("borg", ["/var"], ["pp:/var/lib"], False),
        ("borg", ["/var"], ["re:backupninja-kvm"], False),
        ("borg", ["/var"], ["re:(unclosed"], True),  # no traceback for a bad pattern
        ("borg", ["/var"], ["sh:/var/lib/*"], False),
        ("restic", ["/var"], ["/var/lib/backupninja-kvm"], False),
        ("restic", ["/var"], ["backupninja-kvm"], False),
        ("restic", ["/var"], ["*.bnkvm-*.qcow2"], True),
        ("restic", ["/var"], ["/var/cache"], True),
        ("rsync", ["/"], [], True),
    ],
)
def test_reads_the_view(kind, includes, excludes, expected):
    assert ninja_run.reads(_action(kind, includes, excludes), VIEW) is expected


def test_remote_rsync_does_not_read_the_local_view():
    assert not ninja_run.reads(_action("rsync", [VIEW], remote=True), VIEW)


def test_read_ship_action_as_the_handlers_do():
    rsync = ninja_run.read_ship_action(
        "/b/20-v.rsync",
        "[general]\nformat = mirror\n[source]\ninclude = /var /etc\nexclude = a b\n"
        "exclude = *.qcow2\n",
    )
    assert rsync is not None
    assert rsync.includes == ("/var", "/etc")  # blanks split includes (rsync l.1155)
    assert rsync.excludes == ("a b", "*.qcow2")  # newlines only (l.280)
    assert rsync.options == ("-av", "--delete", "--recursive")  # the default
    assert rsync.format == "mirror"
    restic = ninja_run.read_ship_action(
        "/b/20-v.restic", "[backup]\ninclude = /my dir\none_file_system = no\n"
    )
    assert restic is not None and restic.includes == ("/my dir",)
    assert restic.one_file_system  # [ -n "$one_file_system" ]: any value turns it on
    borg = ninja_run.read_ship_action("/b/20-v.borg", "[source]\ninclude = /x\n")
    assert borg is not None and not borg.ignore_missing
    assert ninja_run.read_ship_action("/b/20-v.sh", "") is None


# ----------------------------------------------------------------------------
# lints

LINTS = [
    # (kind, includes, excludes, keys, expected fragments; empty = no lint)
    ("rsync", [VIEW], [], {"options": ("-aS", "--out-format=file:%n")}, []),
    ("rsync", [VIEW], [], {"options": ("-a", "--sparse")}, []),
    ("rsync", [VIEW], [], {"options": ("-a",)}, ["no -S"]),
    ("rsync", [VIEW], [], {"options": ("-avS",)}, ["has -v"]),
    ("rsync", [VIEW], [], {"options": ("-aS", "--verbose")}, ["has -v"]),
    ("rsync", [VIEW], [], {"options": ("-aS", "--inplace"), "format": "short"}, ["--inplace"]),
    ("rsync", [VIEW], [], {"options": ("-aS", "--inplace"), "format": "long"}, ["--inplace"]),
    ("rsync", [VIEW], [], {"options": ("-aS", "--inplace"), "format": "mirror"}, []),
    (
        "rsync",
        ["/var"],
        ["/lib/backupninja-kvm"],
        {"options": ("-a",)},
        ["also ships /var/lib/libvirt/images", "exclude = /lib/backupninja-kvm drops the view"],
    ),
    (
        "rsync",
        ["/var"],
        [],
        {"options": ("-aS",)},
        ["include = /var also ships /var/lib/libvirt/images"],
    ),
    ("rsync", ["/var"], ["/lib/libvirt/images"], {"options": ("-aS",)}, []),
    ("borg", [VIEW], [], {"ignore_missing": True}, ["ignore_missing = yes"]),
    ("borg", [VIEW], [], {}, []),
    ("borg", ["/var"], ["/var/lib/backupninja-kvm"], {}, ["also ships", "drops the view"]),
    ("borg", ["/"], ["/var/lib/libvirt"], {}, []),
    ("restic", [VIEW], [], {"one_file_system": True}, ["one_file_system"]),
    ("restic", [VIEW], [], {}, []),
    ("restic", ["/srv"], [], {"one_file_system": True}, []),  # does not read the view
]


@pytest.mark.parametrize(("kind", "includes", "excludes", "keys", "expected"), LINTS)
def test_lint_ship_action(kind, includes, excludes, keys, expected):
    action = _action(kind, includes, excludes, **keys)
    devices = {VIEW: 1, "/var": 1, "/srv": 1, "/": 1, "/images/vm1.raw": 2}
    lints = ninja_run.lint_ship_action(
        action,
        VIEW,
        live_dirs=["/var/lib/libvirt/images"],
        device_of=devices.get,
        image_paths=["/images/vm1.raw"],
    )
    assert len(lints) == len(expected), lints
    for lint, fragment in zip(lints, expected, strict=True):
        assert lint.level == "Warning"
        assert fragment in lint.message
        assert action.path in lint.message and f"[{action.section}]" in lint.message


def test_restic_one_file_system_same_filesystem_is_fine():
    action = _action("restic", [VIEW], one_file_system=True)
    lints = ninja_run.lint_ship_action(
        action, VIEW, device_of={VIEW: 1, "/img": 1}.get, image_paths=["/img"]
    )
    assert lints == []


# ----------------------------------------------------------------------------
# the freeze's refusals


def test_freeze_refusals(tmp_path):
    thaw = "[general]\nstage = thaw\n"
    ship = f"[source]\ninclude = {VIEW}\n"
    context = _conf(tmp_path, {"10-a.kvm": "", "20-v.rsync": ship, "90-t.kvm": thaw, "50-z.sh": ""})
    assert ninja_run.freeze_refusals(context, VIEW) == []
    assert "reads /elsewhere" in ninja_run.freeze_refusals(context, "/elsewhere")[0]
    Path(context.configdirectory, "90-t.kvm").write_text("when = everyday at 05\n" + thaw)
    assert "thaw that runs now" in ninja_run.freeze_refusals(context, VIEW)[0]
    now = Context(**{**context.__dict__, "processnow": True})
    assert ninja_run.freeze_refusals(now, VIEW) == []
    os.rename(Path(context.configdirectory, "90-t.kvm"), Path(context.configdirectory, "09-t.kvm"))
    assert "thaw" in ninja_run.freeze_refusals(now, VIEW)[0]


def test_freeze_refuses_when_the_ship_comes_after_the_thaw(tmp_path):
    context = _conf(
        tmp_path,
        {
            "10-a.kvm": "",
            "30-t.kvm": "[general]\nstage = thaw\n",
            "50-v.rsync": f"[source]\ninclude = {VIEW}\n",
        },
    )
    refusals = ninja_run.freeze_refusals(context, VIEW)
    assert len(refusals) == 1 and "between" in refusals[0]


def test_context_from_variables():
    context = Context.from_variables(
        {
            "configdirectory": "/c",
            "processnow": "1",
            "singlerun": "",
            "nowtime": "03",
            "nowday": "2",
            "nowdayofweek": "Wednesday",
            "LANG": "C.UTF-8",
        }
    )
    assert context.configdirectory == "/c" and context.processnow
    assert context.now == Now("03", "2", "wednesday")
    assert context.collation == "C.UTF-8" and context.files is None
