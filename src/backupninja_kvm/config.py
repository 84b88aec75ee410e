"""The ``.kvm`` action file: one schema, loading with every problem at once, rendering.

The configspec below is the single source of truth for keys, types, defaults
and help. ``examples/example.kvm`` and ``backupninja-kvm example-config`` are
rendered from it, and a test fails if the example drifts.

The file is also read by backupninja itself (for ``when``), so we keep to the
dialect both parsers read alike: one key per line, comma-separated lists, no
``#`` inside values, no line continuations. ``when`` may repeat; we blank those
lines before parsing so that line numbers stay true.
"""

from __future__ import annotations

import difflib
import fnmatch
import grp
import os
import re
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from validate import (
    Validator,
    VdtValueError,
    VdtValueTooBigError,
    VdtValueTooSmallError,
)

from backupninja_kvm.errors import BackupNinjaKvmError, ConfigError
from backupninja_kvm.retention import Policy
from backupninja_kvm.transfer import Remote

CONFIGSPEC = """\
# Lines starting with "when" belong to backupninja: they say when the action
# runs (for example "when = everyday at 01:00"); they may repeat.

[general]
# What this action does. "full": freeze, copy to the destination and merge back,
# domain after domain.
# "freeze" and "thaw" ride along in backupninja's own .rsync, .borg or .restic
# actions: "freeze" freezes the domains and exposes their frozen images
# read-only in the view; a later ship action that includes the view copies
# them; a later "thaw" action merges them back. The freeze refuses to freeze
# (Fatal) when no thaw and no ship action of the view predictably run after it
# in this backupninja run. [dest] is not used by freeze and thaw, and a thaw
# has no domains: it thaws what the freeze with the same view froze.
stage = option('full', 'freeze', 'thaw', default='full')
# stage = freeze and thaw: the folder where the frozen images are exposed, as
# VIEW/DOMAIN/TARGET-IMAGENAME (read-only bind mounts), VIEW/DOMAIN/domain.xml
# and VIEW/DOMAIN/manifest.json; the ship action includes it. A freeze and its
# thaw name the same view.
view = string(default='/var/lib/backupninja-kvm/view')
# stage = freeze: the longest a domain stays frozen. A guard process merges the
# domains back when this has passed, or as soon as backupninja ends without
# running the thaw (a Halt, a kill, a later action file with bad permissions).
# A number with s, m or h (seconds, minutes, hours).
max_frozen = string(default='12h')
# How the overlay goes back into the image after the copy.
# "commit": active block commit + pivot; the VM returns to its own image files,
# and the cost is proportional to what the guest wrote during the backup.
# "pull": the classic blockpull; the whole image is copied into the overlay,
# which becomes the VM's disk for good (its path changes, raw disks become
# qcow2). Your original image is kept, unused, with a Warning naming it;
# an image an earlier pull made is deleted once superseded and the set is
# complete. Set file names stay the same from night to night.
merge = option('commit', 'pull', default='commit')
# Seconds to wait for a merge job to become ready (commit) or to finish (pull).
merge_timeout = integer(min=1, max=604800, default=600)
# Bandwidth cap for the merge job in MiB/s; 0 means unlimited.
bandwidth = integer(min=0, max=1048576, default=0)
# Freeze the guest's filesystems (QEMU guest agent, fsfreeze) for the instant
# of the snapshot, so that the images are clean, not only crash-consistent.
# "auto": when the domain has a guest agent channel; an agent that does not
# answer is a Warning and the snapshot is crash-consistent.
# "yes": required; a domain that cannot be frozen is an Error, not backed up.
# "no": never; crash-consistent snapshots, as after a power cut.
quiesce = option('auto', 'yes', 'no', default='auto')
# Seconds to wait for the guest agent to freeze the filesystems (its fsfreeze
# hooks included). A freeze not done in time counts as not answered; as it may
# still complete in the guest, the agent is then asked to thaw for up to this
# long again (at least a minute) before the snapshot is taken.
quiesce_timeout = integer(min=1, max=3600, default=60)

[source]
# libvirt connection URI: a local one (the images are read from this host's files).
uri = string(default='qemu:///system')
# Domains to back up (required): "all", or a comma-separated list of names.
domains = force_list()
# Domains to leave out: comma-separated names or shell patterns (web*, test-?).
exclude = force_list(default=list())
# Disks to leave out, as DOMAIN:TARGET pairs, comma-separated; both parts take
# shell patterns: "web1:vdb, *:vdc" leaves out vdb of web1 and vdc of every
# domain. A disk left out is an Info line (you asked for it), and its data is
# in no set; it never stops the pruning of older sets.
exclude_disks = force_list(default=list())
# Directory for the temporary overlays; empty means next to each image, which
# is the safest choice (same filesystem, same AppArmor rules). Block-device
# disks (LVM volumes) are backed up only when it is set: their overlay is a
# file here, as a device has no folder beside it.
overlaydir = string(default='')
# Free space (MiB) required where the overlays go before a domain is frozen:
# the guest's writes during the backup must fit, or QEMU pauses it. 0 = no check.
overlay_reserve = integer(min=0, max=16777216, default=1024)
# A disk's backing files (a chain made by `virsh snapshot-create-as
# --disk-only`, or a base image) that belong to no other domain hold the VM's
# own data. "chain": copy them into the set with the disk, each copy pointing
# at the next by a relative name, so that the set restores on its own (safe;
# costs their size at the destination). "top": copy only the disk's top
# layer; each such backing file left out is a Warning, as the set cannot be
# restored without it. A template that another domain also uses is never
# copied (an Info says the set needs it).
backing = option('chain', 'top', default='chain')

[dest]
# Where the backup sets go. "local": a directory on this host (sparse copy).
# "remote": a directory on another host, reached with ssh and written with
# rsync (see host, user, port, sshoptions).
dest = option('local', 'remote', default='local')
# Backup sets are written to DIRECTORY/DOMAIN/TIMESTAMP/ with a B3SUMS
# manifest (check with `b3sum -c B3SUMS`), and DIRECTORY/DOMAIN/latest
# points at the newest complete set.
# With dest = remote, DIRECTORY is a path on the remote host.
directory = string(default='/var/backups/kvm')
# dest = remote: the host, the ssh user and port, and extra ssh options
# (for example: -i /root/.ssh/id_backup). Login must work without a password.
host = string(default='')
user = string(default='root')
port = integer(min=1, max=65535, default=22)
sshoptions = string(default='')
# dest = remote: send only what changed since the previous set (rsync's delta
# transfer, the previous set's image as the basis; the remote host reads that
# image). "no": send whole images (less CPU; faster on a fast network).
delta = boolean(default=True)
# Make each set of a running domain's qcow2 disk from the previous set and
# only what changed since (a libvirt checkpoint, a dirty bitmap in the image,
# started just before each freeze): the night reads and writes the changed
# blocks and the domain spends only their copy on the overlay. Every set is
# still a complete image with its own manifest. On XFS or btrfs the new image
# shares the previous one's unchanged extents (reflink); elsewhere it starts
# as a copy of the previous set's file, made at the destination before the
# freeze. dest = remote: only the changes are sent, and the remote host
# builds the new image from its previous one (it needs qemu-img). A disk is
# copied whole, with an Info line saying why, whenever the chain cannot be
# proven intact (no previous set, a checkpoint gone or inconsistent after a
# crash, a restart, a resize, a replaced image...). Raw images and block
# devices are always copied whole (libvirt 9.0 keeps no bitmap for them).
# "no": whole copies, no checkpoint.
changed_blocks = option('auto', 'no', default='auto')
# changed_blocks = auto: copy each disk whole after this many changed-only
# sets in a row, which also catches what no bitmap sees (an image written
# while its domain was running elsewhere). 0: never for that reason alone.
full_every = integer(min=0, max=100000, default=30)
# Number of complete backup sets with disk images kept per domain; older ones
# are removed. A set that lacks a disk's data (a disk skipped with a Warning)
# removes none, so that the sets holding that disk survive.
keep = integer(min=1, max=100000, default=7)
# Calendar retention, besides keep (as borg prune --keep-daily ...): also
# keep the newest set of each of the last keep_daily days, keep_weekly ISO
# weeks, keep_monthly months and keep_yearly years that have a set, in the
# local time of the run (TZ). Days or months without a set do not count; a
# set kept by keep, or by an earlier rule (daily before weekly before
# monthly before yearly), is not counted again; a rule that runs out of
# sets keeps the oldest one. 0: off. Sets without images never count.
keep_daily = integer(min=0, max=100000, default=0)
keep_weekly = integer(min=0, max=100000, default=0)
keep_monthly = integer(min=0, max=100000, default=0)
keep_yearly = integer(min=0, max=100000, default=0)
# dest = local: "yes" when DIRECTORY must be a mount point (a USB disk, a
# NAS share): when it is not mounted, nothing is backed up (Fatal) instead
# of filling the empty folder under it on the root filesystem.
require_mount = boolean(default=False)
# Verify each new set once the domain is back on its own images (never while
# it runs on the overlay), as `backupninja-kvm verify` does: the manifest's
# sums, each image's structure (qemu-img check), the definition. The result is
# kept in the set (checks.json; `backupninja-kvm sets` shows it); a set that
# fails is an Error. Costs one more read of the set (on the remote host for
# dest = remote).
verify = boolean(default=False)
# dest = local: boot each new set as a throwaway guest once the domain is
# back on its own images, as `backupninja-kvm rehearse` does (temporary
# overlays above the set, which is never written; no network; a new name and
# UUID), and say whether it came up: its QEMU guest agent answers, or
# rehearse_pattern appears on its serial console. The result is kept in the
# set. A set that does not boot is an Error and, like a set that fails its
# verification, prunes no older set. Costs a boot per domain and night.
rehearse = boolean(default=False)
# rehearse = yes: how long a guest may take to come up, in seconds.
rehearse_timeout = integer(min=1, max=86400, default=300)
# rehearse = yes: a regular expression that the guest prints on its serial
# console once it is up (for example "login:"); empty: wait for the guest
# agent instead (the domain needs the org.qemu.guest_agent.0 channel).
rehearse_pattern = string(default='')
"""

