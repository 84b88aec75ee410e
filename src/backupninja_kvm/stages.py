"""The ride-along stages: ``stage = freeze`` and ``stage = thaw``.

The freeze, run by backupninja before its own .rsync, .borg or .restic
action, refuses to freeze when the thaw predictably will not run in this
backupninja run (``ninja_run``); then, domain by domain, it repairs, plans,
freezes (``freeze``, quiesce included) and exposes the frozen images in the
view (``view``); finally it starts the guard (``guard``), hands it the
domains' locks, and exits. The ride record (``ride``) says which freeze the
domains belong to; each domain's journal still makes its overlays ours.

The thaw takes the locks back from the guard (or, when the guard is gone,
takes them itself) and thaws (``thaw``): view down, frozen files checked,
merge, one line per domain. What a guard did on its own is relayed as its
lines by the thaw of the same run, or by the next ``.kvm`` action (``sweep``).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from backupninja_kvm import config, freeze, interrupts, lock, merge, ninja_run, recovery, ride
from backupninja_kvm import journal as journals
from backupninja_kvm import thaw as thaws
from backupninja_kvm import view as views
from backupninja_kvm.backup import merge as merge_back
from backupninja_kvm.config import Settings
from backupninja_kvm.disks import BLOCK_NOT_EXPOSED, overlay_paths, parse_disks
from backupninja_kvm.errors import ConfigError, DomainError, HypervisorError, OverlayLeftError
from backupninja_kvm.hypervisor import Domain, Hypervisor
from backupninja_kvm.outcome import Outcome
from backupninja_kvm.plan import (
    Plan,
    checked_plan,
    make_plan,
    nothing_to_back_up,
    refuse_unsafe_chains,
    report_skipped,
)
from backupninja_kvm.preflight import overlay_needs, shortfalls
from backupninja_kvm.quiesce import quiesce_wanted
from backupninja_kvm.report import log

EXIT_OK, EXIT_FATAL, EXIT_DOMAIN_ERRORS = 0, 2, 4
_RANK = {EXIT_OK: 0, EXIT_DOMAIN_ERRORS: 1, EXIT_FATAL: 2}


def worse(*statuses: int) -> int:
    """The exit status that says most: a Fatal outranks an Error."""
    return max(statuses, key=lambda status: _RANK.get(status, 2))


# The handler passes backupninja's shell variables (ninja_run.HANDLER_VARIABLES,
# plus logfile) as BACKUPNINJA_KVM_NINJA_name, and backupninja's $$ as ..._PID.
NINJA_PREFIX = "BACKUPNINJA_KVM_NINJA_"
GUARD_READY_SECONDS = 30


@dataclass(frozen=True)
class Ninja:
    """The backupninja run this action is part of."""

    context: ninja_run.Context
    pid: int
    logfile: str = ""
    test: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Ninja | None:
        """None when this helper does not run from backupninja's handler."""
        values = {
            k[len(NINJA_PREFIX) :]: v for k, v in environ.items() if k.startswith(NINJA_PREFIX)
        }
        try:
            pid = int(values.get("PID", ""))
        except ValueError:
            return None
        for name in ("LC_ALL", "LC_COLLATE", "LANG"):
            if name in environ:
                values.setdefault(name, environ[name])
        return cls(
            ninja_run.Context.from_variables(values),
            pid,
            values.get("logfile", ""),
            bool(values.get("test")),
        )

    def owner(self) -> ride.Process | None:
        return ride.Process.of(self.pid)


def _level(level: str):
    return {"Warning": log.warning, "Error": log.error, "Fatal": log.critical}.get(level, log.info)


# --- the sweep: what earlier freezes left, before anything else ------------


def sweep(hypervisor: Hypervisor, ninja: Ninja | None, skip_view: str = "") -> int:
    """Relay what guards did on their own, and repair the freezes whose guard
    and backupninja run are both gone (a guard killed too). Returns the exit
    status these findings call for."""
    status = EXIT_OK
    rides, problems = ride.all_rides()
    for problem in problems:
        log.error("%s; remove it once checked", problem)
        status = EXIT_DOMAIN_ERRORS
    current = ninja.owner() if ninja else None
    for record in rides:
        if record.view == skip_view:
            continue
        if record.state == ride.THAWED:
            status = worse(status, relay_guard_report(record))
            continue
        if ride.guard_alive(record):
            continue  # frozen now, for a ship action of a running backupninja
        if record.owner.alive() and record.owner != current:
            continue  # its own thaw (in that run) takes over
        log.warning(
            "%s: its guard is gone (killed?) and the thaw did not run; repairing now",
            record.describe(),
        )
        status = worse(status, thaw_without_guard(hypervisor, record))
    return status


