"""Restore a set: its images back to disk, its definition back to libvirt.

Three ways, by what is asked:

- **In place** (``restore SET``): each image goes back to the path the
  domain had it at (``set.json``'s ``original_path``; under ``--to DIR``
  with the same file names), and the set's ``domain.xml`` is defined again,
  same name and UUID. A domain of that name that exists must be shut off,
  and ``--force`` given; the files it had at those paths are kept aside as
  ``PATH.before-restore-STAMP`` until the restored domain is defined, and
  the report says where they are (remove them once the domain is checked).
- **As a copy** (``restore SET --as NAME``): beside the original, which is
  never touched: a new name, a new UUID and new MAC addresses (libvirt makes
  both), its own image files (``NAME-FILE`` in each original's folder, or in
  ``--to DIR``), its own console files (see ``definition.copy_definition``).
  A writable disk whose data is not in the set is left out of the copy
  (it would share the original's file), with a Warning.
- A disk that was a block device (set.json's original path is a device) is
  never restored onto it (files are renamed into place, which would replace
  the device node): ``--to DIR`` is needed, and it becomes a file disk on
  its raw image in DIR, in place or as a copy.
- ``--start`` starts the restored domain.

Safety, in order: the set is verified first (structure and definition; a
set that fails is refused unless ``--ignore-damage``); every image is copied
sparse into a private folder beside its destination (``mkdtemp``) and its
copy checked against the set's manifest before anything is replaced; only
then are the copies renamed into place (same filesystem: atomic) and the
domain defined. If the definition fails, the replaced files are put back.
A remote set is fetched with rsync over the destination's ssh settings,
straight into those private folders; a copy of a ride-along view (from
borg or restic) restores the same way, without sums (it has none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backupninja_kvm import definition as definitions
from backupninja_kvm import destination, interrupts, machine, preflight, setinfo
from backupninja_kvm.errors import BackupNinjaKvmError, HypervisorError, TransferError
from backupninja_kvm.lock import domain_lock
from backupninja_kvm.report import human_bytes, log, seconds
from backupninja_kvm.sets import SetRef
from backupninja_kvm.transfer import is_block_device
from backupninja_kvm.verify import _manifest_lines, verify_set

TEMP_PREFIX = ".bnkvm-restore-"
ASIDE = ".before-restore-"


class RestoreError(BackupNinjaKvmError):
    """The restore was refused or failed; nothing of the host was changed,
    unless the message says what was."""


@dataclass(frozen=True)
class Options:
    new_name: str = ""  # --as
    to: str = ""  # --to DIR
    start: bool = False
    force: bool = False
    ignore_damage: bool = False


@dataclass
class Restored:
    """What a restore did, for its report."""

    domain: str
    ref: SetRef
    paths: dict[str, str] = field(default_factory=dict)  # set file -> where it went
    aside: list[str] = field(default_factory=list)  # replaced files kept
    placed: list[str] = field(default_factory=list)  # restored files renamed into place
    dropped: list[str] = field(default_factory=list)  # disks left out of a copy
    bytes: int = 0
    started: bool = False
    checked: int = 0  # copies checked against the manifest
    seconds: float = 0.0

    def summary(self) -> str:
        disks = ", ".join(self.paths[n] for n in self.paths)
        text = (
            f"{self.domain}: restored from {self.ref.short}: {disks} "
            f"({human_bytes(self.bytes)}, {self.checked} checked against the manifest) "
            f"in {seconds(self.seconds)}; defined"
        )
        if self.started:
            text += ", started"
        return text


def _read_set(ref: SetRef) -> tuple[setinfo.SetInfo, str, str, dict[str, str]]:
    """The set's description, definition, manifest name and sums."""
    if ref.remote is None:
        info = setinfo.read(ref.path)
        definition = _text(os.path.join(ref.path, destination.DEFINITION))
        manifest = next(
            (m for m in destination.MANIFESTS if os.path.isfile(os.path.join(ref.path, m))), ""
        )
        sums = _text(os.path.join(ref.path, manifest)) if manifest else ""
    else:
        remote = ref.remote
        try:
            names = remote.run('cd "$1" && ls -1A', ref.path).splitlines()
            if setinfo.SET_INFO not in names:
                raise RestoreError(
                    f"{ref.label}: a set of an earlier version (no set.json): fetch it first "
                    f"(`rsync -a --sparse {remote.label}:{ref.path}/ DIR/`), then restore DIR"
                )
            info = setinfo.SetInfo.from_json(
                remote.run('cat -- "$1/set.json"', ref.path), f"{ref.label}: set.json"
            )
            definition = remote.run('cat -- "$1/domain.xml"', ref.path)
            manifest = next((m for m in destination.MANIFESTS if m in names), "")
            sums = remote.run('cat -- "$1/$2"', ref.path, manifest) if manifest else ""
        except TransferError as error:
            raise RestoreError(f"cannot read {ref.label}: {error}") from None
    return info, definition, manifest, {name: digest for digest, name in _manifest_lines(sums)}


