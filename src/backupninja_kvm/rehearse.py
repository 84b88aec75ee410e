"""``rehearse SET``: boot a set as a throwaway guest, to show that it restores.

The set is never written. Each disk of the set gets a temporary qcow2 overlay
(backing file: the set's image, by its absolute path) in a private folder
under /var/tmp; a transient domain made from the set's ``domain.xml``
(``definition.copy_definition`` and ``for_rehearsal``: a new name and UUID,
no network interface, no disk of the original) boots from them. It is up
when the QEMU guest agent answers (when the definition has its channel), or
when a pattern appears on its serial console, which goes into a file in the
folder. Then the domain is destroyed and the folder removed, also on
failure and on a signal; libvirt destroys it too when our connection
closes (it is started with AUTODESTROY).

QEMU runs as root and libvirt relabels nothing: otherwise libvirt would
chown the set's images to its QEMU user, and that user could not reach
them in the set's root-only folder anyway. QEMU opens them read-only,
below the overlays.

The result goes into the set's ``checks.json`` (kind ``rehearse``). A set
that cannot be tried (no set, no libvirt, a KVM guest on a host without
/dev/kvm, no way to tell when it is up) raises RehearseError and records
nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from backupninja_kvm import interrupts, setinfo
from backupninja_kvm.definition import (
    DefinitionError,
    copy_definition,
    domain_type,
    for_rehearsal,
    has_guest_agent,
    with_backing_chain,
)
from backupninja_kvm.errors import BackupNinjaKvmError, HypervisorError
from backupninja_kvm.report import log

DEFAULT_TIMEOUT = 300.0
NAME_PREFIX = "bnkvm-rehearse-"
WORK_ROOT = "/var/tmp"  # not /tmp: often a tmpfs, and the overlays grow with the guest's writes
CONSOLE = "console.log"
KVM_DEVICE = "/dev/kvm"

EXIT_BOOTED = 0
EXIT_NOT_BOOTED = 1
EXIT_NOT_TRIED = 2


class RehearseError(BackupNinjaKvmError):
    """The rehearsal could not be tried; the set was not judged."""


@dataclass(frozen=True)
class Result:
    """What a rehearsal showed of a set."""

    ok: bool  # the guest booted
    seconds: float  # from the start of the domain to the sign it is up (or the end)
    summary: str  # one line: "web1: set 20261202T010000Z booted in 8.4 s: ..."
    method: str  # agent or console

    def to_check(self, at: float | None = None) -> dict:
        """The record of it in checks.json."""
        return {
            "time": setinfo.utc_text(time.time() if at is None else at),
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "summary": self.summary,
            "method": self.method,
        }


def _set_path(args: argparse.Namespace) -> str:
    """The folder of the set that ``args.set`` names (``sets.resolve``): a
    rehearsal boots from files on this host."""
    from backupninja_kvm import setcommands

    ref = setcommands.resolve_set(args.set, args)
    if ref.remote is not None:
        raise RehearseError(
            f"{ref.label}: a set at a remote destination; rehearse it on the remote host, or "
            f"fetch it (rsync -a --sparse {ref.remote.label}:{ref.path}/ DIR/) and rehearse DIR"
        )
    return ref.path


def rehearsal_name(domain: str) -> str:
    """A new, valid domain name for a rehearsal of *domain*'s set."""
    readable = re.sub(r"[^A-Za-z0-9_.+-]", "-", domain)[:40]
    return f"{NAME_PREFIX}{readable}-{secrets.token_hex(3)}"


