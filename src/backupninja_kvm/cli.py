"""Command line: one function per subcommand.

Exit status of ``run``: 0 every domain backed up; 4 some domain failed and
Error lines say which (each failed domain runs on its own images); 2 a Fatal
line was printed (bad configuration, no hypervisor, or a VM left on an
overlay). Anything else is a crash, which the backupninja handler reports as
Fatal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from backupninja_kvm import __version__, config, interrupts, prometheus, report
from backupninja_kvm.backup import back_up_domain, make_plan, quiesce_wanted
from backupninja_kvm.destination import new_stamp as destination_stamp
from backupninja_kvm.errors import (
    BackupNinjaKvmError,
    ConfigError,
    DomainError,
    HypervisorError,
    OverlayLeftError,
)
from backupninja_kvm.interrupts import Interrupted
from backupninja_kvm.report import human_bytes, log
from backupninja_kvm.transfer import Remote

EXIT_OK = 0
EXIT_FATAL = 2
EXIT_DOMAIN_ERRORS = 4

DESCRIPTION = """\
Live backups of libvirt/KVM virtual machines, as a backupninja handler.

For each selected domain: one atomic disk-only external snapshot (the VM keeps
running on fresh qcow2 overlays), a copy of the frozen images and the domain's
XML to DIRECTORY/DOMAIN/TIMESTAMP/, then the overlays are merged back (active
block commit + pivot, or blockpull) and deleted.
"""

EPILOG = f"""\
Action file keys (see `backupninja-kvm example-config` for help and defaults):
{config.key_summary()}

Exit status of run and recover: 0 success; 4 some domains failed (Error lines);
2 Fatal (bad configuration, no libvirt, or a domain left on an overlay).

After a crash or a kill, the next run repairs each domain before backing it
up; `backupninja-kvm status` shows domains still on an overlay, and
`backupninja-kvm recover [DOMAIN...]` repairs them at once.
"""


def _selected(settings: config.Settings, known: list[str]) -> list[str]:
    names = list(settings.domains) if settings.domains else known
    return [n for n in names if not settings.is_excluded(n)]


def _domain_names(uri: str) -> list[str]:
    from backupninja_kvm.hypervisor import Hypervisor

    hypervisor = Hypervisor(uri)
    try:
        return [d.name for d in hypervisor.list_domains()]
    finally:
        hypervisor.close()


def _check_remote(remote: Remote, directory: str) -> None:
    """The remote destination answers and its directory is writable."""
    remote.run(
        'test -d "$1" && test -w "$1" || { echo "directory $1 is missing or not writable" >&2;'
        " exit 1; }",
        directory,
    )


def run(args: argparse.Namespace) -> int:
    """``run ACTION``: back up the domains an action file selects."""
    try:
        settings = config.load(args.action, list_domains=_domain_names, check_remote=_check_remote)
    except ConfigError as error:
        for problem in error.problems:
            log.critical("%s", problem)
        log.critical("%s: invalid configuration, nothing was backed up", error.path)
        return EXIT_FATAL

    from backupninja_kvm.hypervisor import Hypervisor

    try:
        hypervisor = Hypervisor(settings.uri)
    except HypervisorError as error:
        log.critical("%s: %s", settings.where("source", "uri"), error)
        return EXIT_FATAL
    try:
        names = _selected(settings, [d.name for d in hypervisor.list_domains()])
        if not names:
            log.warning("%s: no domain selected, nothing to back up", settings.path)
            return EXIT_OK
        if args.test:
            return _dry_run(hypervisor, settings, names)
        return _back_up_all(hypervisor, settings, names, args.prometheus_dir)
    except HypervisorError as error:
        log.critical("%s", error)
        return EXIT_FATAL
    finally:
        hypervisor.close()


def _destination_checks(settings: config.Settings) -> bool:
    """Checks of the destination made once per run, before any domain; logs
    warnings, and returns False (after a Fatal line) when nothing may run."""
    from backupninja_kvm import destination

    if settings.dest == "local":
        if settings.require_mount and not os.path.ismount(settings.directory):
            log.critical(
                "%s is yes, but %s is not a mount point (the disk or share is not mounted); "
                "nothing was backed up; mount it, or set require_mount = no",
                settings.where("dest", "require_mount"),
                settings.directory,
            )
            return False
        warning = destination.world_writable_warning(
            settings.directory, settings.where("dest", "directory")
        )
        if warning:
            log.warning("%s", warning)
    if settings.overlaydir:
        warning = destination.world_writable_warning(
            settings.overlaydir, settings.where("source", "overlaydir")
        )
        if warning:
            log.warning("%s", warning)
    return True


def _dry_run(hypervisor, settings: config.Settings, names: list[str]) -> int:
    """``run --test``: every check the real run makes before it freezes
    anything, each said at the level the real run would say it; changes
    nothing. Exit status as the real run's (4 when a domain would fail)."""
    if not _destination_checks(settings):
        return EXIT_FATAL
    failed = []
    for name in names:
        try:
            _dry_run_domain(hypervisor, settings, name)
        except (DomainError, HypervisorError) as error:
            log.error("test run: %s", error)
            failed.append(name)
    if failed:
        log.error(
            "test run: %d of %d domain(s) would fail: %s",
            len(failed),
            len(names),
            ", ".join(failed),
        )
        return EXIT_DOMAIN_ERRORS
    return EXIT_OK