def relay_guard_report(record: ride.Ride) -> int:
    """Say what a guard did, at the levels it said it; forget the record."""
    status = EXIT_OK
    for level, text in record.report:
        _level(level)("%s", text)
        if level == "Error":
            status = worse(status, EXIT_DOMAIN_ERRORS)
    ride.remove(record.view)
    return status


def thaw_without_guard(hypervisor: Hypervisor, record: ride.Ride) -> int:
    """Thaw the domains of *record* under locks taken here."""
    held: dict[str, int] = {}
    status = EXIT_OK
    try:
        for exposed in record.domains:
            try:
                held[exposed.uuid] = lock.acquire(exposed.name, exposed.uuid)
            except DomainError as error:
                log.error("%s; not thawed by this run", error)
                status = EXIT_DOMAIN_ERRORS
        mine = replace(record, domains=tuple(d for d in record.domains if d.uuid in held))
        with interrupts.critical():
            errors, fatal = thaws.thaw_ride(hypervisor, mine, thaws.options_of(record), wait=10)
        if len(held) == len(record.domains):
            ride.remove(record.view)
        else:
            left = tuple(d for d in record.domains if d.uuid not in held)
            ride.write(replace(record, domains=left))
    finally:
        for uuid, fd in held.items():
            lock.release(fd, uuid)
    if fatal:
        return EXIT_FATAL
    return EXIT_DOMAIN_ERRORS if errors else status


# --- stage = freeze -----------------------------------------------------------


def _same_view(view: str):
    def is_thaw(path: str, text: str) -> bool:
        if not ninja_run.is_kvm_thaw(path, text):
            return False
        named = ninja_run.getconf(text, "general", "view") or config.DEFAULT_VIEW
        return os.path.normpath(named.strip()) == view

    return is_thaw


def _thaw_action(ninja: Ninja, view: str) -> str:
    later = ninja_run.predict(ninja.context).after(ninja.context.file)
    is_thaw = _same_view(view)
    for step in later:
        if step.runs and is_thaw(step.path, ninja_run._read_text(step.path)):
            return step.path
    return ""


def preflight(hypervisor: Hypervisor, settings: Settings, ninja: Ninja | None) -> Settings | None:
    """The checks before anything is frozen; returns the thaw's settings, or
    None after Fatal lines (nothing frozen)."""
    view = settings.view
    if ninja is None:
        log.critical(
            "%s: stage = freeze runs only as one action of a backupninja run, before its "
            "ship action and its thaw (backupninja-kvm run alone would leave the domains "
            "frozen with nobody to thaw them); nothing is frozen",
            settings.where("general", "stage"),
        )
        return None
    refusals = ninja_run.freeze_refusals(ninja.context, view, is_thaw=_same_view(view))
    for refusal in refusals:
        log.critical("%s", refusal)
    if refusals:
        return None
    thaw_path = _thaw_action(ninja, view)
    try:
        thaw_settings = config.load(thaw_path)
    except ConfigError as error:
        for problem in error.problems:
            log.critical("%s", problem)
        log.critical(
            "%s: the thaw %s is invalid and would not merge the domains back: nothing is frozen",
            settings.path,
            thaw_path,
        )
        return None
    live_dirs: set[str] = set()
    images: list[str] = []
    for summary in hypervisor.list_domains():
        try:
            xml = hypervisor.domain(summary.name).xml()
        except HypervisorError:
            continue
        for disk in parse_disks(xml):
            if disk.path and disk.source_type == "file":
                live_dirs.add(os.path.dirname(disk.path))
                images.append(disk.path)
    if settings.overlaydir:
        live_dirs.add(settings.overlaydir)
    for lint in ninja_run.ship_lints(ninja.context, view, sorted(live_dirs), images):
        _level(lint.level)("%s", lint.message)
    return thaw_settings


def _leftover_views(view: str) -> None:
    """Take down what an earlier freeze of this view left in it (its ride is
    gone: its domains were repaired)."""
    try:
        names = sorted(os.listdir(view))
    except FileNotFoundError:
        return
    except OSError as error:
        raise DomainError(f"view {view}: {error.strerror}") from None
    for name in names:
        try:
            result = views.take_down(view, name, wait=10)
        except views.ViewError as error:
            log.error("%s", error)
            continue
        if result.unmounted or result.removed:
            log.warning("took down %s, left by an earlier freeze", os.path.join(view, name))


