"""Verify a set: its manifest, each image's own structure, its definition.

Three layers of proof, each naming the file it doubts and how:

1. The manifest (``B3SUMS``, or ``SHA256SUMS`` of older sets): every file it
   lists is there and has the same sum. This catches a flipped byte, a
   truncated or a missing file. A copy of a ride-along view has no manifest
   (borg and restic check their own copies: ``borg check``, ``restic check``);
   that is said, and the other layers still run.
2. Each image's structure, as ``set.json`` describes it: a qcow2 passes
   ``qemu-img check`` (run in the set's folder, so its layers find each
   other by their relative names) and has its virtual size; a raw image has
   its size. This catches a damaged qcow2 header even where a manifest was
   rewritten, and a set whose manifest itself was lost.
3. The definition: ``domain.xml`` parses, is a ``<domain>``, and passes
   ``virt-xml-validate`` where that is installed (libvirt-clients).

A remote set is verified on the remote host: the sums by its ``b3sum -c``
(or ``sha256sum -c``), the structure by its ``qemu-img`` (when it has none,
that is said and that layer is skipped), over the run's one ssh connection;
nothing is copied here but ``set.json`` and ``domain.xml``.

Nothing here writes the set but ``checks.json``, the record of the result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from backupninja_kvm import destination, machine, setinfo
from backupninja_kvm.errors import TransferError
from backupninja_kvm.report import seconds
from backupninja_kvm.sets import SetRef


@dataclass
class Verification:
    """What ``verify`` found in one set."""

    ref: SetRef
    problems: list[str] = field(default_factory=list)  # each: FILE: what is wrong
    notes: list[str] = field(default_factory=list)  # not damage: what was not checked
    summed: int = 0  # files checked against the manifest
    images: int = 0  # images whose structure was checked
    state_files: int = 0  # machine-state files (NVRAM, TPM, boot files) of their size
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if not self.ok:
            return f"{self.ref.short}: DAMAGED: " + "; ".join(self.problems)
        parts = []
        if self.summed:
            parts.append(f"{self.summed} file(s) match the manifest")
        if self.images:
            parts.append(f"{self.images} image(s) sound")
        if self.state_files:
            parts.append(f"{self.state_files} machine-state file(s) of their size")
        parts.append("the definition parses")
        text = f"{self.ref.short}: verified: {', '.join(parts)} in {seconds(self.seconds)}"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text

    def record(self) -> dict:
        return {
            "time": setinfo.utc_text(time.time()),
            "ok": self.ok,
            "summary": self.summary(),
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
        }


class _Local:
    """Reads one set on this host."""

    def __init__(self, path: str) -> None:
        self.path = path

    def names(self) -> set[str]:
        return {n for n in os.listdir(self.path) if os.path.isfile(os.path.join(self.path, n))}

    def sizes(self) -> dict[str, int]:
        return {n: os.path.getsize(os.path.join(self.path, n)) for n in self.names()}

    def read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.path, name), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def check_sums(self, manifest: str, lines: list[tuple[str, str]]) -> dict[str, str]:
        """name -> "ok", "differs" or "missing"."""
        found = {}
        for digest, name in lines:
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                found[name] = "missing"
                continue
            actual = destination.manifest_sum(manifest, path)
            found[name] = "ok" if actual == digest else "differs"
        return found

    def qemu_img(self, argv: list[str]) -> tuple[int, str, str] | None:
        result = subprocess.run(["qemu-img", *argv], cwd=self.path, capture_output=True, text=True)
        return result.returncode, result.stdout, result.stderr

    def validator(self, text: str) -> tuple[int, str] | None:
        if not (shutil.which("virt-xml-validate") and shutil.which("xmllint")):
            return None  # xmllint: Debian's libxml2-utils, which setup-host installs
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
            handle.write(text)
            handle.flush()
            result = subprocess.run(
                ["virt-xml-validate", handle.name, "domain"], capture_output=True, text=True
            )
        return result.returncode, (result.stderr or result.stdout).strip()


_REMOTE_FILES = """cd "$1" || exit 3
for f in *; do [ -f "$f" ] && printf '%s\\t%s\\n' "$(stat -c %s -- "$f")" "$f"; done
exit 0
"""
_REMOTE_SUMS = """cd "$1" || exit 3
if [ "$2" = B3SUMS ]; then
  command -v b3sum >/dev/null || { echo "@nosum b3sum"; exit 0; }
  b3sum -c -- B3SUMS 2>&1
else
  sha256sum -c -- SHA256SUMS 2>&1