DEFAULT_VIEW = "/var/lib/backupninja-kvm/view"
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.:%][A-Za-z0-9_.:%-]*)$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.$-]*$")
_KEY_LINE = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=")
_SECTION_LINE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
_WHEN_LINE = re.compile(r"^\s*when\s*=", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """A validated action file."""

    path: str
    stage: str
    merge: str
    merge_timeout: int
    bandwidth: int
    quiesce: str
    quiesce_timeout: int
    uri: str
    domains: tuple[str, ...]  # empty tuple means "all"
    exclude: tuple[str, ...]
    overlaydir: str
    overlay_reserve: int
    dest: str
    directory: str
    keep: int
    host: str
    user: str
    port: int
    sshoptions: str
    delta: bool
    lines: dict[tuple[str, str], int]  # (section, key) -> line number, for messages
    backing: str = "chain"  # [source] backing: chain or top
    require_mount: bool = False
    verify: bool = False  # [dest] verify: each new set, after the merge
    exclude_disks: tuple[tuple[str, str], ...] = ()  # [source] (domain, target) patterns
    rehearse: bool = False  # [dest] rehearse: boot each new set, after the merge
    rehearse_timeout: int = 300
    rehearse_pattern: str = ""
    keep_daily: int = 0  # [dest] keep_daily ...: calendar retention (retention.py)
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    changed_blocks: str = "auto"  # [dest] changed_blocks: auto or no (changed.py)
    full_every: int = 30
    view: str = "/var/lib/backupninja-kvm/view"  # stage = freeze and thaw
    max_frozen: int = 12 * 3600  # seconds, stage = freeze

    def where(self, section: str, key: str) -> str:
        """``FILE line N: [section] key`` for messages about a value."""
        return where(self.path, self.lines, section, key)

    def retention(self) -> Policy:
        """[dest] keep and keep_daily ... as the policy ``retention.plan`` takes."""
        return Policy(
            self.keep, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly
        )

    def remote(self) -> Remote:
        """The remote destination host (dest = remote)."""
        return make_remote(self.host, self.user, self.port, self.sshoptions)

    def is_excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)