def freeze_all(
    hypervisor: Hypervisor, settings: Settings, names: list[str], ninja: Ninja | None
) -> int:
    """``stage = freeze``: freeze and expose *names*, then leave the guard."""
    view = settings.view
    status = sweep(hypervisor, ninja)
    existing = _existing_ride(view)
    if existing is not None:
        log.critical(
            "%s: %s; it must be thawed first: nothing is frozen",
            settings.where("general", "view"),
            existing.describe(),
        )
        return EXIT_FATAL
    thaw_settings = preflight(hypervisor, settings, ninja)
    if thaw_settings is None:
        return EXIT_FATAL
    assert ninja is not None
    owner = ninja.owner()
    if owner is None:
        log.critical("backupninja (pid %d) is gone: nothing is frozen", ninja.pid)
        return EXIT_FATAL
    _leftover_views(view)
    started = time.time()
    record = ride.Ride(
        view=view,
        action=settings.path,
        thaw_action=thaw_settings.path,
        uri=settings.uri,
        owner=owner,
        deadline=started + settings.max_frozen,
        merge=thaw_settings.merge,
        merge_timeout=thaw_settings.merge_timeout,
        bandwidth=thaw_settings.bandwidth,
        logfile=ninja.logfile,
        started=started,
    )
    ride.write(record)
    locks: dict[str, int] = {}
    domains: list[Domain] = []
    failed: list[str] = []
    for name in names:
        try:
            domain = hypervisor.domain(name)
            locks[domain.uuid] = lock.acquire(name, domain.uuid)
        except (DomainError, HypervisorError) as error:
            log.error("%s", error)
            failed.append(name)
            continue
        domains.append(domain)
    try:
        # The guard first, while nothing is frozen: its start-up costs no
        # frozen time. It holds copies of every lock, and lets go of those
        # of the domains the record does not name once this process ends.
        record = _start_guard(record, locks) if domains else record
    except DomainError as error:
        log.error("%s; nothing is frozen", error)
        for uuid, fd in locks.items():
            lock.release(fd, uuid)
        ride.remove(view)
        return worse(status, EXIT_DOMAIN_ERRORS)
    try:
        for domain in domains:
            try:
                record = _freeze_domain(domain, settings, record)
            except OverlayLeftError as error:
                log.critical("%s", error)
                failed.append(domain.name)
                status = EXIT_FATAL
            except (DomainError, HypervisorError, views.ViewError) as error:
                log.error("%s", error)
                failed.append(domain.name)
            if not any(d.uuid == domain.uuid for d in record.domains):
                lock.release(locks.pop(domain.uuid), domain.uuid)
        record = replace(record, state=ride.FROZEN)
        if record.domains:
            ride.write(record)
    except BaseException:
        # Interrupted (or a bug): merge back what is frozen before going.
        with interrupts.critical():
            thaws.thaw_ride(hypervisor, record, thaws.options_of(record), wait=10)
            ride.remove(view)
        raise
    finally:
        for fd in locks.values():
            os.close(fd)  # the guard holds them now (or they were released)
    if not record.domains:
        ride.remove(view)  # the guard sees no record, and lets go
        log.error("%s: no domain was frozen, nothing is exposed in %s", settings.path, view)
        return worse(status, EXIT_DOMAIN_ERRORS)
    deadline = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.deadline))
    log.info(
        "guard %s waits for %s; it merges %s back if backupninja ends without it, or at %s "
        "(max_frozen)",
        record.guard,
        record.thaw_action,
        ", ".join(d.name for d in record.domains),
        deadline,
    )
    if failed:
        log.error("%d of %d domain(s) not frozen: %s", len(failed), len(names), ", ".join(failed))
        status = worse(status, EXIT_DOMAIN_ERRORS)
    return status


def _existing_ride(view: str) -> ride.Ride | None:
    try:
        return ride.read(view)
    except ride.RideError as error:
        raise DomainError(f"{error}; remove it once checked; nothing is frozen") from None


def _view_files(plan: Plan) -> list[views.ViewFile]:
    files = []
    for item in plan.files:
        info = merge.image_info(item.source)
        files.append(
            views.ViewFile(
                item.target,
                item.name,
                item.source,
                str(info.get("format") or "raw"),
                int(info.get("virtual-size") or 0),
            )
        )
    return files


