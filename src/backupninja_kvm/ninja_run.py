"""What the rest of this backupninja run will do, predicted from inside an action.

A ride-along freeze must not leave a VM frozen for a thaw that will not run,
nor let a ship action copy a wrong or bloated view. backupninja 1.2.2 decides
everything from files and a few shell variables, so the decision can be
replayed here (line numbers are those of ``/usr/sbin/backupninja``,
``/usr/lib/backupninja/{tools,parseini}`` and the rsync, borg and restic
handlers of 1.2.2):

- the action files: ``find $configdirectory -follow -mindepth 1 -maxdepth 1
  -type f ! -name '.*.swp' ! -name '*~' | sort -n`` (l.578). Every line has
  the same numeric key, so the order is the whole path in the collation of
  ``sort``'s locale: bytes in C/POSIX, so ``100-late`` before ``50-data``
  before ``9-early``;
- per file, in that order (l.585-604): gone files are passed over; then
  ``check_perms`` on its folder and on it, whose Fatal ends backupninja itself
  (skipped files included); then names starting with ``0``, ending in
  ``.disabled`` or without a suffix are skipped; a suffix without a handler
  script is an error;
- ``process_action`` (l.314-346): ``--now`` (also set by ``--run``), a
  ``when`` equal to ``hourly``, or a ``when`` line that ``isnow`` matches, on
  the time read once at start-up (l.204-207).

A handler is sourced in a subshell of backupninja's own shell (l.370-371), so
it sees that shell's variables, not an environment: the bash handler passes
the ones listed in ``HANDLER_VARIABLES`` on to the helper. Halts, kills and
locks are not predictable from files; they are the guard's business.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import locale
import os
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .config import permission_problems

# Shell variables of backupninja 1.2.2 that a handler sees and that this module
# reads (all set in the main shell before the loop; checked by the e2e test).
HANDLER_VARIABLES = (
    "configdirectory",  # l.513
    "scriptdirectory",  # l.514
    "admingroup",  # l.547
    "defaultwhen",  # l.527, the conffile's `when`
    "processnow",  # l.445 (--now), l.461 (--run)
    "singlerun",  # l.460, the file given to --run
    "files",  # l.576/578, the list being run
    "file",  # l.585, the action running now
    "nowtime",  # l.204, date +%H at start-up
    "nowday",  # l.205, date +%-d
    "nowdayofweek",  # l.206-207, lower-case English day name
    "usecolors",  # l.529
    "test",  # l.444 (--test)
    "debug",  # l.443/444/458
    "halts",  # l.568, halts so far
)

SHIP_SUFFIXES = ("rsync", "borg", "restic")
_TIME = re.compile(r"[0-9][0-9](:[0-9][0-9])?")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


# ----------------------------------------------------------------------------
# parseini and getconf


def ini_values(text: str, section: str, key: str) -> list[str]:
    """The values parseini prints for *key* in *section* ('' = before the first
    section header), in file order, as ``awk -f parseini S=section P=key``.

    Quirks kept: with a section, lines before the first header are dropped and
    a file without headers gives nothing; without one, reading stops at the
    first header. ``#`` lines (not ``#!``) and blank lines are dropped, empty
    values are dropped, and after a trailing backslash every later line read
    is a value of that key (parseini never resets its continuation).
    """
    section_line = re.compile(r"^\[.+\][ \r\t]*$")
    wanted = re.compile(r"^\[" + section + r"\][ \n]*") if section else None
    reading, implied = True, True
    lines: list[str] = []
    for line in text.split("\n"):
        if re.match(r"^#[^!]", line) or re.fullmatch(r"[ \r\t]*", line):
            continue
        if section_line.match(line):
            if section and implied:
                lines, implied = [], False
            reading = bool(wanted and wanted.match(line))
            continue
        if reading:
            lines.append(line)
    if section and implied:
        lines = []
    match = re.compile(r"^[ \r\t]*" + key + r"[ \r\t]*=")
    values: list[str] = []
    continued = False
    for value in lines:
        if continued:
            value = value.rstrip(" \r\t")
            if value.endswith("\\"):  # parseini never ends a continuation
                value = value[:-1].rstrip(" \r\t")
        elif match.match(value):
            value = match.sub("", value, count=1).strip(" \r\t")
            if value.endswith("\\"):
                continued = True
                value = value[:-1].rstrip(" \r\t")
        else:
            continue
        value = value.strip(" \r\t")
        if value:
            values.append(value)
    return values


def getconf(text: str, section: str, key: str, default: str = "") -> str:
    """The value ``getconf KEY DEFAULT`` gives a handler: parseini's lines
    joined by newlines, or *default* when there are none (tools l.202-217)."""
    value = "\n".join(ini_values(text, section, key))
    return value if value else default


# ----------------------------------------------------------------------------
# when


@dataclass(frozen=True)
class Now:
    """The time backupninja read at start-up (l.204-207)."""

    hour: str  # "01"
    day: str  # "8"
    weekday: str  # "monday"


def is_now(when: str, now: Now) -> bool:
    """Whether one ``when`` line matches as ``isnow`` (l.209-270) says (its
    return value is inverted: 1 means now). ``manual`` never matches; an hour
    without two digits (``at 1``) never matches."""
    if when == "manual":
        return False
    words = [word for word in re.split(r"[ \t\n]+", when) if word]  # set -- $when
    first, at, time = (words + ["", "", ""])[:3]
    day = re.sub(r"[^0-9]", "", first).lstrip("0")
    weekday = first.lower()
    if weekday in ("everyday", "daily"):
        weekday = now.weekday
    if not day:
        if weekday != now.weekday and weekday.removesuffix("s") != now.weekday:
            return False
    elif day != now.day or not time:
        return False
    if at != "at" or not _TIME.fullmatch(time):
        return False
    return time[:2] == now.hour


def when_lines(text: str, defaultwhen: str) -> list[str]:
    """The ``when`` values process_action loops over: the top part of the file
    (no section), else the conffile's default, split on tabs and newlines."""
    value = getconf(text, "", "when", defaultwhen)
    return [part for part in re.split(r"[\t\n]", value) if part]


