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
import re
import sys
import time

from backupninja_kvm import (
    __version__,
    config,
    guestmount,
    interrupts,
    prometheus,
    rehearse,
    report,
    setcommands,
)
from backupninja_kvm.backup import back_up_domain
from backupninja_kvm.destination import new_stamp as destination_stamp
from backupninja_kvm.errors import (
    BackupNinjaKvmError,
    ConfigError,
    DomainError,
    HypervisorError,
    OverlayLeftError,
)
from backupninja_kvm.interrupts import Interrupted
from backupninja_kvm.plan import make_plan
from backupninja_kvm.quiesce import quiesce_wanted
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
block commit + pivot, or blockpull) and deleted (stage = full).

With stage = freeze and stage = thaw, the images ride along in backupninja's
own .rsync, .borg or .restic action instead: the freeze exposes the frozen
images read-only in the view (VIEW/DOMAIN/TARGET-IMAGE, domain.xml,
manifest.json), the ship action copies them, the thaw merges back; a guard
merges back when backupninja ends without the thaw, or at max_frozen.
"""

EPILOG = f"""\
Action file keys (see `backupninja-kvm example-config` for help and defaults):
{config.key_summary()}

Exit status of run and recover: 0 success; 4 some domains failed (Error lines);
2 Fatal (bad configuration, no libvirt, or a domain left on an overlay).

Exit status of status: 0 nothing to repair (a backup in progress, or a freeze
whose guard waits, is not an alarm); 4 some journal of an interrupted backup
is left (a domain on an overlay, or a domain that no longer exists), or a
freeze whose guard is gone; 2 libvirt cannot be reached, or a DOMAIN named is
unknown and has no journal.

Reading sets back: `sets`, `verify`, `restore` name a set by its folder, or
DOMAIN or DOMAIN/STAMP with -a ACTION (its destination, local or remote) or
-d DIR|[USER@]HOST:DIR. Exit status of verify: 0 sound, 1 damaged (Error
lines name each file), 2 not checked. Of restore: 0 restored, 2 refused or
failed (the Fatal line says what, if anything, was changed).