def make_remote(host: str, user: str, port: int, sshoptions: str) -> Remote:
    return Remote(
        str(host).strip(), str(user).strip() or "root", int(port), tuple(shlex.split(sshoptions))
    )


def where(path: str, lines: dict[tuple[str, str], int], section: str, key: str) -> str:
    line = lines.get((section, key))
    at = f" line {line}" if line else ""
    return f"{path}{at}: [{section}] {key}" if section else f"{path}{at}: {key}"


def _index_lines(text_lines: list[str]) -> dict[tuple[str, str], int]:
    index: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text_lines, start=1):
        if line.lstrip().startswith("#"):
            continue
        if match := _SECTION_LINE.match(line):
            section = match.group(1)
            index.setdefault(("", f"[{section}]"), number)
        elif match := _KEY_LINE.match(line):
            index.setdefault((section, match.group(1)), number)
    return index


def _spec() -> ConfigObj:
    return ConfigObj(CONFIGSPEC.splitlines(), list_values=False, _inspec=True)


def _clean_list(values) -> tuple[str, ...]:
    # configobj already trims unquoted items; a quoted name keeps its spaces.
    return tuple(v for v in values if v and v.strip())


def load(
    path: str | os.PathLike,
    list_domains: Callable[[str], list[str]] | None = None,
    check_remote: Callable[[Remote, str], None] | None = None,
) -> Settings:
    """Read and validate an action file.

    Raises ConfigError listing every problem, each with its line and key.
    With *list_domains* (uri -> names of the domains libvirt knows, raising
    BackupNinjaKvmError when it cannot tell), libvirt must answer at the
    (local) uri; a name it does not know is left to the run, which reports
    it as an Error of its own. With *check_remote* (raising
    BackupNinjaKvmError when the remote destination is unusable), the remote
    host and directory are checked too, in the same pass.
    """
    path = str(path)
    # "\n" only, as backupninja counts lines (str.splitlines also splits at
    # form feeds and other separators, and line numbers would drift).
    raw_lines = read_text(path).replace("\r\n", "\n").split("\n")
    lines = [("" if _WHEN_LINE.match(line) else line) for line in raw_lines]
    index = _index_lines(lines)
    try:
        # No interpolation: "%(name)s" in a value is text (a domain name, a
        # path), as backupninja reads it, never a reference to another key.
        config = ConfigObj(
            lines,
            configspec=_spec(),
            file_error=False,
            raise_errors=False,
            interpolation=False,
        )
    except ConfigObjError as parse_error:
        errors = getattr(parse_error, "errors", [parse_error])
        raise ConfigError(path, [_describe_parse_error(path, lines, e) for e in errors]) from None

    problems = _remove_nested_sections(path, lines, config)
    general_in = config.get("general")
    stage = general_in.get("stage", "full") if isinstance(general_in, dict) else "full"
    result = config.validate(Validator(), preserve_errors=True)
    invalid: set[tuple[str, str]] = set()
    for sections, key, failure in flatten_errors(config, result):
        section = sections[0] if sections else ""
        if key is None:
            problems.append((0, f"{path}: section [{section}] is malformed"))
            continue
        if (section, key) == ("source", "domains") and not failure and stage == "thaw":
            continue  # a thaw thaws what its freeze froze
        invalid.add((section, key))
        if (section, key) == ("source", "domains") and not failure:
            reason = f"missing: {_WRITE_ALL}"
        else:
            reason = str(failure).rstrip(".") if failure else "missing value"
            reason += _allowed_values(section, key) + _allowed_range(section, key, failure)
        line = index.get((section, key), 0)
        problems.append((line, f"{where(path, index, section, key)}: {reason}"))
    spec = _spec()
    for sections, name in get_extra_values(config):
        section = sections[0] if sections else ""
        if not sections and isinstance(config.get(name), dict):
            known = spec.sections
            hint = _did_you_mean(name, known)
            line = index.get(("", f"[{name}]"), 0)
            at = f" line {line}" if line else ""
            problems.append((line, f"{path}{at}: unknown section [{name}]{hint}"))
        else:
            known = spec[section].scalars if section in spec else []
            hint = _belongs_in(name, section, spec) or _did_you_mean(name, known)
            line = index.get((section, name), 0)
            problems.append((line, f"{where(path, index, section, name)}: unknown key{hint}"))

    sections_ok = all(isinstance(config.get(name), dict) for name in ("source", "dest"))
    remote = sections_ok and config["dest"].get("dest") == "remote"
    riding = stage in ("freeze", "thaw")
    if sections_ok and riding:
        problems += _check_riding(path, index, config, stage, invalid)
    for section, key in (("dest", "directory"), ("source", "overlaydir")):
        if riding and section == "dest":
            continue  # freeze and thaw write no set
        if sections_ok and (section, key) not in invalid:
            value = str(config[section][key]).strip()
            line = index.get((section, key), 0)
            if remote and key == "directory":
                if not os.path.isabs(value):
                    place = where(path, index, section, key)
                    problems.append((line, f"{place}: {value!r} is not an absolute path"))
            elif value or key == "directory":
                for problem in _check_directory(path, index, section, key, value):
                    problems.append((line, problem))
    rehearse_ok = ("dest", "rehearse") not in invalid
    if sections_ok and remote and not riding and rehearse_ok and config["dest"]["rehearse"]:
        problems.append(
            (
                index.get(("dest", "rehearse"), 0),
                f"{where(path, index, 'dest', 'rehearse')}: needs dest = local (a "
                f"rehearsal boots the set from this host's files); rehearse remote sets "
                f"on their host",
            )
        )
    if sections_ok and ("source", "exclude_disks") not in invalid:
        problems += _check_exclude_disks(path, index, config["source"]["exclude_disks"])
    if sections_ok and ("dest", "rehearse_pattern") not in invalid:
        pattern = str(config["dest"]["rehearse_pattern"]).strip()
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(
                (
                    index.get(("dest", "rehearse_pattern"), 0),
                    f"{where(path, index, 'dest', 'rehearse_pattern')}: {pattern!r} is not a "
                    f"regular expression ({error})",
                )
            )
    remote_keys = {("dest", "host"), ("dest", "port"), ("dest", "directory")}
    if remote and not riding and not invalid & remote_keys:
        problems += _check_remote(path, index, config["dest"], check_remote)
    if sections_ok and ("source", "domains") not in invalid and stage != "thaw":
        problems += _check_domain_list(path, index, config["source"]["domains"])
    if sections_ok and ("source", "uri") not in invalid:
        uri_problems = _check_uri(path, index, str(config["source"]["uri"]))
        problems += uri_problems
        if list_domains and not uri_problems:
            problems += _check_hypervisor(path, index, str(config["source"]["uri"]), list_domains)
    if problems:
        raise ConfigError(path, [text for _, text in sorted(problems, key=lambda p: p[0])])

    general, source, dest = config["general"], config["source"], config["dest"]
    domains = _clean_list(source.get("domains") or [])
    settings = Settings(
        path=path,
        stage=general["stage"],
        merge=general["merge"],
        merge_timeout=general["merge_timeout"],
        bandwidth=general["bandwidth"],
        quiesce=general["quiesce"],
        quiesce_timeout=general["quiesce_timeout"],
        uri=source["uri"],
        domains=() if domains == ("all",) else domains,
        exclude=_clean_list(source["exclude"]),
        exclude_disks=tuple(
            (domain.strip(), target.strip())
            for domain, _, target in (item.rpartition(":") for item in source["exclude_disks"])
        ),
        overlaydir=source["overlaydir"].strip(),
        overlay_reserve=source["overlay_reserve"],
        dest=dest["dest"],
        directory=dest["directory"].strip(),
        keep=dest["keep"],
        host=dest["host"].strip(),
        user=dest["user"].strip(),
        port=dest["port"],
        sshoptions=dest["sshoptions"].strip(),
        delta=dest["delta"],
        lines=index,
        backing=source["backing"],
        require_mount=dest["require_mount"],
        verify=dest["verify"],
        rehearse=dest["rehearse"],
        rehearse_timeout=dest["rehearse_timeout"],
        rehearse_pattern=dest["rehearse_pattern"].strip(),
        keep_daily=dest["keep_daily"],
        keep_weekly=dest["keep_weekly"],
        keep_monthly=dest["keep_monthly"],
        keep_yearly=dest["keep_yearly"],
        changed_blocks=dest["changed_blocks"],
        full_every=dest["full_every"],
        view=os.path.normpath(general["view"].strip()),
        max_frozen=parse_duration(general["max_frozen"]) or 0,
    )
    return settings