def starts(text: str, defaultwhen: str, now: Now, processnow: bool) -> tuple[bool, str]:
    """Whether process_action starts an action with this text, and why."""
    if processnow:
        return True, "because of --now"
    value = getconf(text, "", "when", defaultwhen)
    if value == "hourly":
        return True, "because 'when = hourly'"
    for line in when_lines(text, defaultwhen):
        if is_now(line, now):
            return True, f"because current time matches {line}"
    return False, "current time matches no when line"


# ----------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class Context:
    """What backupninja's shell holds when it sources a handler."""

    configdirectory: str = "/etc/backup.d"
    scriptdirectory: str = "/usr/share/backupninja"
    admingroup: str = "root"
    defaultwhen: str = "Everyday at 01:00"
    processnow: bool = False
    singlerun: str = ""
    files: str | None = None  # None: list them as backupninja does
    file: str = ""
    now: Now = field(default_factory=lambda: Now("01", "1", "monday"))
    collation: str = "C"  # sort's LC_COLLATE

    @classmethod
    def from_variables(cls, variables: Mapping[str, str]) -> Context:
        """Read the HANDLER_VARIABLES the handler passed (plus LC_ALL,
        LC_COLLATE, LANG for sort's collation); missing ones keep
        backupninja's defaults."""
        get = variables.get
        return cls(
            configdirectory=get("configdirectory") or "/etc/backup.d",
            scriptdirectory=get("scriptdirectory") or "/usr/share/backupninja",
            admingroup=get("admingroup") or "root",
            defaultwhen=get("defaultwhen") or "Everyday at 01:00",
            processnow=get("processnow", "") == "1",
            singlerun=get("singlerun", ""),
            files=get("files"),
            file=get("file", ""),
            now=Now(get("nowtime") or "", get("nowday") or "", (get("nowdayofweek") or "").lower()),
            collation=get("LC_ALL") or get("LC_COLLATE") or get("LANG") or "C",
        )


@contextlib.contextmanager
def _collation(name: str) -> Iterator[bool]:
    """Switch LC_COLLATE to *name*; yields False when the locale does not
    exist (sort then collates as C too)."""
    previous = locale.setlocale(locale.LC_COLLATE)
    try:
        locale.setlocale(locale.LC_COLLATE, name)
    except locale.Error:
        yield False
        return
    try:
        yield True
    finally:
        locale.setlocale(locale.LC_COLLATE, previous)