After a crash or a kill, the next run repairs each domain before backing it
up; `backupninja-kvm status` shows what the journals of interrupted backups
name (domains still on an overlay, domains gone since), and
`backupninja-kvm recover [DOMAIN...]` repairs them at once.
"""


def _selected(settings: config.Settings, known: list[str]) -> list[str]:
    """The domains to back up, in the file's order, each once (a name listed
    twice is a Warning: it may stand for a VM that was meant and is missing)."""
    names = list(settings.domains) if settings.domains else known
    seen: set[str] = set()
    for name in names:
        if name in seen:
            log.warning(
                "%s: %s is listed more than once; it is backed up once",
                settings.where("source", "domains"),
                name,
            )
        seen.add(name)
    return [n for n in dict.fromkeys(names) if not settings.is_excluded(n)]


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
        config.check_permissions(args.action, os.environ.get("BACKUPNINJA_KVM_ADMINGROUP", ""))
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
        from backupninja_kvm import stages

        ninja = stages.Ninja.from_environ(os.environ)
        if settings.stage == "thaw":
            if args.test:
                return stages.thaw_dry_run(settings)
            return stages.thaw_all(hypervisor, settings, ninja)
        swept = EXIT_OK if args.test else stages.sweep(hypervisor, ninja)
        known = [d.name for d in hypervisor.list_domains()]
        names = _selected(settings, known)
        unknown = [name for name in names if name not in known]
        for name in unknown:
            log.error(
                "%s: unknown domain %r: libvirt at %s does not know it, so it was not backed "
                "up; remove it from domains if the VM was decommissioned, or fix the name",
                settings.where("source", "domains"),
                name,
                settings.uri,
            )
        names = [name for name in names if name in known]
        if not names:
            if unknown:
                return EXIT_DOMAIN_ERRORS
            log.warning("%s: no domain selected, nothing to back up", settings.path)
            return EXIT_OK
        if settings.stage == "freeze" and args.test:
            status = stages.freeze_dry_run(hypervisor, settings, names, ninja)
        elif settings.stage == "freeze":
            status = stages.freeze_all(hypervisor, settings, names, ninja)
        elif args.test:
            status = _dry_run(hypervisor, settings, names)
        else:
            status = _back_up_all(hypervisor, settings, names, args.prometheus_dir, unknown)
        status = stages.worse(status, swept)
        return EXIT_DOMAIN_ERRORS if unknown and status == EXIT_OK else status
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
            problems = _dry_run_domain(hypervisor, settings, name)
        except (DomainError, HypervisorError) as error:
            log.error("test run: %s", error)
            failed.append(name)
        else:
            for problem in problems:
                log.error("test run: %s", problem)
            if problems:
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


def _dry_run_domain(hypervisor, settings: config.Settings, name: str) -> list[str]:
    """The real run's checks for one domain; returns the Error lines of a
    backup that would be made but incomplete. Raises DomainError for one that
    would fail."""
    from backupninja_kvm import journal, lock, retention
    from backupninja_kvm import plan as plans
    from backupninja_kvm.destination import SetEntry
    from backupninja_kvm.disks import guest_agent_connected, overlay_paths
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
    plan = make_plan(
        domain, settings.backing, plans.block_refusal(settings), settings.exclude_disks
    )
    log.info("test run, would %s", plan.describe())
    if not plan.disks:
        raise DomainError(plans.nothing_to_back_up(plan))
    unsaved = [text for s in plan.skipped if (text := plans.report_skipped(name, s))]
    if not repair:  # else the chain is the one the repair leaves, not this one
        plans.refuse_unsafe_chains(plan)
    if quiesce_wanted(plan, settings) and not guest_agent_connected(domain.xml()):
        message = f"{name}: the guest agent is not connected: the freeze would fail"
        if settings.quiesce == "yes":
            raise DomainError(f"{message} and quiesce = yes skips the domain")
        log.warning("test run: %s; the snapshot would be crash-consistent", message)
    backup_set = plans.open_set(settings, name, destination_stamp())
    overlays = overlay_paths(plan.disks, backup_set.stamp, settings.overlaydir, name)
    plans.check_space(plan, settings, overlays, backup_set)
    log.info("test run: %s: would write the set %s", name, backup_set.final_path)
    from backupninja_kvm import changed

    try:
        for line in changed.forecast(domain, plan, settings, backup_set):
            log.info("test run: %s", line)
    except (OSError, TransferError, HypervisorError) as error:
        log.info("test run: %s: cannot tell which disks changed blocks would copy: %s", name, error)
    try:
        entries = backup_set.entries()
    except (OSError, TransferError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise DomainError(
            f"{name}: cannot list the sets in {backup_set.domain_dir}: {reason}"
        ) from None

    new = SetEntry(backup_set.stamp, has_images=bool(plan.disks))
    policy = settings.retention()
    verdicts = retention.plan([*entries, new], policy, backup_set.stamp)
    pruned = retention.removed(verdicts)
    if pruned:
        log.info(
            "test run: %s: %s would remove %d old set(s): %s; keeps %s",
            name,
            policy.describe(),
            len(pruned),
            ", ".join(pruned),
            retention.explain(verdicts),
        )
    else:
        log.info(
            "test run: %s: %s would remove no set; keeps %s",
            name,
            policy.describe(),
            retention.explain(verdicts),
        )
    return unsaved


def _back_up_all(
    hypervisor,
    settings: config.Settings,
    names: list[str],
    prometheus_dir: str | None = None,
    unknown: list[str] | None = None,
) -> int:
    if not _destination_checks(settings):
        return EXIT_FATAL
    failed, fatal = list(unknown or []), []
    figures: list[prometheus.DomainFigures] = []
    try:
        for position, name in enumerate(names):
            stamp = destination_stamp()  # the set takes the next free name after it
            started = time.monotonic()
            left = ", ".join(names[position + 1 :]) or "none"
            domain = None
            try:
                domain = hypervisor.domain(name)
                outcome = back_up_domain(domain, settings, stamp)
            except Interrupted as interrupt:
                state, on_overlay = _state_after_interrupt(domain)
                log.critical(
                    "interrupted by %s during the backup of %s: %s; domains not backed up: %s",
                    interrupt.signame,
                    name,
                    state,
                    left,
                )
                figures.append(
                    prometheus.DomainFigures(
                        name, prometheus.FATAL if on_overlay else prometheus.ERROR
                    )
                )
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
            signame = interrupts.received()
            if signame:  # it came during a merge or a repair that then failed (see above)
                log.critical(
                    "interrupted by %s during the backup of %s; domains not backed up: %s",
                    signame,
                    name,
                    left,
                )
                return EXIT_FATAL
    finally:
        if prometheus_dir:
            _write_prometheus(prometheus_dir, figures)
    if fatal:
        return EXIT_FATAL
    if failed:
        total = len(names) + len(unknown or [])
        log.error("%d of %d domain(s) failed: %s", len(failed), total, ", ".join(failed))
        return EXIT_DOMAIN_ERRORS
    return EXIT_OK


def _state_after_interrupt(domain) -> tuple[str, bool]:
    """What an interrupted backup left of *domain* (None: not looked up yet),
    as the message says it, and whether it may still be on an overlay."""
    from backupninja_kvm import journal, merge

    if domain is None:
        return "nothing was done to it yet", False
    name = domain.name
    in_use = merge.overlays_in_use(domain)
    if in_use:
        return (
            f"it is still on the overlay(s) {', '.join(in_use)} and no set was made for it; "
            f"nothing is lost, do not delete them: run `backupninja-kvm recover {name}`"
        ), True
    if in_use is None:
        return (
            f"its state could not be read, it may still be on an overlay, and no set was "
            f"made for it: see `backupninja-kvm status`, run `backupninja-kvm recover {name}`"
        ), True
    pending = journal.journal_path(domain.uuid)
    if os.path.exists(pending):
        return (
            f"it runs on its own images again, no set was made for it, but the journal "
            f"{pending} is left: run `backupninja-kvm recover {name}`"
        ), False
    return "it runs on its own images again, no set was made for it", False


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
    """``recover [DOMAIN...]``: bring domains back onto their own images.

    Also handles the journals of domains that no longer exist (a transient
    domain destroyed during its backup), named by the domain name or UUID
    the journal records: their overlays are merged offline.
    """
    from backupninja_kvm import journal, recovery

    hypervisor = _hypervisor_or_fatal(args.uri)
    if hypervisor is None:
        return EXIT_FATAL
    try:
        known = hypervisor.list_domains()
        vanished, unreadable = recovery.vanished_journals(hypervisor)
        status = EXIT_OK
        if args.domains:
            targets, unknown = _recover_targets(args.domains, known, vanished)
            if unknown:
                log.critical(
                    "unknown domain(s): %s (neither a domain at %s nor the domain name or "
                    "UUID of a journal in %s)",
                    ", ".join(unknown),
                    args.uri,
                    journal.journal_dir(),
                )
                return EXIT_FATAL
        else:
            targets = [(d.name, None) for d in known] + [(j.domain, j) for j in vanished]
            for problem in unreadable:
                log.error("%s; remove it once checked", problem)
                status = EXIT_DOMAIN_ERRORS
        with interrupts.critical():
            ridden = _recover_rides(hypervisor, set(args.domains))
        if ridden == EXIT_FATAL or (ridden and status != EXIT_FATAL):
            status = ridden
        repaired = 0
        for position, (name, left_by) in enumerate(targets):
            try:
                with interrupts.critical():  # a signal waits until this domain is done
                    result = _recover_one(hypervisor, name, left_by, quiet=not args.domains)
            except Interrupted as interrupt:
                log.critical(
                    "interrupted by %s after the recovery of %s; not handled: %s",
                    interrupt.signame,
                    name,
                    ", ".join(n for n, _ in targets[position + 1 :]) or "none",
                )
                return EXIT_FATAL
            if result == EXIT_OK:
                repaired += 1
            elif result == EXIT_FATAL or (result is not None and status != EXIT_FATAL):
                status = result  # a Fatal outranks an Error
        if not repaired and not args.domains and status == EXIT_OK:
            log.info("nothing to repair: no domain runs on an overlay of ours, no journal left")
        return status
    finally:
        hypervisor.close()


def _recover_targets(wanted: list[str], known, vanished) -> tuple[list, list[str]]:
    """(domain name, journal of a vanished domain or None) for each name or
    UUID asked for, and the names that match nothing."""
    targets: list = []
    unknown = []
    for item in wanted:
        matched = [(d.name, None) for d in known if item in (d.name, d.uuid)]
        matched += [(j.domain, j) for j in vanished if item in (j.domain, j.uuid)]
        if not matched:
            unknown.append(item)
        targets += [target for target in matched if target not in targets]
    return targets, unknown


def _recover_one(hypervisor, name: str, left_by, quiet: bool) -> int | None:
    """Repair one domain (or, with *left_by*, the journal of a vanished one)
    under its lock, and report it. Returns EXIT_OK when something was
    repaired, None when nothing was to do, else the exit status."""
    from backupninja_kvm import journal, recovery
    from backupninja_kvm.hypervisor import ERR_NO_DOMAIN
    from backupninja_kvm.lock import domain_lock

    try:
        if left_by is not None:
            with domain_lock(name, left_by.uuid):
                done = recovery.recover_vanished(hypervisor, left_by)
        else:
            domain = hypervisor.domain(name)
            with domain_lock(name, domain.uuid):
                done = recovery.recover_domain(domain)
    except OverlayLeftError as error:
        log.critical("%s", error)
        return EXIT_FATAL
    except HypervisorError as error:
        if quiet and left_by is None and error.code == ERR_NO_DOMAIN:
            return None  # gone since listed: a journal it left is for the next recover
        log.error("%s", error)
        return EXIT_DOMAIN_ERRORS
    except (DomainError, journal.JournalError, OSError) as error:
        log.error("%s", error)
        return EXIT_DOMAIN_ERRORS
    if not done:
        if not quiet:
            log.info("%s: nothing to repair", name)
        return None
    label = f"{name} (no longer exists)" if left_by is not None else name
    log.warning("%s: repaired: %s", label, "; ".join(done))
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    """``status``: what the journals of interrupted backups name, and backups
    in progress.

    Only a journal says that a layer is ours: a disk named like our overlay
    without one (what a finished ``merge = pull`` leaves) is the domain's own.
    Exit 0 when nothing needs repair (a backup in progress is no alarm), 4
    when something does, 2 when libvirt cannot be reached or a named domain
    is unknown.
    """
    from backupninja_kvm import journal

    hypervisor = _hypervisor_or_fatal(args.uri)
    if hypervisor is None:
        return EXIT_FATAL
    try:
        found = 0
        known = hypervisor.list_domains()
        wanted = set(args.domains)
        vanished = sorted(set(journal.all_journals()) - {d.uuid for d in known})
        if wanted:
            vanished = [u for u in vanished if wanted & {u, _journal_domain(u)}]
            unknown = wanted - {d.name for d in known} - {d.uuid for d in known}
            unknown -= set(vanished) | {_journal_domain(u) for u in vanished}
            if unknown:
                print(f"unknown domain(s), with no journal either: {', '.join(sorted(unknown))}")
                return EXIT_FATAL
            known = [d for d in known if wanted & {d.name, d.uuid}]
        found += _status_of_rides(wanted)
        for summary in known:
            found += _status_of_domain(hypervisor, summary)
        for uuid in vanished:
            found += _status_of_vanished(uuid)
        if not found:
            print("no journal of an interrupted backup: no domain runs on an overlay of ours")
        return EXIT_OK if not found else EXIT_DOMAIN_ERRORS
    finally:
        hypervisor.close()


def _rides_of(wanted: set[str]) -> list:
    """The ride records (stage = freeze) of the *wanted* domains (all when
    none is named); prints the unreadable ones."""
    from backupninja_kvm import ride

    rides, problems = ride.all_rides()
    for problem in problems:
        print(problem)
    return [r for r in rides if not wanted or any(wanted & {d.name, d.uuid} for d in r.domains)]


def _status_of_rides(wanted: set[str]) -> int:
    """Print each freeze of stage = freeze; the number that need repair."""
    from backupninja_kvm import ride

    found = 0
    for record in _rides_of(wanted):
        if record.state == ride.THAWED:
            lines = "; ".join(f"{level}: {text}" for level, text in record.report)
            print(f"view {record.view}: its guard thawed the domains on its own: {lines}")
        elif ride.guard_alive(record):
            print(f"{record.describe()}: in progress, the thaw or the guard merges it back")
        else:
            print(
                f"{record.describe()}: the guard is gone and no thaw ran: "
                f"`backupninja-kvm recover` thaws it"
            )
            found += 1
    return found


def _recover_rides(hypervisor, wanted: set[str]) -> int:
    """recover: relay what guards did, thaw the freezes whose guard is gone."""
    from backupninja_kvm import ride, stages

    status = EXIT_OK
    for record in _rides_of(wanted):
        if record.state == ride.THAWED:
            status = stages.worse(status, stages.relay_guard_report(record))
        elif not ride.guard_alive(record):
            log.warning("%s: its guard is gone; thawing it now", record.describe())
            status = stages.worse(status, stages.thaw_without_guard(hypervisor, record))
        else:
            log.info("%s: its guard still waits for the thaw; left alone", record.describe())
    return status


def _journal_domain(uuid: str) -> str:
    """The domain name a journal records, "" when it cannot be read."""
    from backupninja_kvm import journal

    try:
        entry = journal.read(uuid)
    except journal.JournalError:
        return ""
    return entry.domain if entry else ""


def _in_progress(uuid: str) -> str | None:
    """ "backup in progress (pid N, since ...)" while a backup (or a
    ``recover``) holds the domain's lock, None when nobody does."""
    from backupninja_kvm import lock

    holder = lock.holder(uuid)
    if holder is None:
        return None
    match = re.match(r"pid (\d+): (.*), since (.+)$", holder)
    if not match:
        return f"backup in progress ({holder})"
    pid, command, since = match.groups()
    if command.startswith("guard of the freeze"):
        return f"frozen for a ship action, held by the {command} (pid {pid}, since {since})"
    what = "repair" if " recover" in f" {command}" else "backup"
    return f"{what} in progress (pid {pid}, since {since})"