_DURATION = re.compile(r"^\s*([0-9]+)\s*([smh]?)\s*$")
MAX_FROZEN_LIMIT = 7 * 24 * 3600


def parse_duration(text: str) -> int | None:
    """Seconds of ``90``, ``90s``, ``30m`` or ``12h``; None when malformed."""
    match = _DURATION.match(str(text))
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _check_riding(
    path: str,
    index: dict[tuple[str, str], int],
    config: ConfigObj,
    stage: str,
    invalid: set[tuple[str, str]],
) -> list[tuple[int, str]]:
    """The keys of stage = freeze and thaw: the view, max_frozen, and the
    keys that do not belong to the stage."""
    problems = []
    general = config["general"]
    view = str(general["view"]).strip()
    place = where(path, index, "general", "view")
    line = index.get(("general", "view"), 0)
    normal = os.path.normpath(view) if view else ""
    if not view or not os.path.isabs(view):
        problems.append((line, f"{place}: {view!r} is not an absolute path"))
    elif normal == "/" or any(
        normal == top or normal.startswith(top + "/") for top in ("/proc", "/sys", "/dev", "/tmp")
    ):
        problems.append(
            (
                line,
                f"{place}: {view} cannot hold the view (use a folder of its own, such as "
                "the default /var/lib/backupninja-kvm/view)",
            )
        )
    if stage == "freeze" and ("general", "max_frozen") not in invalid:
        seconds = parse_duration(general["max_frozen"])
        where_max = where(path, index, "general", "max_frozen")
        line_max = index.get(("general", "max_frozen"), 0)
        if seconds is None:
            problems.append(
                (
                    line_max,
                    f"{where_max}: {general['max_frozen']!r} is not a duration "
                    "(a number with s, m or h, such as 12h)",
                )
            )
        elif not 1 <= seconds <= MAX_FROZEN_LIMIT:
            problems.append((line_max, f"{where_max}: must be between 1s and 168h"))
    if stage == "thaw" and ("source", "domains") in index:
        problems.append(
            (
                index[("source", "domains")],
                f"{where(path, index, 'source', 'domains')}: "
                "stage = thaw has no domains: it thaws what the freeze with the same view froze; "
                "remove the key",
            )
        )
    return problems


