"""Finding and listing the sets at a destination, local or remote.

A set is named on the command line as:

- the path of a set's folder (``/var/backups/kvm/web1/20261202T010000Z``),
  or of a folder that a borg/restic extract of a ride-along view produced
  (``/tmp/r/var/lib/backupninja-kvm/view/web1``); any argument holding a
  ``/`` that names an existing folder is taken as such a path;
- ``DOMAIN`` (its newest complete set with disk images) or ``DOMAIN/STAMP``
  (``DOMAIN/latest`` too) at a destination: the one of an action file
  (``--action FILE``: its ``[dest]``, local or remote, with its ssh
  settings), or ``--directory DIR`` (local) or ``--directory
  [USER@]HOST:DIR`` (over ssh, port 22).

On a remote destination everything is read over ssh (one connection for the
whole command) and nothing is copied here unless a restore asks for it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from backupninja_kvm import config, destination, setinfo
from backupninja_kvm.errors import BackupNinjaKvmError, ConfigError, TransferError
from backupninja_kvm.report import human_bytes
from backupninja_kvm.transfer import Remote


class SetNotFound(BackupNinjaKvmError):
    """The set named cannot be found; the message says where we looked."""


@dataclass(frozen=True)
class Destination:
    """Where sets are: a local folder, or a folder on a host over ssh."""

    directory: str
    remote: Remote | None = None

    @property
    def label(self) -> str:
        return f"{self.remote.label}:{self.directory}" if self.remote else self.directory


@dataclass(frozen=True)
class SetRef:
    """One set (or view copy): its domain, name and folder."""

    domain: str
    stamp: str  # the set's name; for a view copy, its folder's name
    path: str  # the folder, on the remote host when remote is set
    remote: Remote | None = None
    view_copy: bool = False  # a folder from a ride-along view (manifest.json)

    @property
    def label(self) -> str:
        where = f"{self.remote.label}:{self.path}" if self.remote else self.path
        return f"{self.domain}/{self.stamp} ({where})"

    @property
    def short(self) -> str:
        return f"{self.domain}/{self.stamp}"


def destination_from(action: str | None, directory: str | None) -> Destination | None:
    """The destination given by ``--action`` or ``--directory`` (None: neither).

    Raises ConfigError for an action file that does not validate or has no
    destination of its own (a freeze or thaw action).
    """
    if action and directory:
        raise SetNotFound("give --action or --directory, not both")
    if directory:
        found = re.match(r"^(?:([^@/:]+)@)?([^/:]+):(/.*)$", directory)
        if found:
            user, host, path = found.groups()
            return Destination(path, Remote(host, user or "root"))
        return Destination(os.path.abspath(directory))
    if action:
        settings = config.load(action)
        if settings.stage != "full":
            raise ConfigError(
                action,
                [
                    f"a stage = {settings.stage} action has no destination of its own; name "
                    f"the .kvm action of stage = full, or the set's folder (a copy of the view)"
                ],
            )
        if settings.dest == "remote":
            return Destination(settings.directory, settings.remote())
        return Destination(settings.directory)
    return None


def is_set_folder(path: str) -> bool:
    """Whether *path* is a local set's folder or a copy of a view's domain folder."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name))
        for name in (*destination.MANIFESTS, setinfo.SET_INFO, setinfo.VIEW_MANIFEST)
    )