def _status_of_domain(hypervisor, summary) -> int:
    """Print what one domain's journal names; 1 when it needs repair."""
    from backupninja_kvm import journal, recovery
    from backupninja_kvm.disks import overlay_created, top_paths
    from backupninja_kvm.preflight import allocated_bytes

    state = "running" if summary.active else "shut off"
    running = _in_progress(summary.uuid)
    if running:
        print(f"{summary.name} ({state}): {running}")
        return 0
    try:
        entry = journal.read(summary.uuid)
    except journal.JournalError as error:
        print(f"{summary.name} ({state}): {error}")
        return 1
    if entry is None:
        return 0
    try:
        domain = hypervisor.domain(summary.name)
        tops = set(top_paths(domain.xml()).values()) if summary.active else set()
        if summary.persistent:
            tops |= set(top_paths(domain.xml(inactive=True)).values())
        # A finished pull left the overlay as the disk: nothing to merge there.
        on_overlay = [
            disk
            for disk in entry.disks
            if disk.overlay in tops
            and recovery.decide(disk, recovery.observe(domain, disk), entry.merge)
        ]
    except HypervisorError:
        on_overlay = []  # gone meanwhile: its journal is all there is to say
    pending = journal.journal_path(summary.uuid)
    repair = f"`backupninja-kvm recover {summary.name}` repairs it"
    for disk in on_overlay:
        print(
            f"{summary.name} ({state}): {disk.target} on overlay {disk.overlay} "
            f"(base {disk.base}) since {overlay_created(disk.overlay)}, "
            f"{human_bytes(allocated_bytes(disk.overlay))}; journal {pending} of a backup "
            f"interrupted in phase {entry.phase} (pid {entry.pid}); {repair}"
        )
    if not on_overlay:
        frozen = entry.quiesce and summary.active
        print(
            f"{summary.name} ({state}): journal {pending} of a backup interrupted in "
            f"phase {entry.phase} (pid {entry.pid})"
            + (", the guest's filesystems may still be frozen" if frozen else "")
            + f"; {repair}"
        )
    return 1