def rehearse_set(
    set_path: str,
    uri: str = "qemu:///system",
    timeout: float = DEFAULT_TIMEOUT,
    pattern: str | None = None,
) -> Result:
    """Boot the set in *set_path* as a throwaway guest at *uri*; wait up to
    *timeout* s until its guest agent answers, or with *pattern* (a regular
    expression) until the pattern appears on its serial console.

    Returns the Result (also recorded in the set's checks.json). Raises
    RehearseError (or HypervisorError: no libvirt) when it cannot be tried,
    Interrupted on a signal, after cleaning up either way.
    """
    from backupninja_kvm.hypervisor import DEFINITION_REFUSED, Hypervisor

    info, definition = _read_set(set_path)
    method, console_pattern = _method(definition, pattern)
    if timeout <= 0:
        raise RehearseError(f"the timeout must be a positive number of seconds, not {timeout:g}")
    if domain_type(definition) == "kvm" and not os.path.exists(KVM_DEVICE):
        raise RehearseError(
            f"{set_path}: its definition asks for KVM (<domain type='kvm'>) and this host has "
            f"no {KVM_DEVICE}: rehearse it on a host with KVM"
        )
    label = f"{info.domain}: set {os.path.basename(set_path)}"
    hypervisor = Hypervisor(uri)
    try:
        folder = tempfile.mkdtemp(prefix=NAME_PREFIX, dir=WORK_ROOT)
    except OSError as error:
        hypervisor.close()
        raise RehearseError(f"cannot make a folder in {WORK_ROOT}: {error.strerror}") from None
    domain = None
    try:
        overlays, unreadable = _make_overlays(set_path, info, folder)
        if unreadable:
            result = Result(False, 0.0, f"{label} did not boot: {unreadable}", method)
        else:
            name = rehearsal_name(info.domain)
            console = os.path.join(folder, CONSOLE)
            xml, dropped = copy_definition(
                definition, name, overlays, drop_interfaces=True, files_dir=folder
            )
            for target, chain in _chains(set_path, info).items():
                xml = with_backing_chain(xml, target, chain)
            xml = for_rehearsal(xml, console)
            if dropped:
                log.info("%s: booting without %s: not in the set", label, ", ".join(dropped))
            log.debug("%s: starting %s on overlays in %s", label, name, folder)
            started = time.monotonic()
            try:
                # The guest exists before createXML returns: a signal waits
                # until we hold the domain, so that the clean-up destroys it.
                with interrupts.critical():
                    domain = hypervisor.start_transient(xml)
            except HypervisorError as error:
                if error.code in DEFINITION_REFUSED:
                    raise RehearseError(f"{label}: libvirt refused the copy: {error}") from None
                seconds = time.monotonic() - started
                result = Result(
                    False,
                    seconds,
                    f"{label} did not boot: QEMU refused to start it: {error.reason}",
                    method,
                )
            else:
                result = _wait(domain, method, console_pattern, console, timeout, started, label)
    except DefinitionError as error:
        raise RehearseError(f"{label}: {error}") from None
    finally:
        with interrupts.critical():  # a second signal waits for the clean-up
            _clean_up(domain, folder, label)
            hypervisor.close()
    setinfo.record_check(set_path, "rehearse", result.to_check())
    return result


def _read_set(set_path: str) -> tuple[setinfo.SetInfo, str]:
    try:
        info = setinfo.read(set_path)
        with open(os.path.join(set_path, "domain.xml"), encoding="utf-8") as handle:
            definition = handle.read()
    except setinfo.SetInfoError as error:
        raise RehearseError(str(error)) from None
    except OSError as error:
        raise RehearseError(f"{set_path}: cannot read domain.xml: {error.strerror}") from None
    if not info.disks():
        raise RehearseError(f"{set_path}: the set holds no disk image to boot from")
    with_data_file = [item.name for item in info.files if item.data_file]
    if with_data_file:
        raise RehearseError(
            f"{set_path}: {', '.join(with_data_file)} has an external data file, which QEMU "
            f"looks up by the set's relative name from its own folder: rehearse cannot boot "
            f"it yet"
        )
    return info, definition


def _method(definition: str, pattern: str | None) -> tuple[str, re.Pattern[str] | None]:
    """agent or console, and the console's pattern."""
    if pattern is not None:
        try:
            return "console", re.compile(pattern, re.MULTILINE)
        except re.error as error:
            raise RehearseError(f"--console-pattern {pattern!r}: {error}") from None
    if has_guest_agent(definition):
        return "agent", None
    raise RehearseError(
        "the definition has no guest agent channel (org.qemu.guest_agent.0): give "
        "--console-pattern REGEX, a line the guest prints on its serial console once it is up"
    )


def _make_overlays(
    set_path: str, info: setinfo.SetInfo, folder: str
) -> tuple[dict[str, tuple[str, str]], str]:
    """target -> (overlay, qcow2) for each disk of the set, and a reason
    when an image of the set cannot be read (then no overlay is made).

    The overlays are made without opening the set's images (``-u``, the
    size from set.json): a damaged image is QEMU's to find, as it would be
    in a restore.
    """
    overlays = {}
    for disk in info.disks():
        image = os.path.join(set_path, disk.name)
        if not os.path.isfile(image):
            return {}, f"its image {disk.name} is missing"
        if disk.virtual_size <= 0:
            return {}, f"the size of {disk.name} cannot be read (qemu-img info fails on it)"
        overlay = os.path.join(folder, f"{disk.target}.qcow2")
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", image, "-F", disk.format]
        created = subprocess.run(
            [*argv, overlay, str(disk.virtual_size)], capture_output=True, text=True
        )
        if created.returncode != 0:
            raise RehearseError(
                f"qemu-img cannot make an overlay in {folder} on {image}: {created.stderr.strip()}"
            )
        overlays[disk.target] = (overlay, "qcow2")
    return overlays, ""