def sort_lines(lines: Iterable[str], collation: str = "C") -> list[str]:
    """``sort -n`` of lines that all have the same numeric key (0): the last
    resort comparison, strcoll in *collation*, bytes in C/POSIX."""
    lines = list(lines)
    if collation not in ("C", "POSIX") and not collation.startswith("C."):
        with _collation(collation) as known:
            if known:
                return sorted(lines, key=lambda line: (locale.strxfrm(line), line))
    return sorted(lines, key=os.fsencode)


def action_files(configdirectory: str, collation: str = "C") -> list[str]:
    """The list backupninja 1.2.2 builds (l.578), as find prints the paths."""
    try:
        names = os.listdir(configdirectory)
    except OSError:
        return []
    found = []
    prefix = configdirectory.rstrip("/") + "/" if configdirectory.rstrip("/") else "/"
    for name in names:
        path = prefix + name
        if fnmatch.fnmatchcase(name, ".*.swp") or name.endswith("~"):
            continue
        if os.path.isfile(path):  # -follow -type f
            found.append(path)
    return sort_lines(found, collation)


@dataclass(frozen=True)
class Step:
    """One word of ``$files`` and what the loop does with it."""

    path: str
    runs: bool
    reason: str
    suffix: str = ""
    problems: tuple[str, ...] = ()  # check_perms: this one ends the run


@dataclass(frozen=True)
class Prediction:
    steps: tuple[Step, ...]
    ended_by: str = ""  # the file whose check_perms ends backupninja

    def after(self, path: str) -> tuple[Step, ...]:
        """The steps the loop reaches after *path* (all of them if absent)."""
        for index, step in enumerate(self.steps):
            if step.path == path:
                return self.steps[index + 1 :]
        return self.steps

    def run(self) -> list[str]:
        return [step.path for step in self.steps if step.runs]


def _perm_problems(path: str, admingroup: str, stat: Callable[[str], os.stat_result]) -> list[str]:
    try:
        info = stat(path)
    except OSError:
        return []  # stat fails, %A is empty: check_perms passes it
    try:
        group_name = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group_name = str(info.st_gid)
    return permission_problems(path, info, group_name, admingroup)


def predict(
    context: Context,
    *,
    stat: Callable[[str], os.stat_result] = os.stat,
    read: Callable[[str], str] | None = None,
) -> Prediction:
    """Replay backupninja's loop (l.575-604) on the files as they are now."""
    read = read or _read_text
    if context.singlerun:
        words = context.singlerun.split()
    elif context.files is not None:
        words = context.files.split()
    else:
        words = " ".join(action_files(context.configdirectory, context.collation)).split()
    steps = []
    for path in words:
        if not os.path.isfile(path):
            steps.append(Step(path, False, "not a file (a name with blanks, or gone)"))
            continue
        folder = path.rsplit("/", 1)[0] if "/" in path else path
        problems = tuple(
            _perm_problems(folder, context.admingroup, stat)
            + _perm_problems(path, context.admingroup, stat)
        )
        if problems:
            steps.append(Step(path, False, "check_perms ends backupninja here", "", problems))
            return Prediction(tuple(steps), ended_by=path)
        base = path.rsplit("/", 1)[-1]
        suffix = base.rsplit(".", 1)[-1]
        if base.startswith("0") or suffix == "disabled" or suffix == base:
            steps.append(Step(path, False, "skipped by its name", suffix))
            continue
        if not os.path.exists(os.path.join(context.scriptdirectory, suffix)):
            steps.append(Step(path, False, f"no handler script for suffix '{suffix}'", suffix))
            continue
        runs, reason = starts(read(path), context.defaultwhen, context.now, context.processnow)
        steps.append(Step(path, runs, reason, suffix))
    return Prediction(tuple(steps))


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------
# ship actions


@dataclass(frozen=True)
class ShipAction:
    """The keys of a .rsync, .borg or .restic action that decide what it reads."""

    path: str
    kind: str  # rsync | borg | restic
    section: str  # where include/exclude live
    includes: tuple[str, ...]
    excludes: tuple[str, ...]
    options: tuple[str, ...] = ()  # rsync_options (rsync), create_options (borg)
    format: str = ""  # rsync
    remote: bool = False  # rsync from = remote: reads another host
    ignore_missing: bool = False  # borg
    one_file_system: bool = False  # restic