def _freeze_domain(domain: Domain, settings: Settings, record: ride.Ride) -> ride.Ride:
    """Repair, freeze and expose one domain (its lock held); returns the
    record with it. Raises DomainError when it was not frozen (it runs on
    its own images), OverlayLeftError when it may be left on an overlay."""
    recovery.recover_before_backup(domain, settings)
    plan, unsaved = checked_plan(
        domain, settings.backing, BLOCK_NOT_EXPOSED, settings.exclude_disks
    )
    name = plan.name
    for problem in unsaved:
        log.error("%s", problem)
    if plan.state:  # nothing not saved is hidden
        log.warning(
            "%s: its machine state (%s) is not in the view: a ride-along view exposes the "
            "disks only; back it up with stage = full to keep it",
            name,
            ", ".join(f"{f.role} {f.source}" for f in plan.state),
        )
    quiesce = quiesce_wanted(plan, settings)
    files = _view_files(plan)
    definition = domain.xml(inactive=domain.is_persistent(), secure=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    overlays = overlay_paths(plan.disks, stamp, settings.overlaydir, name)
    if plan.active:
        problems = shortfalls(overlay_needs(list(overlays.values()), settings.overlay_reserve))
        if problems:
            raise DomainError(f"{name}: " + "; ".join(problems) + "; nothing was frozen")
    frozen_wall = time.time()
    exposed = ride.Exposed(
        name,
        domain.uuid,
        plan.active,
        tuple(ride.ExposedFile(f.name, f.source, ride.signature(f.source)) for f in files),
        frozen_wall,
        "crash-consistent",
    )
    if not plan.active:
        record = record.with_domain(replace(exposed, consistency="shut off"))
        ride.write(record)
        _expose(settings.view, name, files, definition, frozen_wall, "crash-consistent")
        log.info(
            "%s: shut off: exposed %s in %s as they are",
            name,
            ", ".join(d.target for d in plan.disks),
            os.path.join(settings.view, name),
        )
        return record
    journal = freeze.new_journal(domain, plan, settings, quiesce, overlays, None, settings.view)
    record = record.with_domain(exposed)
    ride.write(record)
    journals.write(journal)
    outcome = Outcome(name, disks=[d.target for d in plan.disks], merge=record.merge)
    started = time.monotonic()
    try:
        all_disks = parse_disks(domain.xml())
        freeze.freeze(domain, all_disks, overlays, quiesce, settings, outcome, started)
    except DomainError:
        with interrupts.critical():
            if freeze.runs_on_any(domain, overlays):
                merge_back(domain, plan.disks, overlays, thaws.options_of(record), journal)
            else:
                journals.remove(domain.uuid)
            ride.write(record := record.without_domain(domain.uuid))
        raise
    consistency = "quiesced" if outcome.quiesced is not None else "crash-consistent"
    # Signed once frozen: the snapshot itself rewrites a qcow2 base's header.
    signed = tuple(replace(f, signature=ride.signature(f.source)) for f in exposed.files)
    record = record.with_domain(replace(exposed, files=signed, consistency=consistency))
    ride.write(record)
    try:
        _expose(settings.view, name, files, definition, frozen_wall, consistency)
    except views.ViewError as error:
        with interrupts.critical():
            merge_back(domain, plan.disks, overlays, thaws.options_of(record), journal)
            ride.write(record := record.without_domain(domain.uuid))
        raise DomainError(f"{error}; merged back, nothing exposed") from None
    log.info(
        "%s: froze %s (%s) and exposed them in %s; %s merges them back",
        name,
        ", ".join(overlays),
        consistency,
        os.path.join(settings.view, name),
        record.thaw_action,
    )
    return record


def _expose(
    view: str, name: str, files: list[views.ViewFile], definition: str, at: float, consistency: str
) -> None:
    freeze_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    views.build(view, name, files, definition, views.Manifest(name, freeze_time, consistency))


def _start_guard(record: ride.Ride, locks: dict[str, int]) -> ride.Ride:
    """Start the guard with the domains' locks; returns the record naming it."""
    read_end, write_end = os.pipe()
    names = ",".join(f"{uuid}={fd}" for uuid, fd in locks.items())
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backupninja_kvm",
                "guard",
                record.view,
                "--locks",
                names,
                "--ready-fd",
                str(write_end),
                "--freeze-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",  # pins no filesystem that an administrator may want to unmount
            pass_fds=(*locks.values(), write_end),
            close_fds=True,
        )
    finally:
        os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], GUARD_READY_SECONDS)
        answer = os.read(read_end, 64) if ready else b""
    finally:
        os.close(read_end)
    guard = ride.Process.of(process.pid)
    if not answer.startswith(b"ready") or guard is None:
        process.kill()
        raise DomainError(f"the guard did not start (within {GUARD_READY_SECONDS} s); merging back")
    record = replace(record, guard=guard)
    ride.write(record)
    return record