def _chains(set_path: str, info: setinfo.SetInfo) -> dict[str, list[tuple[str, str]]]:
    """target -> the set's layers below the overlay, topmost first: the
    disk's top, then each layer set.json says is below it. Spelled out so
    that QEMU reads the set's files, whatever their headers name."""
    by_name = info.by_name()
    chains = {}
    for disk in info.disks():
        chain: list[tuple[str, str]] = []
        item: setinfo.SetImage | None = disk
        while item is not None and len(chain) < len(by_name):
            chain.append((os.path.join(set_path, item.name), item.format))
            item = by_name.get(item.backing) if item.backing else None
        chains[disk.target] = chain
    return chains


def _wait(domain, method, pattern, console, timeout, started, label) -> Result:
    """Poll the sign that the guest is up until *timeout* s after *started*."""
    deadline = started + timeout
    why_not = ""
    while True:
        if method == "agent":
            answer = domain.agent_ping(timeout=max(1, min(5, int(deadline - time.monotonic()))))
            if answer and answer != why_not:
                log.debug("%s: the guest agent: %s", label, answer)
            up, why_not = not answer, answer
            sign = "the guest agent answered"
        else:
            found = pattern.search(_read(console))
            up = found is not None
            sign = f"its console showed {found.group(0)!r}" if found else ""
        seconds = time.monotonic() - started
        if up:
            return Result(True, seconds, f"{label} booted in {seconds:.1f} s: {sign}", method)
        if domain.is_gone_or_stopped():
            return Result(
                False,
                seconds,
                f"{label} did not boot: the guest stopped after {seconds:.1f} s"
                f"{_last_line(console)}",
                method,
            )
        if time.monotonic() >= deadline:
            missing = (
                f"the guest agent did not answer ({why_not})"
                if method == "agent"
                else f"its console did not show {pattern.pattern!r}"
            )
            return Result(
                False,
                seconds,
                f"{label} did not boot within {timeout:g} s: {missing}{_last_line(console)}",
                method,
            )
        time.sleep(0.25)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def _last_line(console: str) -> str:
    lines = [line.strip() for line in _read(console).splitlines() if line.strip()]
    if not lines:
        return "; its console stayed empty"
    return f"; its console's last line: {lines[-1][:200]!r}"


def _clean_up(domain, folder: str, label: str) -> None:
    if domain is not None:
        try:
            domain.destroy()
        except HypervisorError as error:
            log.warning("%s: %s; libvirt destroys it when this connection closes", label, error)
    shutil.rmtree(folder, ignore_errors=True)


def rehearse(args: argparse.Namespace) -> int:
    """``rehearse SET``: exit 0 booted, 1 did not boot, 2 could not try."""
    result = rehearse_set(_set_path(args), args.uri, args.timeout, args.console_pattern)
    if result.ok:
        log.info("%s", result.summary)
        return EXIT_BOOTED
    log.error("%s", result.summary)
    return EXIT_NOT_BOOTED


def add_parser(commands) -> None:
    """Register ``rehearse`` with the subcommands of the command line."""
    parser = commands.add_parser(
        "rehearse",
        help="boot a set as a throwaway guest on temporary overlays (the set is not "
        "written, no network) and say whether it came up; exit 0 booted, 1 did not boot, "
        "2 could not try",
    )
    parser.add_argument(
        "set", metavar="SET", help="a set's folder, DOMAIN (its newest set) or DOMAIN/STAMP"
    )
    from backupninja_kvm.setcommands import add_destination_arguments

    add_destination_arguments(parser)
    parser.add_argument(
        "-c",
        "--connect",
        dest="uri",
        default="qemu:///system",
        help="libvirt URI (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the guest to come up (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--console-pattern",
        metavar="REGEX",
        help="up when this appears on the guest's serial console (default: when its QEMU "
        "guest agent answers, which needs the org.qemu.guest_agent.0 channel)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="leave out Debug lines")
    parser.set_defaults(function=rehearse)