def _dry_run_domain(hypervisor, settings: config.Settings, name: str) -> None:
    from backupninja_kvm import backup, journal, lock
    from backupninja_kvm.destination import SetEntry, sets_to_prune
    from backupninja_kvm.disks import (
        guest_agent_connected,
        is_our_overlay,
        overlay_paths,
        parse_disks,
    )
    from backupninja_kvm.errors import TransferError

    domain = hypervisor.domain(name)
    held = lock.holder(domain.uuid)
    if held:
        raise DomainError(f"{name}: another backup holds this domain's lock ({held}); skipped")
    try:
        pending = journal.read(domain.uuid)
    except journal.JournalError as error:
        raise DomainError(f"{name}: {error}; remove it once checked; domain skipped") from None
    repair = bool(pending)
    if pending:
        log.warning(
            "test run: %s: the journal %s of a backup interrupted in phase %s is left: the "
            "real run repairs that first",
            name,
            journal.journal_path(domain.uuid),
            pending.phase,
        )
    elif domain.is_active():
        orphans = [d.target for d in parse_disks(domain.xml()) if d.path and is_our_overlay(d.path)]
        repair = bool(orphans)
        if orphans:
            log.warning(
                "test run: %s: %s run(s) on an overlay of ours with no journal: the real run "
                "merges it back first",
                name,
                ", ".join(orphans),
            )
    plan = make_plan(domain)
    log.info("test run, would %s", plan.describe())
    if not repair:  # else the chain is the one the repair leaves, not this one
        backup._refuse_unsafe_chains(plan)
    if quiesce_wanted(plan, settings) and not guest_agent_connected(domain.xml()):
        message = f"{name}: the guest agent is not connected: the freeze would fail"
        if settings.quiesce == "yes":
            raise DomainError(f"{message} and quiesce = yes skips the domain")
        log.warning("test run: %s; the snapshot would be crash-consistent", message)
    backup_set = backup.open_set(settings, name, destination_stamp())
    overlays = overlay_paths(plan.disks, backup_set.stamp, settings.overlaydir, name)
    backup._check_space(plan, settings, overlays, backup_set)
    log.info("test run: %s: would write the set %s", name, backup_set.final_path)
    try:
        entries = backup_set.entries()
    except (OSError, TransferError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise DomainError(
            f"{name}: cannot list the sets in {backup_set.domain_dir}: {reason}"
        ) from None

    new = SetEntry(backup_set.stamp, has_images=bool(plan.disks))
    pruned = sets_to_prune([*entries, new], settings.keep, backup_set.stamp)
    if pruned:
        log.info(
            "test run: %s: keep = %d would remove %d old set(s): %s",
            name,
            settings.keep,
            len(pruned),
            ", ".join(pruned),
        )
    else:
        log.info("test run: %s: keep = %d would remove no set", name, settings.keep)


def _back_up_all(
    hypervisor, settings: config.Settings, names: list[str], prometheus_dir: str | None = None
) -> int:
    if not _destination_checks(settings):
        return EXIT_FATAL
    failed, fatal = [], []
    figures: list[prometheus.DomainFigures] = []
    try:
        for position, name in enumerate(names):
            stamp = destination_stamp()  # the set takes the next free name after it
            started = time.monotonic()
            try:
                domain = hypervisor.domain(name)
                outcome = back_up_domain(domain, settings, stamp)
            except Interrupted as interrupt:
                left = ", ".join(names[position + 1 :]) or "none"
                log.critical(
                    "interrupted by %s during the backup of %s: it runs on its own images "
                    "again, no set was made for it; domains not backed up: %s",
                    interrupt.signame,
                    name,
                    left,
                )
                figures.append(prometheus.DomainFigures(name, prometheus.ERROR))
                return EXIT_FATAL
            except OverlayLeftError as error:
                log.critical("%s", error)
                fatal.append(name)
                figures.append(prometheus.DomainFigures(name, prometheus.FATAL))
            except (DomainError, HypervisorError) as error:
                log.error("%s", error)
                failed.append(name)
                figures.append(
                    prometheus.DomainFigures(
                        name, prometheus.ERROR, duration_seconds=time.monotonic() - started
                    )
                )
            else:
                for problem in outcome.problems:
                    log.error("%s", problem)
                if outcome.problems:
                    failed.append(name)
                log.info("%s", outcome.summary())
                figures.append(
                    prometheus.DomainFigures(
                        name,
                        prometheus.ERROR if outcome.problems else prometheus.OK,
                        outcome.bytes_copied,
                        outcome.overlay_seconds,
                        outcome.total_seconds,
                        outcome.quiesced is not None,
                    )
                )
    finally:
        if prometheus_dir:
            _write_prometheus(prometheus_dir, figures)
    if fatal:
        return EXIT_FATAL
    if failed:
        log.error("%d of %d domain(s) failed: %s", len(failed), len(names), ", ".join(failed))
        return EXIT_DOMAIN_ERRORS
    return EXIT_OK


def _write_prometheus(directory: str, figures: list[prometheus.DomainFigures]) -> None:
    try:
        path = prometheus.write(directory, figures)
    except OSError as error:
        log.error("cannot write the Prometheus figures to %s: %s", directory, error.strerror)
    else:
        log.debug("Prometheus figures written to %s", path)


def _hypervisor_or_fatal(uri: str):
    from backupninja_kvm.hypervisor import Hypervisor

    try:
        return Hypervisor(uri)
    except HypervisorError as error:
        log.critical("%s", error)
        return None


def recover(args: argparse.Namespace) -> int:
    """``recover [DOMAIN...]``: bring domains back onto their own images."""
    from backupninja_kvm import journal, recovery
    from backupninja_kvm.lock import domain_lock

    hypervisor = _hypervisor_or_fatal(args.uri)
    if hypervisor is None:
        return EXIT_FATAL
    try:
        known = hypervisor.list_domains()
        names = args.domains or [d.name for d in known]
        unknown = sorted(set(names) - {d.name for d in known})
        if unknown:
            log.critical("unknown domain(s): %s", ", ".join(unknown))
            return EXIT_FATAL
        status = EXIT_OK
        repaired = 0
        for name in names:
            domain = hypervisor.domain(name)
            try:
                with domain_lock(name, domain.uuid):
                    done = recovery.recover_domain(domain)
            except OverlayLeftError as error:
                log.critical("%s", error)
                status = EXIT_FATAL
            except (DomainError, HypervisorError, journal.JournalError) as error:
                log.error("%s", error)
                status = max(status, EXIT_DOMAIN_ERRORS)
            else:
                if done:
                    repaired += 1
                    log.warning("%s: repaired: %s", name, "; ".join(done))
                elif args.domains:
                    log.info("%s: nothing to repair", name)
        if not repaired and not args.domains and status == EXIT_OK:
            log.info("nothing to repair: no domain runs on an overlay of ours, no journal left")
        return status
    finally:
        hypervisor.close()


def status(args: argparse.Namespace) -> int:
    """``status``: domains running on an overlay of ours, and pending journals."""
    from backupninja_kvm import journal
    from backupninja_kvm.disks import is_our_overlay, overlay_created, parse_disks
    from backupninja_kvm.preflight import allocated_bytes

    hypervisor = _hypervisor_or_fatal(args.uri)
    if hypervisor is None:
        return EXIT_FATAL
    try:
        found = 0
        for summary in hypervisor.list_domains():
            domain = hypervisor.domain(summary.name)
            xml = domain.xml() if summary.active else domain.xml(inactive=True)
            state = "running" if summary.active else "shut off"
            try:
                entry = journal.read(summary.uuid)
            except journal.JournalError as error:
                found += 1
                print(f"{summary.name} ({state}): {error}")
                entry = None
            pending = journal.journal_path(summary.uuid) if entry else ""
            on_overlay = 0
            for disk in parse_disks(xml):
                if disk.path and is_our_overlay(disk.path) and disk.backing:
                    on_overlay += 1
                    since = overlay_created(disk.path)
                    print(
                        f"{summary.name} ({state}): {disk.target} on overlay {disk.path} "
                        f"since {since}, {human_bytes(allocated_bytes(disk.path))}"
                        + (f", journal {pending}" if pending else "")
                    )
            found += on_overlay
            if entry and not on_overlay:
                found += 1
                frozen = entry.quiesce and summary.active
                print(
                    f"{summary.name} ({state}): journal {pending} of a backup interrupted in "
                    f"phase {entry.phase} (pid {entry.pid})"
                    + (", the guest's filesystems may still be frozen" if frozen else "")
                    + f"; `backupninja-kvm recover {summary.name}` repairs it"
                )
        if not found:
            print("no domain runs on an overlay of backupninja-kvm")
        return EXIT_OK if not found else EXIT_DOMAIN_ERRORS
    finally:
        hypervisor.close()


def example_config(_args: argparse.Namespace) -> int:
    """``example-config``: print the documented example action file."""
    sys.stdout.write(config.render_example())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupninja-kvm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_parser = commands.add_parser(
        "run", help="back up the domains selected by a .kvm action file"
    )
    run_parser.add_argument("action", metavar="ACTION", help="path of the .kvm action file")
    run_parser.add_argument(
        "-t",
        "--test",
        action="store_true",
        help="dry run: check the file and print the plan, change nothing",
    )
    run_parser.add_argument("-q", "--quiet", action="store_true", help="leave out Debug lines")
    run_parser.add_argument(
        "--prometheus-dir",
        metavar="DIR",
        help="also write per-domain figures to DIR/backupninja_kvm.prom (node exporter "
        "textfile collector); the handler passes backupninja's prom_textfile_dir when "
        "reportprom is set",
    )
    run_parser.set_defaults(function=run)

    recover_parser = commands.add_parser(
        "recover",
        help="merge back and clean up what an interrupted backup left (all domains by default)",
    )
    recover_parser.add_argument("domains", nargs="*", metavar="DOMAIN")
    recover_parser.add_argument("-c", "--connect", dest="uri", default="qemu:///system")
    recover_parser.set_defaults(function=recover)

    status_parser = commands.add_parser(
        "status",
        help="list domains on an overlay of ours or with the journal of an interrupted backup"
        " (exit 4 when any)",
    )
    status_parser.add_argument("-c", "--connect", dest="uri", default="qemu:///system")
    status_parser.set_defaults(function=status)

    example_parser = commands.add_parser(
        "example-config", help="print an example action file with every key documented"
    )
    example_parser.set_defaults(function=example_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    report.setup(debug=not getattr(args, "quiet", False))
    interrupts.install()
    try:
        return args.function(args)
    except Interrupted as interrupt:
        log.critical("interrupted by %s", interrupt.signame)
        return EXIT_FATAL
    except BackupNinjaKvmError as error:
        log.critical("%s", error)
        return EXIT_FATAL