def read_ship_action(path: str, text: str) -> ShipAction | None:
    """The ship keys as each 1.2.2 handler reads them, or None for other suffixes.

    rsync: ``for SECTION in $include`` splits on blanks (rsync l.1155), excludes
    on newlines (l.280); borg and restic split both on newlines only.
    """
    kind = path.rsplit(".", 1)[-1]
    if kind == "rsync":
        options = getconf(text, "source", "rsync_options", "-av --delete --recursive")
        try:
            words = tuple(shlex.split(options))
        except ValueError:
            words = tuple(options.split())
        return ShipAction(
            path,
            kind,
            "source",
            tuple(getconf(text, "source", "include").split()),
            tuple(_lines(getconf(text, "source", "exclude"))),
            words,
            getconf(text, "general", "format", "short"),
            remote=getconf(text, "source", "from", "local") == "remote",
        )
    if kind == "borg":
        options = getconf(text, "source", "create_options")
        return ShipAction(
            path,
            kind,
            "source",
            tuple(_lines(getconf(text, "source", "include"))),
            tuple(_lines(getconf(text, "source", "exclude"))),
            tuple(options.split()),
            ignore_missing=getconf(text, "source", "ignore_missing") == "yes",
        )
    if kind == "restic":
        return ShipAction(
            path,
            kind,
            "backup",
            tuple(_lines(getconf(text, "backup", "include"))),
            tuple(_lines(getconf(text, "backup", "exclude"))),
            # any value turns it on: [ -n "$one_file_system" ] (restic l.318)
            one_file_system=bool(getconf(text, "backup", "one_file_system")),
        )
    return None


def _lines(value: str) -> list[str]:
    return [line for line in value.split("\n") if line]


def _norm(path: str) -> str:
    return os.path.normpath("/" + path.strip("/")) if path else "/"


def _under(path: str, root: str) -> bool:
    """Whether *path* is *root* or inside it."""
    path, root = _norm(path), _norm(root)
    return root == "/" or path == root or path.startswith(root + "/")


def _ancestors(path: str, stop: str = "/") -> list[str]:
    """*path* and each folder above it, up to and including *stop*."""
    path, stop = _norm(path), _norm(stop)
    found = [path]
    while path != stop and path != "/":
        path = os.path.dirname(path)
        found.append(path)
    return found


def _match_tail(pattern: str, path: str, anchored: bool) -> bool:
    """Component-wise glob (``*`` stays within a component, ``**`` crosses):
    the whole *path* when anchored, else its last components."""
    if "**" in pattern:
        regex = fnmatch.translate(pattern.strip("/"))
        parts = path.strip("/")
        if anchored:
            return re.match(regex, parts) is not None
        pieces = parts.split("/")
        return any(re.match(regex, "/".join(pieces[i:])) for i in range(len(pieces)))
    wanted = [part for part in pattern.strip("/").split("/") if part]
    names = [part for part in path.strip("/").split("/") if part]
    if not wanted or len(wanted) > len(names):
        return False
    if anchored and len(wanted) != len(names):
        return False
    tail = names[-len(wanted) :]
    return all(fnmatch.fnmatchcase(part, want) for part, want in zip(tail, wanted, strict=True))


