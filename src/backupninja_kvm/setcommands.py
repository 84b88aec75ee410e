"""The commands that read sets: ``sets``, ``verify``, ``restore``.

Each names its sets the same way (``sets.resolve``): a set's folder, or
DOMAIN / DOMAIN/STAMP at the destination of ``--action FILE`` or
``--directory DIR``.

Exit status: 0 success; 1 a set failed verification (``verify``); 2 nothing
could be done (bad arguments, a set not found, a restore refused).
"""

from __future__ import annotations

import argparse
import json
import sys

from backupninja_kvm import sets, verify
from backupninja_kvm.errors import TransferError
from backupninja_kvm.report import human_bytes, log

EXIT_OK, EXIT_DAMAGED, EXIT_FAILED = 0, 1, 2


def add_destination_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-a",
        "--action",
        metavar="FILE",
        help="find DOMAIN or DOMAIN/STAMP at the destination of this .kvm action file "
        "(local or remote, with its ssh settings)",
    )
    where.add_argument(
        "-d",
        "--directory",
        metavar="DIR",
        help="find DOMAIN or DOMAIN/STAMP in DIR (local) or [USER@]HOST:DIR (over ssh)",
    )


def destination_of(args: argparse.Namespace) -> sets.Destination | None:
    return sets.destination_from(args.action, args.directory)


def resolve_set(spec: str, args: argparse.Namespace) -> sets.SetRef:
    """The set named by *spec* with the destination arguments of *args*."""
    return sets.resolve(spec, destination_of(args))


def _when(text: str) -> str:
    return text.replace("T", " ").replace("Z", " UTC") if text else "-"


def _check_text(check: dict | None, kind: str) -> str:
    if not check:
        return "-"
    verdict = "ok" if check.get("ok") else "FAILED"
    extra = f" {check['seconds']:.1f} s" if kind == "rehearse" and "seconds" in check else ""
    return f"{verdict}{extra} {_when(str(check.get('time', '')))}".strip()


def list_sets(args: argparse.Namespace) -> int:
    """``sets [DOMAIN...]``: the complete sets of each domain."""
    where = destination_of(args)
    if where is None:
        raise sets.SetNotFound("give --action FILE or --directory DIR: where are the sets?")
    found = sets.listings(where, args.domains)
    if args.json:
        json.dump([item.to_dict() for item in found], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not found:
        print(f"no complete set in {where.label}")
        return EXIT_OK
    header = (
        "DOMAIN",
        "SET",
        "FROZEN",
        "SIZE",
        "DISKS",
        "CONSISTENCY",
        "MADE",
        "VERIFIED",
        "REHEARSED",
    )
    rows = [header]
    for item in found:
        info = item.info
        rows.append(
            (
                item.ref.domain,
                item.ref.stamp,
                _when(info.freeze_time) if info else "-",
                human_bytes(item.size),
                ",".join(item.disks) or "-",
                info.consistency if info else "unknown",
                item.made(),
                _check_text(item.checks.get("verify"), "verify"),
                _check_text(item.checks.get("rehearse"), "rehearse"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for item in found:
        if item.problem:
            print(f"{item.ref.short}: {item.problem}", file=sys.stderr)
    return EXIT_OK


def verify_sets(args: argparse.Namespace) -> int:
    """``verify SET...|--all``."""
    where = destination_of(args)
    if args.all:
        if where is None:
            raise sets.SetNotFound("verify --all needs --action FILE or --directory DIR")
        refs = [item.ref for item in sets.listings(where, args.sets)]
    else:
        if not args.sets:
            raise sets.SetNotFound("name a SET (or DOMAIN), or give --all")
        refs = [sets.resolve(spec, where) for spec in args.sets]
    status = EXIT_OK
    for ref in refs:
        try:
            found = verify.verify_set(ref)
        except TransferError as error:
            log.error("%s: cannot verify: %s", ref.short, error)
            status = EXIT_FAILED
            continue
        (log.info if found.ok else log.error)("%s", found.summary())
        if not args.no_record:
            problem = verify.record(ref, found)
            if problem:
                log.warning("%s: %s", ref.short, problem)
        if not found.ok and status == EXIT_OK:
            status = EXIT_DAMAGED
    return status


def restore_set(args: argparse.Namespace) -> int:
    """``restore SET [--as NAME] [--to DIR] [--start] [--force]``."""
    from backupninja_kvm import restore
    from backupninja_kvm.hypervisor import Hypervisor

    ref = sets.resolve(args.set, destination_of(args))
    options = restore.Options(
        new_name=args.new_name or "",
        to=args.to or "",
        start=args.start,
        force=args.force,
        ignore_damage=args.ignore_damage,
    )
    hypervisor = Hypervisor(args.uri)
    try:
        done = restore.restore(hypervisor, ref, options)
    finally:
        hypervisor.close()
    log.info("%s", done.summary())
    return EXIT_OK


def add_parser(commands) -> None:
    sets_parser = commands.add_parser(
        "sets",
        help="list the complete sets per domain: time, size, disks, consistency, the last "
        "verify and rehearse",
    )
    sets_parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these domains")
    add_destination_arguments(sets_parser)
    sets_parser.add_argument("--json", action="store_true", help="machine-readable output")
    sets_parser.set_defaults(function=list_sets)

    verify_parser = commands.add_parser(
        "verify",
        help="check sets: the manifest's sums, each image's structure (qemu-img check), "
        "the definition; exit 0 sound, 1 damaged (Error lines name each file), 2 not checked",
    )
    verify_parser.add_argument(
        "sets",
        nargs="*",
        metavar="SET",
        help="a set's folder, DOMAIN (its newest set) or DOMAIN/STAMP; with --all, domains",
    )
    verify_parser.add_argument(
        "--all", action="store_true", help="every complete set (of the DOMAINs named, or all)"
    )
    verify_parser.add_argument(
        "--no-record", action="store_true", help="do not write the result into checks.json"
    )
    add_destination_arguments(verify_parser)
    verify_parser.set_defaults(function=verify_sets)

    restore_parser = commands.add_parser(
        "restore",
        help="restore a set: in place (a shut-off domain, with --force) or --as a copy "
        "beside the original",
    )
    restore_parser.add_argument(
        "set", metavar="SET", help="a set's folder, DOMAIN (its newest set) or DOMAIN/STAMP"
    )
    add_destination_arguments(restore_parser)
    restore_parser.add_argument(
        "--as",
        dest="new_name",
        metavar="NAME",
        help="restore as a new domain NAME beside the original: new UUID, new MAC addresses, "
        "its own image files (NAME-FILE)",
    )
    restore_parser.add_argument(
        "--to",
        metavar="DIR",
        help="put the images in DIR (default: each image's original folder)",
    )
    restore_parser.add_argument("--start", action="store_true", help="start it once defined")
    restore_parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing (shut-off) domain and files at the images' paths; the "
        "replaced files are kept aside as PATH.before-restore-STAMP",
    )
    restore_parser.add_argument(
        "--ignore-damage",
        action="store_true",
        help="restore a set that fails verification, as it is (Warnings name what is wrong)",
    )
    restore_parser.add_argument("-c", "--connect", dest="uri", default="qemu:///system")
    restore_parser.set_defaults(function=restore_set)