def _remove_nested_sections(
    path: str, lines: list[str], config: ConfigObj
) -> list[tuple[int, str]]:
    """Our dialect has one level of sections; a ``[[sub]]`` is a problem, and
    is removed before validation (configobj's validate fails on some)."""
    problems = []
    for section in [config[name] for name in config.sections]:
        for name in list(section.sections):
            pattern = re.compile(rf"^\s*\[\[+\s*{re.escape(name)}\s*\]")
            line = next((n for n, text in enumerate(lines, 1) if pattern.match(text)), 0)
            at = f" line {line}" if line else ""
            problems.append(
                (
                    line,
                    f"{path}{at}: [[{name}]]: nested sections are not used "
                    "(one level of [section])",
                )
            )
            del section[name]
    return problems


def read_text(path: str) -> str:
    """The action file's text; ConfigError when it cannot be read or is not
    UTF-8 text (a Latin-1 comment, a binary file), naming the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            path, [f"{path}: cannot read the action file: {error.strerror}"]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        byte = data[error.start]
        raise ConfigError(
            path,
            [f"{path}: not UTF-8 text (byte {byte:#04x} at line {line}); save it as UTF-8"],
        ) from None
    if text.startswith("\ufeff"):  # what some Windows editors write
        raise ConfigError(
            path,
            [
                f"{path}: starts with a byte order mark (BOM), which backupninja's parser "
                "does not expect: save it as UTF-8 without BOM"
            ],
        )
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(path, [f"{path}: not a text file (a NUL byte at line {line})"])
    return text


def permission_problems(
    path: str, info: os.stat_result, group_name: str, admingroup: str = "root"
) -> list[str]:
    """What backupninja 1.2's check_perms refuses in a file or folder *info*
    (stat following links): not owned by root; any permission for others;
    any permission for a group other than root and *admingroup*."""
    problems = []
    mode = f"{stat.S_IMODE(info.st_mode):04o}"
    if info.st_uid != 0:
        problems.append(
            f"{path}: owned by uid {info.st_uid}, not root, which backupninja refuses: "
            f"chown root {path}"
        )
    # backupninja compares `stat %A`: a sticky or setgid bit shows in the
    # others' or the group's letters, so it counts as a permission there.
    if info.st_mode & (stat.S_IRWXO | stat.S_ISVTX):
        problems.append(
            f"{path}: mode {mode} opens it to every user, which backupninja refuses: "
            f"chmod o= {path}"
        )
    if (
        info.st_mode & (stat.S_IRWXG | stat.S_ISGID)
        and info.st_gid != 0
        and admingroup not in (str(info.st_gid), group_name)
    ):
        problems.append(
            f"{path}: mode {mode} opens it to group {group_name}, which backupninja refuses: "
            f"chmod g= {path}, or admingroup = {group_name} in backupninja.conf"
        )
    return problems


def check_permissions(path: str, admingroup: str = "root") -> None:
    """Refuse an action file that backupninja would refuse, as it does: the
    file and the folder its path names (``${file%/*}``) must be root's and
    closed to others, since its keys (sshoptions, uri) reach commands run as
    root. Raises ConfigError; a file that cannot be read is left to load().
    """
    problems = []
    folder = path.rsplit("/", 1)[0] if "/" in path else path
    for checked in dict.fromkeys([folder or "/", path]):
        try:
            info = os.stat(checked)
        except OSError:
            continue
        try:
            group_name = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group_name = str(info.st_gid)
        problems += permission_problems(checked, info, group_name, admingroup or "root")
    if problems:
        raise ConfigError(path, problems)


def _describe_parse_error(path: str, lines: list[str], error: Exception) -> str:
    line = getattr(error, "line_number", None)
    message = str(error).split(" at line")[0].rstrip(".")
    text = lines[line - 1] if line and 0 < line <= len(lines) else ""
    if message == "Duplicate keyword name" and (match := _KEY_LINE.match(text)):
        key = match.group(1)
        first = _first_line_of_key(lines, line or 0, key)
        also = f" (first set on line {first}; lists are comma-separated)" if first else ""
        return f"{path} line {line}: duplicate key {key}{also}"
    if message == "Duplicate section name" and (match := _SECTION_LINE.match(text)):
        return f"{path} line {line}: duplicate section [{match.group(1)}]"
    return f"{path} line {line}: {message}" if line else f"{path}: {message}"


def _first_line_of_key(lines: list[str], duplicate: int, key: str) -> int:
    """The line where *key* was first set in the section of line *duplicate*."""
    first = 0
    for number in range(duplicate - 1, 0, -1):
        text = lines[number - 1]
        if _SECTION_LINE.match(text):
            break
        if (match := _KEY_LINE.match(text)) and match.group(1) == key:
            first = number
    return first


# Required keys (no default in the schema) and the value the example shows.
_EXAMPLE_VALUES = {("source", "domains"): "all"}

_WRITE_ALL = "write domains = all to back up every domain, or list their names (comma-separated)"


def _check_exclude_disks(
    path: str, index: dict[tuple[str, str], int], items: list[str]
) -> list[tuple[int, str]]:
    place = where(path, index, "source", "exclude_disks")
    line = index.get(("source", "exclude_disks"), 0)
    bad = [
        item
        for item in _clean_list(items)
        if not item.rpartition(":")[0].strip() or not item.rpartition(":")[2].strip()
    ]
    if bad:
        return [
            (
                line,
                f"{place}: {', '.join(repr(b) for b in bad)}: not DOMAIN:TARGET (for example "
                f"web1:vdb, or *:vdc for every domain)",
            )
        ]
    return []


def _check_domain_list(
    path: str, index: dict[tuple[str, str], int], domains: list[str]
) -> list[tuple[int, str]]:
    names = _clean_list(domains)
    place = where(path, index, "source", "domains")
    line = index.get(("source", "domains"), 0)
    if not names:
        return [(line, f"{place}: empty: {_WRITE_ALL}")]
    if "all" in names and len(names) > 1:
        return [(line, f"{place}: use either all or a list of names, not both")]
    return []


def remote_uri_reason(uri: str) -> str:
    """Why *uri* does not reach the libvirtd of this host ("" when it does).

    The images are read from this host's files, so a connection to another
    host (any transport but the local socket, or a host name in the URI)
    would copy the wrong files or none.
    """
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9.-]*)(?:\+([A-Za-z0-9]+))?://([^/?#]*)(.*)", uri)
    if not match:
        return "not a URI of the form driver:///path"
    transport, authority = (match.group(2) or "").lower(), match.group(3)
    if transport not in ("", "unix"):
        return f"transport {transport}"
    if authority:
        return f"host {authority}"
    return ""


def _check_uri(path: str, index: dict[tuple[str, str], int], uri: str) -> list[tuple[int, str]]:
    reason = remote_uri_reason(uri.strip())
    if not reason:
        return []
    place = where(path, index, "source", "uri")
    return [
        (
            index.get(("source", "uri"), 0),
            f"{place}: {uri.strip()!r} is not a local libvirt connection ({reason}); the images "
            "are read from this host's files, so run the backup on the VMs' host with a local "
            "URI such as qemu:///system",
        )
    ]


def _allowed_range(section: str, key: str, failure) -> str:
    check = _spec()[section][key] if section else _spec()[key]
    if not isinstance(check, str) or not isinstance(failure, VdtValueError):
        return ""
    _, _, kwargs, _ = Validator()._parse_with_caching(check)
    low, high = kwargs.get("min"), kwargs.get("max")
    if isinstance(failure, VdtValueTooBigError) and high is not None:
        return f" (at most {high})"
    if isinstance(failure, VdtValueTooSmallError) and low is not None:
        return f" (at least {low})"
    return ""


def _belongs_in(name: str, section: str, spec: ConfigObj) -> str:
    """``(it belongs in [dest])`` for a known key written in another section."""
    homes = [other for other in spec.sections if other != section and name in spec[other].scalars]
    return f" (it belongs in [{homes[0]}])" if homes else ""


def _allowed_values(section: str, key: str) -> str:
    check = _spec()[section][key] if section else _spec()[key]
    if not isinstance(check, str):
        return ""
    name, args, _, _ = Validator()._parse_with_caching(check)
    return f" (one of: {', '.join(args)})" if name == "option" else ""


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_directory(
    path: str, index: dict[tuple[str, str], int], section: str, key: str, directory: str
) -> list[str]:
    place = where(path, index, section, key)
    if not os.path.isabs(directory):
        return [f"{place}: {directory!r} is not an absolute path"]
    if not os.path.isdir(directory):
        return [f"{place}: directory {directory} does not exist"]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [f"{place}: directory {directory} is not writable"]
    return []


def _check_remote(
    path: str,
    index: dict[tuple[str, str], int],
    dest,
    check_remote: Callable[[Remote, str], None] | None,
) -> list[tuple[int, str]]:
    place = where(path, index, "dest", "host")
    line = index.get(("dest", "host"), index.get(("dest", "dest"), 0))
    if not str(dest["host"]).strip():
        where_dest = where(path, index, "dest", "dest")
        return [(line, f"{where_dest}: remote needs a host (the [dest] host key)")]
    # ssh and rsync would read a value starting with "-" as an option.
    names = []
    for key, pattern, what in (
        ("host", _HOST, "a host name or address"),
        ("user", _USER, "a user name"),
    ):
        value = str(dest[key]).strip()
        if value and not pattern.match(value):
            names.append(
                (
                    index.get(("dest", key), line),
                    f"{where(path, index, 'dest', key)}: {value!r} is not {what}",
                )
            )
    if names:
        return names
    if check_remote is None:
        return []
    try:
        remote = make_remote(dest["host"], dest["user"], dest["port"], dest["sshoptions"])
    except ValueError as error:
        options = where(path, index, "dest", "sshoptions")
        return [(index.get(("dest", "sshoptions"), 0), f"{options}: {error}")]
    try:
        check_remote(remote, str(dest["directory"]).strip())
    except BackupNinjaKvmError as error:
        return [(line, f"{place}: {error}")]
    return []


def _check_hypervisor(
    path: str,
    index: dict[tuple[str, str], int],
    uri: str,
    list_domains: Callable[[str], list[str]],
) -> list[tuple[int, str]]:
    """libvirt answers at *uri*. Names it does not know are not a problem of
    the file: each is an Error of its own at run time, the others are backed
    up (a decommissioned VM must not stop the backup of the rest)."""
    try:
        list_domains(uri)
    except BackupNinjaKvmError as error:
        return [
            (index.get(("source", "uri"), 0), f"{where(path, index, 'source', 'uri')}: {error}")
        ]
    return []


def render_example() -> str:
    """The example action file: every key with its help and default."""
    spec = _spec()
    validator = Validator()
    out = [
        "# backupninja action: live backup of libvirt/KVM virtual machines",
        "# (rendered from the schema by `backupninja-kvm example-config`; do not edit by hand)",
        "#",
        "# Install as /etc/backup.d/NN-NAME.kvm, owned by root, mode 600.",
        "",
    ]
    out += [line for line in spec.initial_comment if line]
    out += ["when = everyday at 01:00", ""]
    for section_name in spec.sections:
        section = spec[section_name]
        out.append(f"[{section_name}]")
        for key in section.scalars:
            out += [c for c in section.comments.get(key, []) if c.strip()]
            try:
                default = validator.get_default_value(section[key])
            except KeyError:  # a required key: show the value most files start with
                default = _EXAMPLE_VALUES[(section_name, key)]
            if isinstance(default, list):
                default = ", ".join(default)
            out.append(f"{key} = {default}".rstrip())
        out.append("")
    return "\n".join(out)


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def render_man_page(version: str, date: str) -> str:
    """The action file's manual page, backupninja-kvm.kvm(5), in roff: the
    schema's comments as the keys' descriptions, so that it cannot drift."""
    spec = _spec()
    validator = Validator()
    out = [
        f'.TH BACKUPNINJA-KVM.KVM 5 "{date}" "backupninja-kvm {version}" "File formats"',
        ".SH NAME",
        "backupninja-kvm.kvm \\- backupninja action file for live backups of KVM virtual machines",
        ".SH SYNOPSIS",
        "/etc/backup.d/\\fINN\\-NAME\\fR.kvm",
        ".SH DESCRIPTION",
        "An action file of",
        ".BR backupninja (1)",
        "run by its kvm handler, which calls",
        ".BR backupninja\\-kvm (1).",
        "It must be owned by root, mode 600. Its keys, their defaults and their",
        "meaning follow (rendered from the schema; an example with every key:",
        "/usr/share/doc/backupninja\\-kvm/example.kvm, or",
        '.BR "backupninja\\-kvm example\\-config" ).',
        ".PP",
        *(_roff(line.lstrip("# ")) for line in spec.initial_comment if line.strip("# ")),
    ]
    for section_name in spec.sections:
        section = spec[section_name]
        out.append(f".SH [{section_name}]")
        # A key without a comment of its own shares the one above it (host, user...).
        groups: list[tuple[list[str], list[str]]] = []
        for key in section.scalars:
            comments = [c.lstrip("#").strip() for c in section.comments.get(key, [])]
            comments = [c for c in comments if c]
            try:
                default = validator.get_default_value(section[key])
            except KeyError:
                default = "(required)"
            if isinstance(default, bool):
                default = "yes" if default else "no"
            elif isinstance(default, list):
                default = ", ".join(default) or "(empty)"
            shown = f"\\fB{key}\\fR = {_roff(str(default))}".rstrip()
            if comments or not groups:
                groups.append(([shown], comments))
            else:
                groups[-1][0].append(shown)
        for shown_keys, comments in groups:
            out += [".TP", shown_keys[0]]
            for shown in shown_keys[1:]:
                out += [".TQ", shown]
            out += [_roff(c) for c in comments]
    out += [
        ".SH FILES",
        "/usr/share/doc/backupninja\\-kvm/example.kvm,",
        "/usr/share/doc/backupninja\\-kvm/ride\\-along/",
        ".SH SEE ALSO",
        ".BR backupninja\\-kvm (1),",
        ".BR backupninja (1),",
        ".BR ninjahelper (1)",
        "",
    ]
    return "\n".join(out)


def key_summary() -> str:
    """One line per section listing its keys, from the schema (for --help)."""
    spec = _spec()
    return "\n".join(
        f"  [{name}]".ljust(12) + ", ".join(spec[name].scalars) for name in spec.sections
    )