def _status_of_vanished(uuid: str) -> int:
    """A journal whose domain no longer exists (a transient domain destroyed
    during the backup): its overlays may hold the guest's last writes."""
    from backupninja_kvm import journal

    running = _in_progress(uuid)
    try:
        entry = journal.read(uuid)
    except journal.JournalError as error:
        print(f"domain {uuid} (no longer exists): {error}")
        return 1
    if entry is None:  # removed meanwhile by the backup that held it
        return 0
    name = f"{entry.domain} ({uuid}, no longer exists)"
    if running:
        print(f"{name}: {running}")
        return 0
    disks = "; ".join(
        f"{disk.target}: overlay {disk.overlay}"
        + ("" if os.path.lexists(disk.overlay) else " (missing)")
        + f" on base {disk.base}"
        for disk in entry.disks
    )
    print(
        f"{name}: journal {journal.journal_path(uuid)} of a backup interrupted in phase "
        f"{entry.phase} (pid {entry.pid}); {disks}; the overlays may hold the guest's last "
        f"writes: `backupninja-kvm recover {uuid}` merges them into their bases offline"
    )
    return 1


def guard(args: argparse.Namespace) -> int:
    """``guard VIEW`` (hidden): started by stage = freeze, see ``guard``."""
    from backupninja_kvm import guard as guards

    locks = {}
    for item in args.locks.split(","):
        uuid, _, fd = item.partition("=")
        locks[uuid] = int(fd)
    return guards.main(args.view, locks, args.ready_fd, args.freeze_pid)


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
        help="list what the journals of interrupted backups name (domains on an overlay of "
        "ours, domains gone since) and backups in progress; exit 0 nothing to repair, "
        "4 something to repair, 2 no libvirt or an unknown DOMAIN",
    )
    status_parser.add_argument(
        "domains",
        nargs="*",
        metavar="DOMAIN",
        help="only these domains (name or UUID; also a domain gone since, by its journal)",
    )
    status_parser.add_argument("-c", "--connect", dest="uri", default="qemu:///system")
    status_parser.set_defaults(function=status)

    guestmount.add_parser(commands)  # mount, umount

    guard_parser = commands.add_parser("guard")  # started by stage = freeze only
    guard_parser.add_argument("view")
    guard_parser.add_argument("--locks", required=True)
    guard_parser.add_argument("--ready-fd", type=int, required=True)
    guard_parser.add_argument("--freeze-pid", type=int, required=True)
    guard_parser.set_defaults(function=guard)

    setcommands.add_parser(commands)

    rehearse.add_parser(commands)

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