def _text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as error:
        raise RestoreError(f"cannot read {path}: {error.strerror}") from None


def plan_paths(info: setinfo.SetInfo, options: Options) -> dict[str, str]:
    """set file name -> the path it is restored to; a file that is not
    restored (a copy's boot files, which it shares) is not in it."""
    paths = {}
    for item in info.images():
        if not options.to and _was_a_device(item.original_path):
            raise RestoreError(_device_refusal(info, item, options))
        folder = options.to or os.path.dirname(item.original_path)
        if options.new_name:
            base = f"{options.new_name}-{item.name}"
        else:
            base = os.path.basename(item.original_path)
        paths[item.name] = os.path.join(os.path.abspath(folder), base)
    files_dir = copy_files_dir(paths, options)
    for item in info.state():
        path = _state_path(item, options, files_dir)
        if path:
            paths[item.name] = path
    if len(set(paths.values())) != len(paths):
        raise RestoreError(
            f"{info.domain}: two files of the set would be restored to the same path; "
            f"restore without --to, or --as NAME"
        )
    return paths


def copy_files_dir(image_paths: dict[str, str], options: Options) -> str:
    """Where a copy's files besides its images go (``copy_definition``'s
    *files_dir*): ``--to DIR``, else the folder of its first image."""
    return options.to or os.path.dirname(next(iter(image_paths.values()), "/"))


def _state_path(item: setinfo.SetImage, options: Options, files_dir: str) -> str:
    """Where a machine-state file of the set goes; "" when it is not restored.

    The TPM state goes to the domain's swtpm folder, found by its UUID (a
    copy's UUID is only known once it is defined: ``pending_tpm_path``). A
    copy's variable store goes where ``copy_definition`` points its
    ``<nvram>``; a copy shares the original's boot files (QEMU only reads
    them). In place, every file goes back to its path, or into ``--to``."""
    if item.role == machine.TPM:
        if options.new_name:
            return pending_tpm_path(item, options.new_name)
        return item.original_path
    if options.new_name:
        if item.role == machine.NVRAM:
            return os.path.join(os.path.abspath(files_dir), f"{options.new_name}_VARS.fd")
        return ""
    if options.to:
        return os.path.join(os.path.abspath(options.to), os.path.basename(item.original_path))
    return item.original_path


def pending_tpm_path(item: setinfo.SetImage, new_name: str) -> str:
    """A copy's TPM state folder until its UUID is known (reports only)."""
    return os.path.join(os.path.dirname(item.original_path), f"UUID-OF-{new_name}")


def _was_a_device(path: str) -> bool:
    return path.startswith("/dev/") or is_block_device(path)


def _device_refusal(info: setinfo.SetInfo, item: setinfo.SetImage, options: Options) -> str:
    """Why a set file taken from a block device is not restored without
    --to: it would be renamed over the device node, not written into it."""
    text = (
        f"{info.domain}: {item.name} is the contents of the block device "
        f"{item.original_path} (disk {item.target}); restoring onto a device is not done "
        f"(the restore renames files into place, which would replace the device node): "
    )
    if options.new_name:
        return text + "give --to DIR for the copy's image file (it becomes a file disk)"
    return text + (
        f"give --to DIR to restore the domain with that disk as a raw image file in DIR, "
        f"or --as NEWNAME --to DIR for a copy beside it; to put the data back onto the "
        f"device itself, with the domain shut off: `qemu-img convert -n -f raw -O raw "
        f"{item.name} {item.original_path}` (it writes the zeros too)"
    )


