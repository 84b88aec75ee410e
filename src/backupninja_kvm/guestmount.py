"""File-level restore: ``mount SET [DISK] MOUNTPOINT`` and ``umount MOUNTPOINT``.

``mount`` shows the guest filesystems of a set's disks (all of them, or the
one DISK names, e.g. ``vdb``) read-only under MOUNTPOINT, one folder per
filesystem, named as the administrator knows the guest's disks::

    MOUNTPOINT/vda1        partition 1 of the disk vda
    MOUNTPOINT/vdb         a filesystem on the whole disk vdb (no partition table)
    MOUNTPOINT/vg0-root    the logical volume root of the guest's volume group vg0
    MOUNTPOINT/md127       a guest software RAID

Swap, LVM physical volumes and partitions that hold no filesystem are left
out (a Debug line names each); btrfs subvolumes are folders inside their
filesystem's folder. A filesystem that cannot be mounted is a Warning and
the others are still mounted.

How, and why this way: one libguestfs appliance (a small VM that runs the
guest's own filesystem drivers, so partitions, LVM, MD RAID, ext2/3/4, XFS,
btrfs, vfat, NTFS... need no parsing of ours) opens every chosen image with
``readonly`` (qemu reads the set; anything the appliance writes, such as an
ext4 journal replayed on a crash-consistent image, goes to a throwaway
overlay in /tmp and is discarded). It mounts each filesystem in its own
folder of the appliance's root (``mkmountpoint``) and exports that root
through one read-only FUSE mount (``mount_local``), served by a small
background process of ours. That is guestmount's own mechanism, through
libguestfs's Python binding, because guestmount mounts one tree rooted in
one guest filesystem: ``guestmount -i`` needs an inspectable OS (a data
disk has none), and one guestmount per filesystem plus a virt-filesystems
run would boot one appliance each, about 25 s apiece here without KVM.
``umount`` runs ``guestunmount``, which waits until the appliance is shut.

``mount`` records what it did in ``STATE_DIR/mount/`` (the mount point,
the set, whether it created the mount point); ``umount`` unmounts only a
mount point recorded there that ``/proc/self/mountinfo`` shows as FUSE, and
removes the mount point only if ``mount`` created it and it is empty.

Environment: libguestfs's ``direct`` backend is used unless
``LIBGUESTFS_BACKEND`` is set: qemu then runs as root, as we do, and reads
the set even in a root-only folder (the ``libvirt`` backend would run it as
libvirt's QEMU user, and needs a libvirtd). Unless
``LIBGUESTFS_BACKEND_SETTINGS`` is set, a one-second probe starts QEMU with
KVM and the CPU model libguestfs asks for; when that QEMU dies at once
(nested KVM that rejects the CPU's MSRs: "failed to set MSR 0x10a"), the
appliance runs without KVM (``force_tcg``): slower, but it works. The
appliance needs a kernel in /boot that root can read (supermin copies it);
``libguestfs-test-tool`` shows what fails when the appliance does not start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from backupninja_kvm import journal, setinfo
from backupninja_kvm.errors import BackupNinjaKvmError
from backupninja_kvm.report import log

EXIT_OK = 0
EXIT_FATAL = 2
STATE_VERSION = 1
INSTALL_HINT = "apt install libguestfs-tools python3-guestfs"
QEMU = "qemu-system-x86_64"
# The CPU model libguestfs 1.48 gives QEMU on x86_64 (lib/appliance-cpu.c).
APPLIANCE_CPU = "max,la57=off"
READY_TIMEOUT = 600.0  # seconds for the appliance to start and mount, at worst


class GuestMountError(BackupNinjaKvmError):
    """A mount or umount refused or failed; the message names the set, disk or mount point."""


@dataclass(frozen=True)
class Planned:
    """One guest filesystem to mount: its libguestfs device, type and folder name."""

    device: str
    fstype: str
    name: str


@dataclass(frozen=True)
class Skipped:
    """A device libguestfs lists that is not mounted, and why."""

    device: str
    name: str
    reason: str


# ---------------------------------------------------------------- pure logic


_WHOLE_DISK = re.compile(r"^/dev/(?:sd|vd|hd)([a-z]+)$")
_PARTITION = re.compile(r"^/dev/(?:sd|vd|hd)([a-z]+)(\d+)$")
_MD = re.compile(r"^/dev/(md\d+)$")
_VOLUME = re.compile(r"^/dev/([^/]+)/([^/]+)$")
NOT_FILESYSTEMS = ("swap", "unknown", "")


def _disk_index(letters: str) -> int:
    """sda -> 0, sdz -> 25, sdaa -> 26, as Linux names disks."""
    index = 0
    for letter in letters:
        index = index * 26 + (ord(letter) - ord("a") + 1)
    return index - 1


def folder_name(device: str, targets: list[str]) -> str:
    """The folder under MOUNTPOINT for libguestfs's *device*, the disks being
    *targets* in the order they were added (libguestfs's sda is targets[0])."""
    whole = _WHOLE_DISK.match(device)
    partition = _PARTITION.match(device)
    if whole or partition:
        match = whole or partition
        assert match is not None
        index = _disk_index(match.group(1))
        disk = targets[index] if index < len(targets) else "sd" + match.group(1)
        return disk + (partition.group(2) if partition else "")
    md = _MD.match(device)
    if md:
        return md.group(1)
    volume = _VOLUME.match(device)
    if volume and volume.group(1) not in ("mapper", "disk"):
        return f"{volume.group(1)}-{volume.group(2)}"
    name = os.path.basename(device.rstrip("/")) or "filesystem"
    return name if name not in (".", "..") else "filesystem"


def plan_mounts(
    filesystems: dict[str, str], targets: list[str]
) -> tuple[list[Planned], list[Skipped]]:
    """Which of libguestfs's ``list_filesystems`` (device -> type) to mount,
    each in a folder of its own (sorted, unique), and which are left out."""
    planned: list[Planned] = []
    skipped: list[Skipped] = []
    used: set[str] = set()
    for device in sorted(filesystems, key=_device_order):
        fstype = filesystems[device]
        if device.startswith("btrfsvol:"):
            skipped.append(Skipped(device, device, "a btrfs subvolume: a folder of its filesystem"))
            continue
        name = folder_name(device, targets)
        if fstype in NOT_FILESYSTEMS:
            what = "swap" if fstype == "swap" else "no filesystem libguestfs recognises"
            skipped.append(Skipped(device, name, what))
            continue
        unique, number = name, 2
        while unique in used:
            unique, number = f"{name}-{number}", number + 1
        used.add(unique)
        planned.append(Planned(device, fstype, unique))
    return planned, skipped


def _device_order(device: str) -> tuple:
    """Disks in order, partitions by number (sda2 before sda10), then the rest."""
    partition = _PARTITION.match(device) or _WHOLE_DISK.match(device)
    if partition:
        number = int(partition.group(2)) if partition.re is _PARTITION else 0
        return (0, _disk_index(partition.group(1)), number, device)
    return (1, 0, 0, device)


def fuse_mount_points(mountinfo: str) -> list[str]:
    """The mount points of FUSE filesystems in a /proc/self/mountinfo text."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        before, after = fields[0].split(), fields[1].split()
        if len(before) >= 5 and after and after[0].split(".")[0] in ("fuse", "fuseblk"):
            points.append(_unescape(before[4]))
    return points


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def choose_disks(info: setinfo.SetInfo, disk: str | None, where: str) -> list[setinfo.SetImage]:
    """The set's disks to open: all, or the one whose target is *disk*."""
    disks = sorted(info.disks(), key=lambda d: d.target)
    if not disks:
        raise GuestMountError(f"{where}: the set holds no disk image")
    if disk is None:
        return disks
    chosen = [d for d in disks if d.target == disk]
    if not chosen:
        known = ", ".join(d.target for d in disks)
        raise GuestMountError(f"{where}: no disk {disk!r} in this set; its disks are {known}")
    return chosen


# ---------------------------------------------------------------- set, mount point, state


def _set_path(args: argparse.Namespace) -> str:
    """The folder of the set ``args.set`` names (``sets.resolve``: a set's
    folder, a borg/restic extract of a ride-along view, or DOMAIN[/STAMP]
    with -a or -d). libguestfs reads the images from this host."""
    from backupninja_kvm import setcommands

    ref = setcommands.resolve_set(args.set, args)
    if ref.remote is not None:
        raise GuestMountError(
            f"{ref.label}: a set at a remote destination; mount it on the remote host, or "
            f"fetch it (rsync -a --sparse {ref.remote.label}:{ref.path}/ DIR/) and mount DIR"
        )
    return os.path.realpath(ref.path)


def _state_directory() -> str:
    return os.path.join(journal.STATE_DIR, "mount")


def _state_path(mount_point: str) -> str:
    digest = hashlib.sha256(mount_point.encode()).hexdigest()[:16]
    return os.path.join(_state_directory(), f"{digest}.json")


def _read_state(mount_point: str) -> dict | None:
    try:
        with open(_state_path(mount_point), encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise GuestMountError(f"{_state_path(mount_point)}: cannot be read ({error})") from None
    if data.get("version") != STATE_VERSION or data.get("mount_point") != mount_point:
        return None
    return data


def _mounted(mount_point: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        return mount_point in fuse_mount_points(handle.read())


def _prepare_mount_point(spec: str, set_path: str) -> tuple[str, bool]:
    """(absolute mount point, whether we created it); refuses one that is
    not an empty folder, or lies inside the set (which must not change)."""
    path = os.path.realpath(spec)
    if path == set_path or path.startswith(set_path + os.sep):
        raise GuestMountError(f"{spec}: the mount point is inside the set {set_path}")
    if os.path.ismount(path) or _mounted(path):
        raise GuestMountError(f"{spec}: something is already mounted there")
    if not os.path.exists(path):
        try:
            os.mkdir(path, 0o700)
        except OSError as error:
            message = f"{spec}: cannot create the mount point: {error.strerror}"
            raise GuestMountError(message) from None
        return path, True
    if not os.path.isdir(path):
        raise GuestMountError(f"{spec}: the mount point is not a folder")
    if os.listdir(path):
        raise GuestMountError(f"{spec}: the mount point is not empty; choose an empty folder")
    return path, False


# ---------------------------------------------------------------- libguestfs


def _import_guestfs():
    try:
        import guestfs  # type: ignore[import-not-found]
    except ImportError:
        raise GuestMountError(f"libguestfs's Python binding is missing: {INSTALL_HINT}") from None
    return guestfs


def _check_tools() -> None:
    missing = [tool for tool in ("guestunmount", QEMU) if shutil.which(tool) is None]
    if missing:
        raise GuestMountError(f"{' and '.join(missing)} missing: {INSTALL_HINT}")
    _import_guestfs()


def kvm_runs_appliance_cpu(timeout: float = 1.5) -> bool:
    """Whether QEMU with KVM starts a vCPU of the model libguestfs uses: a
    nested KVM may reject its MSRs, and QEMU aborts at once."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False  # libguestfs falls back to TCG by itself
    argv = [QEMU, "-display", "none", "-nodefaults", "-no-user-config", "-machine", "accel=kvm"]
    argv += ["-cpu", APPLIANCE_CPU, "-m", "64", "-no-reboot", "-serial", "stdio"]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    return False  # QEMU closed its output: it is ending
                output += chunk
                if b"SeaBIOS" in output or b"iPXE" in output:
                    return True  # the firmware runs on the vCPU
            elif process.poll() is not None:
                return False
        return True  # still running: it did not abort
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


def guestfs_environment(environ: dict[str, str], kvm_works) -> dict[str, str]:
    """The LIBGUESTFS_* variables to add to *environ* (those it sets win)."""
    added = {}
    if "LIBGUESTFS_BACKEND" not in environ:
        added["LIBGUESTFS_BACKEND"] = "direct"
    if "LIBGUESTFS_BACKEND_SETTINGS" not in environ and not kvm_works():
        added["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return added


def _serve(images: list[tuple[str, str]], targets: list[str], mount_point: str, report) -> None:
    """In the background process: open *images* (path, format) read-only in
    one appliance, mount every filesystem, export it at *mount_point*,
    *report* (kind, text) what happens, then serve until unmounted."""
    guestfs = _import_guestfs()
    handle = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    try:
        for path, image_format in images:
            handle.add_drive_opts(path, readonly=True, format=image_format)
        handle.launch()
        planned, skipped = plan_mounts(handle.list_filesystems(), targets)
        for left_out in skipped:
            report("debug", f"{left_out.name} ({left_out.device}): not mounted, {left_out.reason}")
        mounted = 0
        for item in planned:
            folder = "/" + item.name
            handle.mkmountpoint(folder)
            try:
                handle.mount_ro(item.device, folder)
            except RuntimeError:
                try:  # a journal to replay: into the throwaway overlay
                    handle.mount_options("", item.device, folder)
                except RuntimeError as error:
                    handle.rmmountpoint(folder)
                    report("warning", f"{item.name}: {item.fstype} cannot be mounted: {error}")
                    continue
            report("mounted", f"{item.name}\t{item.fstype}")
            mounted += 1
        if not mounted:
            report("error", "no filesystem could be mounted")
            return
        # readonly: libguestfs refuses writes; "ro": the kernel too, and mount shows it
        handle.mount_local(mount_point, readonly=True, options="ro")
        report("ready", str(os.getpid()))
        handle.mount_local_run()
    finally:
        try:
            handle.shutdown()
        finally:
            handle.close()


def _start_server(images, targets, mount_point: str) -> list[tuple[str, str]]:
    """Fork the background process that serves the mount; return what it
    reported until it was ready; raise GuestMountError when it failed."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server: its own session, outliving this command
        os.close(reading)
        try:
            os.setsid()
            for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(number, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            if os.fork() != 0:  # not a child of the command: init reaps it
                os._exit(0)

            def report(kind: str, text: str) -> None:
                try:
                    os.write(writing, json.dumps([kind, text]).encode() + b"\n")
                except OSError:
                    pass  # the command has gone; serve anyway

            try:
                _serve(images, targets, mount_point, report)
            except BaseException as error:  # noqa: BLE001 - reported to the command
                report("error", str(error) or type(error).__name__)
        finally:
            os._exit(0)
    os.close(writing)
    os.waitpid(pid, 0)
    messages: list[tuple[str, str]] = []
    buffered = b""
    deadline = time.monotonic() + READY_TIMEOUT
    with open(reading, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if not ready:
                continue
            chunk = pipe.read(65536)
            if not chunk:
                break
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                kind, text = json.loads(line)
                messages.append((kind, text))
                if kind in ("ready", "error"):
                    return messages
    messages.append(("error", "the background process ended without a word"))
    return messages


# ---------------------------------------------------------------- the commands


def mount(args: argparse.Namespace) -> int:
    """``mount SET [DISK] MOUNTPOINT``: the set's guest filesystems, read-only."""
    _check_tools()
    set_path = _set_path(args)
    info = setinfo.read(set_path)
    where = f"set {set_path}"
    disks = choose_disks(info, args.disk, where)
    images = []
    for disk in disks:
        path = os.path.join(set_path, disk.name)
        if not os.path.isfile(path):
            raise GuestMountError(f"{where}: disk {disk.target}: {disk.name} is missing")
        images.append((path, disk.format or "raw"))
    mount_point, created = _prepare_mount_point(args.mountpoint, set_path)
    try:
        added = guestfs_environment(dict(os.environ), kvm_runs_appliance_cpu)
        os.environ.update(added)
        speed = " without KVM" if added.get("LIBGUESTFS_BACKEND_SETTINGS") == "force_tcg" else ""
        targets = [d.target for d in disks]
        log.info(
            "%s: opening %s read-only in a libguestfs appliance%s",
            where,
            ", ".join(targets),
            speed,
        )
        started = time.monotonic()
        messages = _start_server(images, targets, mount_point)
    except BaseException:
        if created:
            os.rmdir(mount_point)
        raise
    folders = []
    for kind, text in messages:
        if kind == "debug":
            log.debug("%s: %s", where, text)
        elif kind == "warning":
            log.warning("%s: %s", where, text)
        elif kind == "mounted":
            folders.append(text.split("\t"))
    kind, text = messages[-1]
    if kind != "ready":
        if created:
            os.rmdir(mount_point)
        raise GuestMountError(
            f"{where}: cannot mount {', '.join(targets)} at {mount_point}: {text}"
            " (libguestfs-test-tool shows why the appliance does not start)"
        )
    journal.write_json(
        _state_directory(),
        _state_path(mount_point),
        {
            "version": STATE_VERSION,
            "mount_point": mount_point,
            "set": set_path,
            "disks": targets,
            "created_mount_point": created,
            "pid": int(text),
        },
    )
    for name, fstype in folders:
        log.info("%s: %s (%s)", mount_point, os.path.join(mount_point, name), fstype)
    log.info(
        "%s: %s mounted read-only in %.0f s; `backupninja-kvm umount %s` when done",
        mount_point,
        where,
        time.monotonic() - started,
        mount_point,
    )
    return EXIT_OK


def umount(args: argparse.Namespace) -> int:
    """``umount MOUNTPOINT``: undo a ``mount``, and remove the mount point it made."""
    mount_point = os.path.realpath(args.mountpoint)
    state = _read_state(mount_point)
    mounted = _mounted(mount_point)
    if state is None:
        if mounted:
            raise GuestMountError(
                f"{args.mountpoint}: not mounted by backupninja-kvm mount (no record in "
                f"{_state_directory()}); unmount it with guestunmount yourself"
            )
        raise GuestMountError(f"{args.mountpoint}: no set is mounted there by backupninja-kvm")
    if mounted:
        if shutil.which("guestunmount") is None:
            raise GuestMountError(f"{mount_point}: guestunmount is missing: {INSTALL_HINT}")
        result = subprocess.run(
            ["guestunmount", "--retry=5", mount_point],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise GuestMountError(
                f"{mount_point}: cannot unmount ({result.stderr.strip() or result.returncode});"
                f" is it in use? `fuser -vm {mount_point}` shows by whom"
            )
        _wait_gone(int(state.get("pid", 0)))
    else:
        log.info("%s: was no longer mounted (its server had ended)", mount_point)
    if state.get("created_mount_point") and os.path.isdir(mount_point):
        try:
            os.rmdir(mount_point)
        except OSError as error:
            log.warning("%s: mount point left in place: %s", mount_point, error.strerror)
    os.unlink(_state_path(mount_point))
    log.info("%s: unmounted set %s", mount_point, state.get("set", "?"))
    return EXIT_OK


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Give the server time to shut its appliance down (guestunmount already
    waits for the FUSE loop; the appliance's shutdown follows)."""
    deadline = time.monotonic() + timeout
    while pid > 0 and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.1)


def add_parser(commands) -> None:
    """Register ``mount`` and ``umount`` on the subcommands of the CLI."""
    mount_parser = commands.add_parser(
        "mount",
        help="show the guest filesystems of a set read-only under MOUNTPOINT, one folder per "
        "filesystem (MOUNTPOINT/vda1, MOUNTPOINT/vdb, MOUNTPOINT/VG-LV), to restore files",
        description="Mount the guest filesystems of a set read-only with libguestfs: "
        "MOUNTPOINT/vda1 is partition 1 of disk vda, MOUNTPOINT/vdb a filesystem on the "
        "whole disk vdb, MOUNTPOINT/VG-LV a logical volume. The set is never written. "
        "Undo with `backupninja-kvm umount MOUNTPOINT`.",
    )
    mount_parser.add_argument(
        "set", metavar="SET", help="a set's folder, DOMAIN (its newest set) or DOMAIN/STAMP"
    )
    from backupninja_kvm.setcommands import add_destination_arguments

    add_destination_arguments(mount_parser)
    mount_parser.add_argument(
        "disk", nargs="?", metavar="DISK", help="only this disk, by its target (vda, vdb...)"
    )
    mount_parser.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        help="an empty folder, or a new one to create (umount removes it again)",
    )
    mount_parser.set_defaults(function=mount)

    umount_parser = commands.add_parser(
        "umount", help="unmount what `backupninja-kvm mount` mounted at MOUNTPOINT"
    )
    umount_parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount_parser.set_defaults(function=umount)