def exclude_drops(kind: str, pattern: str, include: str, path: str) -> bool:
    """Whether an exclude of a *kind* action drops *path* (or a folder above
    it) from what *include* ships.

    rsync: filter patterns relative to the include (the transfer root), a
    leading ``/`` anchors, a pattern without ``/`` matches a name. borg:
    ``fm:`` (default; leading ``/`` stripped, ``*`` crosses ``/``, matches a
    prefix at a separator), ``sh:``, ``re:``, ``pp:``, ``pf:``. restic: a
    pattern without a leading ``/`` matches the last components.
    """
    pattern = pattern.replace("__star__", "*")
    if kind == "rsync":
        rooted = _norm(include)
        for folder in _ancestors(path, rooted):
            if folder == rooted:
                break
            relative = folder[len(rooted) :] if rooted != "/" else folder
            body = pattern.rstrip("/")
            if "/" in body.lstrip("/") or body.startswith("/"):
                if _match_tail(body, relative, anchored=body.startswith("/")):
                    return True
            elif _match_tail(body, relative, anchored=False):
                return True
        return False
    if kind == "borg":
        style, colon, body = pattern.partition(":")
        if not (colon and style in ("fm", "sh", "re", "pp", "pf")):
            style, body = "fm", pattern
        for folder in _ancestors(path):
            target = folder.lstrip("/")
            if style == "re" and _search(body, target):
                return True
            if style == "pf" and _norm(body) == folder:
                return True
            if style == "pp" and _under(folder, body):
                return True
            if style == "sh" and _match_tail(body.rstrip("/"), folder, anchored=True):
                return True  # borg's sh: * stays within a name, ** crosses
            if style == "fm":
                glob = body.lstrip("/").rstrip("/")
                if fnmatch.fnmatchcase(target, glob) or fnmatch.fnmatchcase(target, glob + "/*"):
                    return True
        return False
    # restic
    for folder in _ancestors(path):
        if _match_tail(pattern.rstrip("/"), folder, anchored=pattern.startswith("/")):
            return True
    return False


def _search(regex: str, text: str) -> bool:
    """re.search, with a pattern borg would refuse counted as no match."""
    try:
        return re.search(regex, text) is not None
    except re.error:
        return False


def covering_include(action: ShipAction, path: str) -> str:
    """The include of *action* that is *path* or a folder above it and whose
    excludes keep *path*, else ''. A remote rsync source reads another host."""
    if action.remote:
        return ""
    for include in action.includes:
        if _under(path, include) and not any(
            exclude_drops(action.kind, pattern, include, path) for pattern in action.excludes
        ):
            return include
    return ""


def reads(action: ShipAction, view: str) -> bool:
    """Whether the action ships the view directory."""
    return bool(covering_include(action, view))


# ----------------------------------------------------------------------------
# lints


@dataclass(frozen=True)
class Lint:
    level: str  # "Warning" | "Error"
    message: str
    drops_view: bool = False  # an exclude of this action drops the view


def _short_options(options: Sequence[str]) -> str:
    """The letters of the single-dash option clusters."""
    return "".join(word[1:] for word in options if word.startswith("-") and word[1:2] != "-")


def lint_ship_action(
    action: ShipAction,
    view: str,
    live_dirs: Iterable[str] = (),
    device_of: Callable[[str], int | None] | None = None,
    image_paths: Iterable[str] = (),
) -> list[Lint]:
    """What in one ship action ships a wrong or bloated copy.

    *live_dirs*: the folders holding live images and overlays, which no ship
    action should read; *image_paths*: the frozen bases behind the view (for
    restic's one_file_system); *device_of*: st_dev of a path (os.stat).
    """
    device_of = device_of or _device
    where = f"{action.path} [{action.section}]"
    lints: list[Lint] = []
    for directory in live_dirs:
        include = covering_include(action, directory)
        if include:
            lints.append(
                Lint(
                    "Warning",
                    f"{where} include = {include} also ships {directory}, live images and "
                    f"overlays that change while they are read: add exclude = {directory} "
                    "(the view holds the frozen images)",
                )
            )
    view_include = next((inc for inc in action.includes if _under(view, inc)), "")
    if view_include and not action.remote:
        dropping = [
            pattern
            for pattern in action.excludes
            if exclude_drops(action.kind, pattern, view_include, view)
        ]
        for pattern in dropping:
            lints.append(
                Lint(
                    "Warning",
                    f"{where} exclude = {pattern} drops the view {view} that include = "
                    f"{view_include} would ship: the VM images are not in this copy",
                    drops_view=True,
                )
            )
    if not reads(action, view):
        return lints
    if action.kind == "rsync":
        letters = _short_options(action.options)
        words = set(action.options)
        opts = f"{action.path} [source] rsync_options"
        if "S" not in letters and "--sparse" not in words:
            lints.append(
                Lint(
                    "Warning",
                    f"{opts} has no -S (--sparse): raw images land fully allocated at the "
                    "destination; add -S",
                )
            )
        if "--inplace" in words and action.format in ("short", "long"):
            lints.append(
                Lint(
                    "Warning",
                    f"{opts} has --inplace with [general] format = {action.format}: rsync "
                    "rewrites the images that older rotations share through hard links; drop "
                    "--inplace or use format = mirror",
                )
            )
        if "v" in letters or "--verbose" in words:
            lints.append(
                Lint(
                    "Warning",
                    f"{opts} has -v: rsync prints file names at the start of lines, where "
                    "backupninja counts 'Halt:' and 'Fatal:' (a halt skips the thaw); use "
                    "--out-format=file:%n instead",
                )
            )
    if action.kind == "borg" and action.ignore_missing:
        lints.append(
            Lint(
                "Warning",
                f"{action.path} [source] ignore_missing = yes hides a missing view file: "
                "remove it, so that a missing VM image stays a Warning",
            )
        )
    if action.kind == "restic" and action.one_file_system:
        include_device = device_of(view_include)
        others = [
            image
            for image in image_paths
            if include_device is not None and device_of(image) not in (None, include_device)
        ]
        if others:
            lints.append(
                Lint(
                    "Warning",
                    f"{action.path} [backup] one_file_system is set and {', '.join(others)} "
                    f"is on another filesystem than {view_include}: restic silently leaves "
                    "such view files out; remove one_file_system",
                )
            )
    return lints