def restore(hypervisor, ref: SetRef, options: Options) -> Restored:
    """Restore *ref* (see the module's docstring). Raises RestoreError,
    naming what was refused or failed and what was changed. A restore in
    place holds the domain's lock: no backup or recover of it runs meanwhile."""
    started = time.monotonic()
    info, definition, manifest, sums = _read_set(ref)
    if options.new_name or not info.uuid:
        return _restore(hypervisor, ref, options, info, definition, manifest, sums, started)
    with domain_lock(info.domain, info.uuid):
        return _restore(hypervisor, ref, options, info, definition, manifest, sums, started)


def _restore(hypervisor, ref, options, info, definition, manifest, sums, started) -> Restored:
    name = options.new_name or info.domain
    if options.new_name:
        destination.check_domain_name(options.new_name)
    _check_set(ref, options)
    paths = plan_paths(info, options)
    existing = _check_domain(hypervisor, info, options)
    kept = _unchanged_boot_files(info, paths, manifest, sums, options)
    xml, dropped = _definition_for(info, definition, paths, options)
    for kept_name in kept:
        del paths[kept_name]
    _check_paths(hypervisor, info, paths, options, existing)
    _check_space(ref, info, paths)
    result = Restored(name, ref, {n: paths[n] for n in paths}, dropped=dropped)
    _report_shared_boot_files(name, info, paths)
    for target in dropped:
        log.warning(
            "%s: disk %s is not in the set: left out of the copy (it would share the "
            "original's file)",
            name,
            target,
        )
    folders: dict[str, str] = {}
    try:
        copies, digests = _copy_all(ref, info, paths, folders, result, manifest)
        _check_copies(ref, manifest, sums, digests, result, options)
        _fix_headers(info, paths, copies)
        _unpack_tpm_state(info, copies)
        after_define = {}
        if options.new_name:  # its TPM folder is named by the UUID libvirt gives it
            after_define = {n: copies.pop(n) for n in list(copies) if _role(info, n) == machine.TPM}
        with interrupts.critical():
            try:
                _put_in_place(copies, paths, result)
                domain = hypervisor.define(xml)
            except HypervisorError as error:
                _undo(result)
                raise RestoreError(
                    f"{name}: libvirt refused the definition ({error.reason}); the files "
                    f"that were replaced are back in place, nothing restored"
                ) from None
            except OSError as error:
                _undo(result)
                raise RestoreError(
                    f"{name}: cannot put the restored files in place ({error}); the files "
                    f"that were replaced are back in place, nothing restored"
                ) from None
            for set_name, unpacked in after_define.items():
                _place_copy_tpm_state(domain, set_name, unpacked, result)
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    if result.aside:
        log.warning(
            "%s: the files replaced by the restore are kept: %s; remove them once the "
            "restored domain is checked",
            name,
            ", ".join(result.aside),
        )
    if options.start:
        try:
            domain.start()
            result.started = True
        except HypervisorError as error:
            raise RestoreError(
                f"{name}: restored and defined, but it did not start: {error.reason}"
            ) from None
    result.seconds = time.monotonic() - started
    return result


def _check_set(ref: SetRef, options: Options) -> None:
    try:
        found = verify_set(ref, sums=False)
    except TransferError as error:
        raise RestoreError(f"cannot verify {ref.label}: {error}") from None
    if found.ok:
        return
    if options.ignore_damage:
        log.warning("%s: restoring despite: %s", ref.short, "; ".join(found.problems))
        return
    raise RestoreError(
        f"{ref.short}: refused, the set fails verification: {'; '.join(found.problems)} "
        f"(restore an older set, or give --ignore-damage to restore it as it is)"
    )