# --- stage = thaw --------------------------------------------------------------


def thaw_all(hypervisor: Hypervisor, settings: Settings, ninja: Ninja | None) -> int:
    """``stage = thaw``: thaw what the freeze of the same view froze."""
    view = settings.view
    status = sweep(hypervisor, ninja, skip_view=view)
    record = _existing_ride(view)
    if record is None:
        log.info("%s: nothing is frozen in %s: nothing to thaw", settings.path, view)
        return status
    current = ninja.owner() if ninja else None
    if record.state != ride.THAWED and record.owner.alive() and record.owner != current:
        log.warning(
            "%s: %s belongs to another backupninja run that is still going; its thaw or its "
            "guard merges it back",
            settings.path,
            record.describe(),
        )
        return status
    options = thaws.Options(settings.merge, settings.merge_timeout, settings.bandwidth)
    handed: dict[str, int] = {}
    if record.state != ride.THAWED and ride.guard_alive(record):
        handed = ride.request_handover(view) or {}
        if not handed:
            record = _wait_for_guard(record, options)
    if record.state == ride.THAWED:
        return worse(status, relay_guard_report(record))
    if not handed:
        return worse(status, _thaw_locked_here(hypervisor, record, options))
    try:
        with interrupts.critical():
            errors, fatal = thaws.thaw_ride(hypervisor, record, options, wait=10)
        ride.remove(view)
    finally:
        for uuid, fd in handed.items():
            lock.release(fd, uuid)
    if fatal:
        return EXIT_FATAL
    return worse(status, EXIT_DOMAIN_ERRORS if errors else EXIT_OK)


def _thaw_locked_here(hypervisor: Hypervisor, record: ride.Ride, options: thaws.Options) -> int:
    if record.guard is not None:
        log.warning("%s: its guard is gone (killed?); thawing without it", record.describe())
    return thaw_without_guard(
        hypervisor,
        replace(
            record,
            merge=options.merge,
            merge_timeout=options.merge_timeout,
            bandwidth=options.bandwidth,
        ),
    )


def _wait_for_guard(record: ride.Ride, options: thaws.Options) -> ride.Ride:
    """The guard did not hand over: it is thawing on its own (max_frozen
    passed) or about to. Wait until it is done, then read what it left."""
    bound = time.monotonic() + 120 + options.merge_timeout * max(1, len(record.domains))
    while ride.guard_alive(record) and time.monotonic() < bound:
        time.sleep(0.2)
    return ride.read(record.view) or replace(record, state=ride.THAWED, report=())


# --- run --test ----------------------------------------------------------------


def freeze_dry_run(
    hypervisor: Hypervisor, settings: Settings, names: list[str], ninja: Ninja | None
) -> int:
    """``run --test`` of a freeze: the refusals and lints (under backupninja),
    and what each domain's freeze would do; changes nothing."""
    status = EXIT_OK
    if ninja is None:
        log.info(
            "test run: %s: outside backupninja, the checks of the thaw and the ship actions "
            "are left out (backupninja --test runs them)",
            settings.path,
        )
    elif preflight(hypervisor, settings, ninja) is None:
        status = EXIT_FATAL
    existing = _existing_ride(settings.view)
    if existing is not None:
        log.warning("test run: %s", existing.describe())
    for name in names:
        try:
            domain = hypervisor.domain(name)
            plan = make_plan(domain, settings.backing, BLOCK_NOT_EXPOSED, settings.exclude_disks)
            log.info("test run, would freeze and expose %s", plan.describe())
            if not plan.disks:
                raise DomainError(nothing_to_back_up(plan))
            for skipped in plan.skipped:
                problem = report_skipped(name, skipped)
                if problem:
                    log.error("test run: %s", problem)
            refuse_unsafe_chains(plan)
            quiesce_wanted(plan, settings)
            overlays = overlay_paths(plan.disks, "00000000T000000Z", settings.overlaydir, name)
            if plan.active:
                problems = shortfalls(
                    overlay_needs(list(overlays.values()), settings.overlay_reserve)
                )
                if problems:
                    raise DomainError(f"{name}: " + "; ".join(problems))
        except (DomainError, HypervisorError) as error:
            log.error("test run: %s", error)
            status = worse(status, EXIT_DOMAIN_ERRORS)
    return status


def thaw_dry_run(settings: Settings) -> int:
    record = _existing_ride(settings.view)
    if record is None:
        log.info("test run: %s: nothing is frozen in %s", settings.path, settings.view)
    else:
        log.info("test run: would thaw %s", record.describe())
    return EXIT_OK