def _device(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


# ----------------------------------------------------------------------------
# the freeze's pre-flight


def is_kvm_thaw(path: str, text: str) -> bool:
    """A .kvm action with ``stage = thaw`` in [general] (the thaw's key)."""
    return path.endswith(".kvm") and getconf(text, "general", "stage") == "thaw"


def freeze_refusals(
    context: Context,
    view: str,
    *,
    is_thaw: Callable[[str, str], bool] = is_kvm_thaw,
    stat: Callable[[str], os.stat_result] = os.stat,
    read: Callable[[str], str] | None = None,
) -> list[str]:
    """Why a freeze in *context.file* would leave VMs frozen with no thaw in
    this run (each a Fatal line), or [] when a thaw and a ship action of the
    view predictably follow it."""
    read = read or _read_text
    where = context.file or "this action"
    if context.singlerun:
        return [
            f"{where} is run alone (backupninja --run): no thaw follows it, so nothing "
            "is frozen; run backupninja without --run, or use stage = full"
        ]
    prediction = predict(context, stat=stat, read=read)
    later = prediction.after(context.file)
    refusals = [
        f"{step.path} would end backupninja before it runs ({problem}): nothing is frozen"
        for step in later
        for problem in step.problems
    ]
    thaw = next((step for step in later if step.runs and is_thaw(step.path, read(step.path))), None)
    if thaw is None:
        refusals.append(
            f"no action after {where} in {context.configdirectory} is a thaw that runs now "
            "(its when must match as this one's, its name must not start with 0 nor end in "
            ".disabled): nothing is frozen"
        )
        return refusals
    shipping = [
        step
        for step in later[: later.index(thaw)]
        if step.runs
        and step.suffix in SHIP_SUFFIXES
        and (action := read_ship_action(step.path, read(step.path))) is not None
        and reads(action, view)
    ]
    if not shipping:
        refusals.append(
            f"no .rsync, .borg or .restic action between {where} and {thaw.path} runs now "
            f"and reads {view} (an include equal to or above it, no exclude dropping it): "
            "nothing is frozen"
        )
    return refusals


def ship_lints(
    context: Context,
    view: str,
    live_dirs: Iterable[str] = (),
    image_paths: Iterable[str] = (),
    *,
    read: Callable[[str], str] | None = None,
    stat: Callable[[str], os.stat_result] = os.stat,
) -> list[Lint]:
    """The lints of every ship action that runs after *context.file*."""
    read = read or _read_text
    lints: list[Lint] = []
    image_paths = list(image_paths)
    actions = [
        action
        for step in predict(context, stat=stat, read=read).after(context.file)
        if step.runs
        and step.suffix in SHIP_SUFFIXES
        and (action := read_ship_action(step.path, read(step.path))) is not None
    ]
    shipped = any(reads(action, view) for action in actions)
    for action in actions:
        found = lint_ship_action(action, view, live_dirs, image_paths=image_paths)
        # A data action excluding the view is right when another one ships it.
        lints += [lint for lint in found if not (shipped and lint.drops_view)]
    return lints