def _check_domain(hypervisor, info: setinfo.SetInfo, options: Options):
    """The existing domain an in-place restore replaces (None: none)."""
    if options.new_name:
        if hypervisor.find_domain(name=options.new_name) is not None:
            raise RestoreError(
                f"{options.new_name}: a domain of that name exists; choose another --as NAME"
            )
        return None
    existing = hypervisor.find_domain(name=info.domain, uuid=info.uuid)
    if existing is None:
        return None
    if existing.name != info.domain or (info.uuid and existing.uuid != info.uuid):
        raise RestoreError(
            f"{info.domain}: the domain {existing.name} ({existing.uuid}) has the set's name "
            f"or UUID ({info.uuid}) but not both: restore --as NEWNAME beside it, or "
            f"undefine it first (virsh undefine --checkpoints-metadata {existing.name})"
        )
    if existing.is_active():
        raise RestoreError(
            f"{info.domain}: the domain is running; shut it down (virsh shutdown "
            f"{info.domain}), then restore it in place with --force, or restore --as NEWNAME "
            f"beside it"
        )
    if not options.force:
        raise RestoreError(
            f"{info.domain}: the domain exists (shut off); restoring in place replaces its "
            f"images and definition: give --force (the replaced images are kept aside), or "
            f"restore --as NEWNAME beside it"
        )
    return existing


def _role(info: setinfo.SetInfo, name: str) -> str:
    return info.by_name()[name].role


def _unchanged_boot_files(
    info: setinfo.SetInfo, paths: dict[str, str], manifest: str, sums: dict[str, str], options
) -> list[str]:
    """The boot files (kernel, initrd, dtb) a restore in place leaves alone:
    the file at their path already has the set's bytes (often a kernel the
    host and other domains share). Only with the set's manifest to tell."""
    if options.new_name or not manifest:
        return []
    kept = []
    for item in info.state():
        path = paths.get(item.name, "")
        if item.role not in machine.BOOT_FILES or not os.path.isfile(path):
            continue
        expected = sums.get(item.name)
        actual = destination.manifest_sum(manifest, path)
        if expected and actual == expected:
            log.info(
                "%s: %s already holds the set's %s: left as it is", info.domain, path, item.role
            )
            kept.append(item.name)
    return kept


def _report_shared_boot_files(name: str, info: setinfo.SetInfo, paths: dict[str, str]) -> None:
    """A copy boots from the original's kernel files: say where, and what
    to do for one that is no longer there."""
    for item in info.state():
        if item.role not in machine.BOOT_FILES or item.name in paths:
            continue
        if os.path.isfile(item.original_path):
            log.info("%s: shares the original's %s %s", name, item.role, item.original_path)
        else:
            log.warning(
                "%s: its %s %s is missing (the copy shares the original's): put the set's "
                "copy there before starting it (`cp --sparse=always SET/%s %s`)",
                name,
                item.role,
                item.original_path,
                item.name,
                item.original_path,
            )


def _check_paths(hypervisor, info, paths: dict[str, str], options: Options, existing) -> None:
    used_by_others: dict[str, str] = {}
    for other, files in hypervisor.paths_of_other_domains(
        existing.uuid if existing else ""
    ).items():
        for path in files:
            used_by_others[os.path.realpath(path)] = other
    for name, path in paths.items():
        if _role(info, name) == machine.TPM:
            _check_tpm_path(name, path, options)
            continue
        other = used_by_others.get(os.path.realpath(path))
        if other and (options.new_name or other != info.domain):
            raise RestoreError(
                f"{name}: would be restored to {path}, which the domain {other} uses; "
                f"restore --as NEWNAME or --to DIR"
            )
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            raise RestoreError(f"{name}: the folder {folder} does not exist; give --to DIR")
        if os.path.lexists(path) and not options.force:
            raise RestoreError(
                f"{name}: {path} exists; give --force to replace it (it is kept aside), or --to DIR"
            )
        if os.path.lexists(path) and os.path.isdir(path):
            raise RestoreError(f"{name}: {path} is a folder")