def local_set(path: str) -> SetRef:
    """The set in the local folder *path*; SetNotFound when it is none."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise SetNotFound(f"{path}: no such folder")
    if not is_set_folder(path):
        if path.endswith(destination.PARTIAL):
            raise SetNotFound(f"{path}: an incomplete set (being written, or interrupted)")
        raise SetNotFound(
            f"{path}: not a set (no B3SUMS, SHA256SUMS, set.json or a view's manifest.json)"
        )
    view_copy = os.path.isfile(os.path.join(path, setinfo.VIEW_MANIFEST)) and not any(
        os.path.isfile(os.path.join(path, name)) for name in destination.MANIFESTS
    )
    try:
        info = setinfo.read(path)
        domain = info.domain
    except setinfo.SetInfoError:
        domain = os.path.basename(os.path.dirname(path)) if not view_copy else "?"
    stamp = os.path.basename(path)
    return SetRef(domain, stamp, path, None, view_copy)


def resolve(spec: str, where: Destination | None) -> SetRef:
    """The set named by *spec* (see the module's docstring)."""
    if os.path.isdir(spec) and ("/" in spec or where is None):
        return local_set(spec)
    if where is None:
        raise SetNotFound(
            f"{spec}: no such folder; give the path of a set's folder, or --action FILE (or "
            f"--directory DIR) to find DOMAIN or DOMAIN/STAMP at a destination"
        )
    domain, _, stamp = spec.partition("/")
    destination.check_domain_name(domain)
    entries = list_entries(where, domain)
    if not entries:
        raise SetNotFound(f"{domain}: no complete set in {where.label}/{domain}")
    if stamp in ("", destination.LATEST):
        with_images = [e for e in entries if e.has_images] or entries
        chosen = with_images[-1].stamp
    elif stamp in {e.stamp for e in entries}:
        chosen = stamp
    else:
        raise SetNotFound(
            f"{domain}/{stamp}: no such complete set in {where.label}/{domain} "
            f"(the sets there: {', '.join(e.stamp for e in entries)})"
        )
    return SetRef(domain, chosen, os.path.join(where.directory, domain, chosen), where.remote)


def list_entries(where: Destination, domain: str) -> list[destination.SetEntry]:
    domain_dir = os.path.join(where.directory, domain)
    if where.remote is None:
        return destination.set_entries(domain_dir)
    try:
        return destination.remote_entries(where.remote, domain_dir)
    except TransferError as error:
        raise SetNotFound(f"cannot list {where.label}/{domain}: {error}") from None


@dataclass
class SetListing:
    """What ``sets`` shows of one set."""

    ref: SetRef
    size: int  # bytes on disk (allocated)
    info: setinfo.SetInfo | None
    checks: dict = field(default_factory=dict)
    disks: list[str] = field(default_factory=list)
    problem: str = ""  # set.json unreadable

    def to_dict(self) -> dict:
        return {
            "domain": self.ref.domain,
            "set": self.ref.stamp,
            "path": self.ref.path,
            "host": self.ref.remote.label if self.ref.remote else None,
            "freeze_time": self.info.freeze_time if self.info else None,
            "consistency": self.info.consistency if self.info else "unknown",
            "size": self.size,
            "disks": self.disks,
            "verify": self.checks.get("verify"),
            "rehearse": self.checks.get("rehearse"),
            "changed_blocks": self.changes(),
            "problem": self.problem or None,
        }

    def changes(self) -> dict[str, dict]:
        """target -> how changed blocks made its image (full or changed,
        bytes read and written, why full), for the disks that say."""
        if self.info is None:
            return {}
        return {
            f.target: {
                "how": f.tracking.how,
                "bytes_read": f.tracking.bytes_read,
                "bytes_written": f.tracking.bytes_written,
                "reason": f.tracking.reason or None,
            }
            for f in self.info.disks()
            if f.tracking is not None
        }

    def made(self) -> str:
        """``sets``' MADE column: "full", or "changed 12.0 MiB" (written)."""
        changes = self.changes()
        if not changes:
            return "-"
        if all(c["how"] == "full" for c in changes.values()):
            return "full"
        written = sum(c["bytes_written"] for c in changes.values() if c["how"] == "changed")
        whole = [t for t, c in changes.items() if c["how"] == "full"]
        return f"changed {human_bytes(written)}" + (f" +{','.join(whole)} full" if whole else "")


def _allocated(path: str) -> int:
    total = 0
    for name in os.listdir(path):
        try:
            status = os.lstat(os.path.join(path, name))
        except OSError:
            continue
        total += status.st_blocks * 512
    return total


def _disks_from_manifest(lines: list[str]) -> list[str]:
    names = [line.rstrip("\n").split("  ", 1)[-1] for line in lines]
    return sorted(
        {n.split("-", 1)[0] for n in names if n and n not in destination.NOT_IMAGES and "-" in n}
    )


def describe_local(ref: SetRef) -> SetListing:
    listing = SetListing(ref, _allocated(ref.path), None, setinfo.read_checks(ref.path))
    if os.path.isfile(os.path.join(ref.path, setinfo.SET_INFO)) or ref.view_copy:
        try:
            listing.info = setinfo.read(ref.path)
            listing.disks = sorted({f.target for f in listing.info.disks()})
        except setinfo.SetInfoError as error:
            listing.problem = str(error)
    else:
        for manifest in destination.MANIFESTS:
            try:
                with open(os.path.join(ref.path, manifest), errors="replace") as handle:
                    listing.disks = _disks_from_manifest(handle.readlines())
                break
            except OSError:
                continue
    return listing


# For each complete set named: "@set\tNAME\tBYTES", then set.json, "@checks",
# checks.json, "@manifest", the manifest's names, "@end".
_DESCRIBE = """cd "$1" || exit 3
shift
for name in "$@"; do
  [ -d "$name" ] || continue
  printf '@set\\t%s\\t%s\\n' "$name" "$(du -s -B1 -- "$name" | cut -f1)"
  cat -- "$name/set.json" 2>/dev/null
  printf '\\n@checks\\n'
  cat -- "$name/checks.json" 2>/dev/null
  printf '\\n@manifest\\n'
  for m in B3SUMS SHA256SUMS; do
    if [ -f "$name/$m" ]; then sed 's/^[^ ]*  //' "$name/$m"; break; fi
  done
  printf '@end\\n'
done
exit 0
"""


def describe_remote(where: Destination, domain: str, stamps: list[str]) -> list[SetListing]:
    assert where.remote is not None
    domain_dir = os.path.join(where.directory, domain)
    try:
        output = where.remote.run(_DESCRIBE, domain_dir, *stamps)
    except TransferError as error:
        raise SetNotFound(f"cannot read the sets in {where.label}/{domain}: {error}") from None
    listings = []
    for block in output.split("@set\t")[1:]:
        header, _, rest = block.partition("\n")
        stamp, _, size = header.partition("\t")
        info_text, _, rest = rest.partition("\n@checks\n")
        checks_text, _, rest = rest.partition("\n@manifest\n")
        manifest_text = rest.split("@end\n", 1)[0]
        ref = SetRef(domain, stamp, os.path.join(domain_dir, stamp), where.remote)
        listing = SetListing(ref, int(size) if size.isdigit() else 0, None)
        try:
            checks = json.loads(checks_text) if checks_text.strip() else {}
            listing.checks = checks if isinstance(checks, dict) else {}
        except ValueError:
            pass
        if info_text.strip():
            try:
                listing.info = setinfo.SetInfo.from_json(info_text, f"{ref.label}/set.json")
                listing.disks = sorted({f.target for f in listing.info.disks()})
            except setinfo.SetInfoError as error:
                listing.problem = str(error)
        else:
            listing.disks = _disks_from_manifest(manifest_text.splitlines())
        listings.append(listing)
    return listings


def domains_at(where: Destination) -> list[str]:
    """The domain folders at the destination (names that are safe)."""
    if where.remote is None:
        try:
            names = os.listdir(where.directory)
        except OSError as error:
            raise SetNotFound(f"cannot read {where.directory}: {error.strerror}") from None
        found = [n for n in names if os.path.isdir(os.path.join(where.directory, n))]
    else:
        try:
            output = where.remote.run(
                'cd "$1" || exit 3; for n in *; do [ -d "$n" ] && printf "%s\\n" "$n"; done; '
                "exit 0",
                where.directory,
            )
        except TransferError as error:
            raise SetNotFound(f"cannot read {where.label}: {error}") from None
        found = output.splitlines()
    good = []
    for name in found:
        try:
            destination.check_domain_name(name)
        except BackupNinjaKvmError:
            continue
        good.append(name)
    return sorted(good)


def listings(where: Destination, domains: list[str]) -> list[SetListing]:
    """Every complete set of *domains* (all at the destination when empty)."""
    result = []
    for domain in domains or domains_at(where):
        destination.check_domain_name(domain)
        entries = list_entries(where, domain)
        if not entries:
            continue
        if where.remote is None:
            for entry in entries:
                path = os.path.join(where.directory, domain, entry.stamp)
                result.append(describe_local(SetRef(domain, entry.stamp, path)))
        else:
            result += describe_remote(where, domain, [e.stamp for e in entries])
    return result