fi
exit 0
"""
_REMOTE_QEMU_IMG = """cd "$1" || exit 3
shift
command -v qemu-img >/dev/null || exit 127
exec qemu-img "$@"
"""


class _Remote:
    """Reads one set on a remote host; the checks run there."""

    def __init__(self, ref: SetRef) -> None:
        assert ref.remote is not None
        self.remote = ref.remote
        self.path = ref.path
        self._sizes: dict[str, int] | None = None
        self.qemu_img_missing = False

    def sizes(self) -> dict[str, int]:
        if self._sizes is None:
            output = self.remote.run(_REMOTE_FILES, self.path)
            self._sizes = {}
            for line in output.splitlines():
                size, _, name = line.partition("\t")
                if size.isdigit():
                    self._sizes[name] = int(size)
        return self._sizes

    def names(self) -> set[str]:
        return set(self.sizes())

    def read(self, name: str) -> str | None:
        if name not in self.names():
            return None
        return self.remote.run('cat -- "$1/$2"', self.path, name)

    def check_sums(self, manifest: str, lines: list[tuple[str, str]]) -> dict[str, str] | None:
        output = self.remote.run(_REMOTE_SUMS, self.path, manifest)
        if output.startswith("@nosum"):
            return None
        found = {name: "missing" for _, name in lines}
        for line in output.splitlines():
            for name in found:
                if line == f"{name}: OK":
                    found[name] = "ok"
                elif line == f"{name}: FAILED":
                    found[name] = "differs"  # a file that cannot be read stays "missing"
        return found

    def qemu_img(self, argv: list[str]) -> tuple[int, str, str] | None:
        if self.qemu_img_missing:
            return None
        try:
            return 0, self.remote.run(_REMOTE_QEMU_IMG, self.path, *argv), ""
        except TransferError as error:
            if error.status == 127:
                self.qemu_img_missing = True
                return None
            return error.status or 1, "", str(error)

    def validator(self, text: str) -> tuple[int, str] | None:
        return _Local(self.path).validator(text)  # the definition is checked here


def verify_set(ref: SetRef, sums: bool = True) -> Verification:
    """Verify the set *ref* (see the module's docstring); without *sums*,
    the manifest is only read, not checked (a restore checks its copies
    against it instead). Raises TransferError when a remote set cannot be
    reached."""
    started = time.monotonic()
    found = Verification(ref)
    reader: _Local | _Remote = _Remote(ref) if ref.remote else _Local(ref.path)
    names = reader.names()
    listed = _check_manifest(reader, names, found, sums)
    info = _read_info(reader, ref, found)
    if info is not None:
        for item in info.files:
            if item.name not in names and item.name not in listed:
                found.problems.append(f"{item.name}: missing (set.json lists it)")
            elif listed and item.name not in listed:
                found.problems.append(f"{item.name}: not in the manifest (added after the backup?)")
        _check_images(reader, info, names, found)
    _check_definition(reader, names, found, info)
    found.seconds = time.monotonic() - started
    return found


def _manifest_lines(text: str) -> list[tuple[str, str]]:
    lines = []
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            lines.append((digest.lstrip("\\"), name))
    return lines


def _check_manifest(reader, names: set[str], found: Verification, sums: bool) -> set[str]:
    """The names the manifest lists, once each is checked."""
    manifest = next((m for m in destination.MANIFESTS if m in names), "")
    if not manifest:
        if found.ref.view_copy:
            found.notes.append(
                "a copy of a ride-along view has no checksums: borg check or restic check "
                "verify their own copies"
            )
        else:
            found.problems.append(
                "B3SUMS: missing: the set has no manifest, so its contents cannot be proven"
            )
        return set()
    lines = _manifest_lines(reader.read(manifest) or "")
    unsafe = [name for _, name in lines if "/" in name or name in (".", "..")]
    if unsafe:
        found.problems.append(f"{manifest}: names files outside the set: {', '.join(unsafe)}")
        return set()
    if not sums:
        for _, name in lines:
            if name not in names:
                found.problems.append(f"{name}: missing (listed in {manifest})")
        return {name for _, name in lines}
    verdicts = reader.check_sums(manifest, lines)
    if verdicts is None:
        found.notes.append(
            f"{manifest} not checked: the remote host has no b3sum (apt install b3sum)"
        )
        return {name for _, name in lines}
    for _, name in lines:
        verdict = verdicts.get(name, "missing")
        if verdict == "missing":
            found.problems.append(f"{name}: missing (listed in {manifest})")
        elif verdict == "differs":
            size = reader.sizes().get(name)
            found.problems.append(
                f"{name}: its content differs from {manifest} (damaged or changed since the "
                f"backup; {size} bytes now)"
            )
        else:
            found.summed += 1
    return {name for _, name in lines}


def _read_info(reader, ref: SetRef, found: Verification) -> setinfo.SetInfo | None:
    if ref.remote is None:
        try:
            return setinfo.read(ref.path)
        except setinfo.SetInfoError as error:
            found.problems.append(str(error))
            return None
    text = reader.read(setinfo.SET_INFO)
    if text is None:
        found.notes.append("set.json missing (a set of an earlier version): sizes not checked")
        return None
    try:
        return setinfo.SetInfo.from_json(text, f"{ref.label}: {setinfo.SET_INFO}")
    except setinfo.SetInfoError as error:
        found.problems.append(str(error))
        return None


def _check_images(reader, info: setinfo.SetInfo, names: set[str], found: Verification) -> None:
    sizes = reader.sizes()
    for item in info.files:
        if item.name not in names:
            continue
        if item.role in machine.ROLES:
            size = sizes.get(item.name, -1)
            if item.virtual_size and size != item.virtual_size:
                found.problems.append(
                    f"{item.name}: {size} bytes, but the {item.role} file had "
                    f"{item.virtual_size} (truncated or extended since the backup)"
                )
            else:
                found.state_files += 1
        elif item.format == "qcow2":
            if _check_qcow2(reader, item, found):
                found.images += 1
        elif item.format == "raw":
            size = sizes.get(item.name, -1)
            if item.virtual_size and size != item.virtual_size:
                found.problems.append(
                    f"{item.name}: {size} bytes, but the raw image had {item.virtual_size} "
                    f"(truncated or extended since the backup)"
                )
            else:
                found.images += 1
        else:
            found.notes.append(f"{item.name}: format {item.format} not checked")
    if isinstance(reader, _Remote) and reader.qemu_img_missing:
        found.notes.append("qcow2 structure not checked: the remote host has no qemu-img")


def _check_qcow2(reader, item: setinfo.SetImage, found: Verification) -> bool:
    checked = reader.qemu_img(["check", "-U", "-f", "qcow2", "--output=json", item.name])
    if checked is None:
        return False
    status, output, errors = checked
    try:
        report = json.loads(output) if output.strip() else {}
    except ValueError:
        report = {}
    corruptions = int(report.get("corruptions", 0) or 0)
    if status == 0 or (status == 3 and not corruptions):
        leaks = int(report.get("leaks", 0) or 0)
        if leaks:
            found.notes.append(f"{item.name}: {leaks} leaked cluster(s), harmless")
    elif status == 2 or corruptions:
        found.problems.append(
            f"{item.name}: qemu-img check finds {corruptions} corruption(s) in the qcow2"
        )
        return False
    else:
        message = _last_line(errors) or f"qemu-img check exit status {status}"
        found.problems.append(f"{item.name}: not a sound qcow2 image ({message})")
        return False
    if item.virtual_size:
        info = reader.qemu_img(["info", "-U", "-f", "qcow2", "--output=json", item.name])
        if info is not None and info[0] == 0:
            try:
                size = int(json.loads(info[1]).get("virtual-size", 0))
            except ValueError:
                size = 0
            if size != item.virtual_size:
                found.problems.append(
                    f"{item.name}: its virtual size is {size} bytes, the disk had "
                    f"{item.virtual_size}"
                )
                return False
    return True


def _check_definition(
    reader, names: set[str], found: Verification, info: setinfo.SetInfo | None
) -> None:
    text = reader.read(destination.DEFINITION) if destination.DEFINITION in names else None
    if text is None:
        found.problems.append("domain.xml: missing: the set cannot be defined again")
        return
    try:
        name, _ = setinfo.domain_identity(text)
    except (ValueError, ET.ParseError) as error:
        found.problems.append(f"domain.xml: not a domain definition ({error})")
        return
    if info is not None and info.domain != name:
        found.problems.append(f"domain.xml: defines {name!r}, but the set is of {info.domain!r}")
    validated = reader.validator(text)
    if validated is not None and validated[0] != 0:
        found.problems.append(
            f"domain.xml: libvirt's schema rejects it ({_last_line(validated[1])})"
        )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def record(ref: SetRef, verification: Verification) -> str | None:
    """Keep the result in the set's checks.json; returns what went wrong, or None."""
    try:
        if ref.remote is None:
            setinfo.record_check(ref.path, "verify", verification.record())
        else:
            record_remote(ref, "verify", verification.record())
    except (OSError, TransferError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        return f"cannot record the result in {ref.label}: {reason}"
    return None


_REMOTE_RECORD = """set -e
cd "$1"
umask 077
rm -f .checks.new
cat > .checks.new
mv -f .checks.new checks.json
"""


def record_remote(ref: SetRef, kind: str, result: dict) -> None:
    """checks.json on the remote host: read, update *kind*, replace."""
    assert ref.remote is not None
    try:
        old = json.loads(ref.remote.run('cat -- "$1/checks.json" 2>/dev/null; exit 0', ref.path))
    except ValueError:
        old = {}
    checks = old if isinstance(old, dict) else {}
    checks[kind] = result
    ref.remote.run(_REMOTE_RECORD, ref.path, stdin=json.dumps(checks, indent=2, sort_keys=True))