def _check_tpm_path(name: str, path: str, options: Options) -> None:
    """A TPM state folder goes into libvirt's swtpm folder (made when it is
    missing, as libvirt makes it); one that exists is replaced only with
    --force (kept aside like an image)."""
    if os.path.lexists(path) and not options.force:
        raise RestoreError(
            f"{name}: the TPM state {path} exists; give --force to replace it (it is kept aside)"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RestoreError(f"{name}: {path} is not a folder")


def _check_space(ref: SetRef, info: setinfo.SetInfo, paths: dict[str, str]) -> None:
    """Refuse a restore whose copies do not fit beside their destinations
    (the replaced files stay until the domain is defined, so they count as
    taken). A remote set's sizes are not known here: rsync fails cleanly."""
    if ref.remote is not None:
        return
    needs: dict[str, int] = {}
    for item in info.files:
        if item.name not in paths or item.role == machine.TPM:  # a TPM's: a few KiB
            continue
        folder = os.path.dirname(paths[item.name])
        size = preflight.allocated_bytes(os.path.join(ref.path, item.name))
        needs[folder] = needs.get(folder, 0) + size
    problems = preflight.shortfalls(
        [preflight.SpaceNeed(folder, size, "the restored images") for folder, size in needs.items()]
    )
    if problems:
        raise RestoreError(f"{info.domain}: " + "; ".join(problems) + "; nothing restored")


def _definition_for(info, definition_xml: str, paths: dict[str, str], options: Options):
    """The definition to define, and the disks a copy leaves out."""
    disks = {item.target: (paths[item.name], item.format) for item in info.disks()}
    try:
        if options.new_name:
            files_dir = copy_files_dir({i.name: paths[i.name] for i in info.images()}, options)
            return definitions.copy_definition(
                definition_xml, options.new_name, disks, files_dir=files_dir
            )
        xml = definitions.point_disks(definition_xml, disks)
        if options.to:
            moved = {
                item.role: paths[item.name]
                for item in info.state()
                if item.role != machine.TPM and item.name in paths
            }
            xml = definitions.point_os_files(xml, moved)
        return xml, []
    except definitions.DefinitionError as error:
        raise RestoreError(f"{info.domain}: domain.xml of the set: {error}") from None


class _Stopped(Exception):
    """Another file's copy failed, or we were interrupted: stop this one."""


def _copy_all(
    ref: SetRef, info, paths, folders: dict[str, str], result: Restored, manifest: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Copy every file of the set into a private folder beside its
    destination, and hash each copy as it lands (when the set has a
    manifest), files side by side (at most 4 at once, as the backup copies
    them); one status line per file on a terminal. Returns set file -> its
    copy, and set file -> the copy's sum."""
    from backupninja_kvm.progress import Board
    from backupninja_kvm.transfer import copy_sparse, data_bytes

    items = [item for item in info.files if item.name in paths]
    for item in items:
        folder = os.path.dirname(paths[item.name])
        if item.role == machine.TPM and not os.path.isdir(folder):
            os.makedirs(folder, mode=0o711)  # libvirt's own mode for its swtpm folder
        if folder not in folders:
            folders[folder] = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder)
    stop = threading.Event()
    board = Board()

    def one(item: setinfo.SetImage) -> tuple[str, str, int, str]:
        final = paths[item.name]
        copy = os.path.join(folders[os.path.dirname(final)], os.path.basename(final))
        try:
            if ref.remote is None:
                source = os.path.join(ref.path, item.name)
                progress = board.add(
                    f"{info.domain}: restore {item.name}", preflight.allocated_bytes(source)
                )

                def update(done: int) -> None:
                    if stop.is_set():
                        raise _Stopped()
                    progress.update(done)

                copy_sparse(source, copy, update)
                progress.finish()
            else:
                ref.remote.fetch(os.path.join(ref.path, item.name), copy)
        except TransferError as error:
            raise RestoreError(f"{item.name}: {error}; nothing restored") from None
        digest = ""
        if manifest and not stop.is_set():
            digest = destination.manifest_sum(manifest, copy)
        return item.name, copy, data_bytes(copy), digest

    copies, digests = {}, {}
    pool = ThreadPoolExecutor(max_workers=min(len(items), 4) or 1)
    try:
        futures = [pool.submit(one, item) for item in items]
        for future in futures:
            name, copy, size, digest = future.result()
            copies[name], digests[name] = copy, digest
            result.bytes += size
    finally:
        stop.set()
        pool.shutdown(wait=True)  # each copy stops at its next chunk
        board.close()
    return copies, digests


def _check_copies(ref, manifest: str, sums: dict[str, str], digests, result, options) -> None:
    if not manifest:
        log.info(
            "%s: no manifest (a copy of a ride-along view): the copies are not checked by sums",
            ref.short,
        )
        return
    for name, actual in digests.items():
        expected = sums.get(name)
        if expected is None:
            raise RestoreError(f"{ref.short}: {name} is not in {manifest}; nothing restored")
        if actual != expected:
            if options.ignore_damage:
                log.warning("%s: %s differs from %s; restored as it is", ref.short, name, manifest)
                continue
            raise RestoreError(
                f"{ref.short}: {name}: its copy differs from {manifest} (the set is damaged, "
                f"or changed since the backup); nothing restored (give --ignore-damage to "
                f"restore it as it is)"
            )
        result.checked += 1


def _fix_headers(info: setinfo.SetInfo, paths: dict[str, str], copies: dict[str, str]) -> None:
    """Point each copied layer at the restored file below it, each qcow2 at
    its restored data file, by absolute paths; a backing file that is not in
    the set (a shared template) keeps its absolute name."""
    for item in info.files:
        if item.format != "qcow2":
            continue
        copy = copies[item.name]
        argv: list[str] = []
        if item.backing:
            below = info.by_name()[item.backing]
            argv = [
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-b",
                paths[item.backing],
                "-F",
                below.format,
                copy,
            ]
            _qemu_img(argv, item.name)
        if item.data_file:
            options = (
                f"driver=qcow2,file.filename={_escape(copy)},"
                f"data-file.filename={_escape(copies[item.data_file])},backing="
            )
            argv = [
                "amend",
                "--image-opts",
                options,
                "-o",
                f"data_file={_escape(paths[item.data_file])}",
            ]
            _qemu_img(argv, item.name)


def _escape(value: str) -> str:
    return value.replace(",", ",,")


def _qemu_img(argv: list[str], name: str) -> None:
    result = subprocess.run(["qemu-img", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RestoreError(
            f"{name}: qemu-img {argv[0]} of its copy failed: {message}; nothing restored"
        )


def _unpack_tpm_state(info: setinfo.SetInfo, copies: dict[str, str]) -> None:
    """Turn the checked copy of the TPM state tar into the folder that is
    renamed into place (same private folder: same filesystem)."""
    for item in info.state():
        if item.role != machine.TPM or item.name not in copies:
            continue
        packed = copies[item.name]
        unpacked = packed + ".state"
        os.mkdir(unpacked, 0o700)
        try:
            machine.unpack_tpm(packed, unpacked)
        except machine.MachineStateError as error:
            raise RestoreError(f"{error}; nothing restored") from None
        os.unlink(packed)
        copies[item.name] = unpacked


def _place_copy_tpm_state(domain, name: str, unpacked: str, result: Restored) -> None:
    """Rename a copy's TPM state into its swtpm folder, now that its UUID
    is known (before it is started: libvirt would make a new TPM)."""
    final = machine.tpm_folder(domain.uuid, os.path.dirname(os.path.dirname(unpacked)))
    try:
        if os.path.lexists(final):
            raise OSError(f"{final} exists")
        os.rename(unpacked, final)
    except OSError as error:
        raise RestoreError(
            f"{result.domain}: restored and defined, but its TPM state could not be put in "
            f"{final} ({error}): the domain would start with a new, empty TPM; put it there "
            f"by hand before starting it (`mkdir {final} && tar -xpf SET/{name} -C {final}`)"
        ) from None
    result.paths[name] = final
    result.placed.append(final)


def _put_in_place(copies: dict[str, str], paths: dict[str, str], result: Restored) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name, copy in copies.items():
        final = paths[name]
        if os.path.lexists(final):
            aside = final + ASIDE + stamp
            os.rename(final, aside)
            result.aside.append(aside)
        os.rename(copy, final)
        result.placed.append(final)


def _undo(result: Restored) -> None:
    """The definition failed: remove the restored files, put the replaced back."""
    for final in result.placed:
        try:
            if os.path.isdir(final) and not os.path.islink(final):
                shutil.rmtree(final)  # a TPM state folder
            else:
                os.unlink(final)
        except OSError:
            pass
    result.placed = []
    for aside in result.aside:
        os.rename(aside, aside.rsplit(ASIDE, 1)[0])
    result.aside = []
