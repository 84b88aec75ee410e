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
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from validate import Validator

from backupninja_kvm.errors import BackupNinjaKvmError, ConfigError
from backupninja_kvm.transfer import Remote

CONFIGSPEC = """\
# Lines starting with "when" belong to backupninja: they say when the action
# runs (for example "when = everyday at 01:00"); they may repeat.

[general]
# What this action does. "full": freeze, copy to the destination and merge back,
# domain after domain.
stage = option('full', default='full')
# How the overlay goes back into the image after the copy.
# "commit": active block commit + pivot; the VM returns to its own image files,
# and the cost is proportional to what the guest wrote during the backup.
# "pull": the classic blockpull; the whole image is copied into the overlay,
# which becomes the VM's disk for good (its path changes, raw disks become
# qcow2); the former image file is left in place, unused.
merge = option('commit', 'pull', default='commit')
# Seconds to wait for a merge job to become ready (commit) or to finish (pull).
merge_timeout = integer(min=1, default=600)
# Bandwidth cap for the merge job in MiB/s; 0 means unlimited.
bandwidth = integer(min=0, default=0)
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
quiesce_timeout = integer(min=1, default=60)

[source]
# libvirt connection URI.
uri = string(default='qemu:///system')
# Domains to back up: "all", or a comma-separated list of names.
domains = force_list(default=list('all'))
# Domains to leave out: comma-separated names or shell patterns (web*, test-?).
exclude = force_list(default=list())
# Directory for the temporary overlays; empty means next to each image, which
# is the safest choice (same filesystem, same AppArmor rules).
overlaydir = string(default='')
# Free space (MiB) required where the overlays go before a domain is frozen:
# the guest's writes during the backup must fit, or QEMU pauses it. 0 = no check.
overlay_reserve = integer(min=0, default=1024)

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
# Number of complete backup sets kept per domain; older ones are removed.
keep = integer(min=1, default=7)
# dest = local: "yes" when DIRECTORY must be a mount point (a USB disk, a
# NAS share): when it is not mounted, nothing is backed up (Fatal) instead
# of filling the empty folder under it on the root filesystem.
require_mount = boolean(default=False)
"""

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
    require_mount: bool = False

    def where(self, section: str, key: str) -> str:
        """``FILE line N: [section] key`` for messages about a value."""
        return where(self.path, self.lines, section, key)

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
    return tuple(v.strip() for v in values if v and v.strip())


def load(
    path: str | os.PathLike,
    list_domains: Callable[[str], list[str]] | None = None,
    check_remote: Callable[[Remote, str], None] | None = None,
) -> Settings:
    """Read and validate an action file.

    Raises ConfigError listing every problem, each with its line and key.
    With *list_domains* (uri -> names of the domains libvirt knows, raising
    BackupNinjaKvmError when it cannot tell), the domain names are checked
    too, in the same pass; with *check_remote* (raising BackupNinjaKvmError
    when the remote destination is unusable), the remote host and directory.
    """
    path = str(path)
    try:
        raw_lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ConfigError(
            path, [f"{path}: cannot read the action file: {error.strerror}"]
        ) from None
    lines = [("" if _WHEN_LINE.match(line) else line) for line in raw_lines]
    index = _index_lines(lines)
    try:
        config = ConfigObj(lines, configspec=_spec(), file_error=False, raise_errors=False)
    except ConfigObjError as parse_error:
        errors = getattr(parse_error, "errors", [parse_error])
        raise ConfigError(path, [_describe_parse_error(path, e) for e in errors]) from None

    problems: list[tuple[int, str]] = []
    result = config.validate(Validator(), preserve_errors=True)
    invalid: set[tuple[str, str]] = set()
    for sections, key, failure in flatten_errors(config, result):
        section = sections[0] if sections else ""
        if key is None:
            problems.append((0, f"{path}: section [{section}] is malformed"))
            continue
        invalid.add((section, key))
        reason = str(failure).rstrip(".") if failure else "missing value"
        reason += _allowed_values(section, key)
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
            hint = _did_you_mean(name, known)
            line = index.get((section, name), 0)
            problems.append((line, f"{where(path, index, section, name)}: unknown key{hint}"))

    sections_ok = all(isinstance(config.get(name), dict) for name in ("source", "dest"))
    remote = sections_ok and config["dest"].get("dest") == "remote"
    for section, key in (("dest", "directory"), ("source", "overlaydir")):
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
    if remote and not invalid & {("dest", "host"), ("dest", "port"), ("dest", "directory")}:
        problems += _check_remote(path, index, config["dest"], check_remote)
    if sections_ok and list_domains and not invalid & {("source", "uri"), ("source", "domains")}:
        problems += _check_domain_names(
            path, index, str(config["source"]["uri"]), config["source"]["domains"], list_domains
        )
    if problems:
        raise ConfigError(path, [text for _, text in sorted(problems, key=lambda p: p[0])])

    general, source, dest = config["general"], config["source"], config["dest"]
    domains = _clean_list(source["domains"])
    settings = Settings(
        path=path,
        stage=general["stage"],
        merge=general["merge"],
        merge_timeout=general["merge_timeout"],
        bandwidth=general["bandwidth"],
        quiesce=general["quiesce"],
        quiesce_timeout=general["quiesce_timeout"],
        uri=source["uri"],
        domains=() if domains in ((), ("all",)) else domains,
        exclude=_clean_list(source["exclude"]),
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
        require_mount=dest["require_mount"],
    )
    return settings


def _describe_parse_error(path: str, error: Exception) -> str:
    line = getattr(error, "line_number", None)
    message = str(error).split(" at line")[0].rstrip(".")
    return f"{path} line {line}: {message}" if line else f"{path}: {message}"


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


def _check_domain_names(
    path: str,
    index: dict[tuple[str, str], int],
    uri: str,
    domains: list[str],
    list_domains: Callable[[str], list[str]],
) -> list[tuple[int, str]]:
    names = [n for n in _clean_list(domains) if n != "all"]
    try:
        known = list_domains(uri)
    except BackupNinjaKvmError as error:
        return [
            (index.get(("source", "uri"), 0), f"{where(path, index, 'source', 'uri')}: {error}")
        ]
    place = where(path, index, "source", "domains")
    line = index.get(("source", "domains"), 0)
    if names and len(names) != len(_clean_list(domains)):
        return [(line, f"{place}: use either all or a list of names, not both")]
    return [(line, f"{place}: unknown domain {name!r}") for name in names if name not in known]


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
            default = validator.get_default_value(section[key])
            if isinstance(default, list):
                default = ", ".join(default)
            out.append(f"{key} = {default}".rstrip())
        out.append("")
    return "\n".join(out)


def key_summary() -> str:
    """One line per section listing its keys, from the schema (for --help)."""
    spec = _spec()
    return "\n".join(
        f"  [{name}]".ljust(12) + ", ".join(spec[name].scalars) for name in spec.sections
    )
