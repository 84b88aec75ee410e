"""The machine's state besides its disks: the UEFI variable store, the state
of an emulated TPM, the files of a direct kernel boot.

- ``<os><nvram>PATH</nvram>`` (or ``<nvram type='file'><source file=.../>``):
  the UEFI variable store, a raw pflash image that QEMU writes whenever the
  guest sets a variable (boot entries, Secure Boot keys).
- ``<tpm><backend type='emulator'/></tpm>``: swtpm keeps the TPM's
  persistent state in ``/var/lib/libvirt/swtpm/UUID/`` (``tpm2/tpm2-00.permall``
  for a TPM 2.0; libvirt creates it, and runs ``swtpm_setup``, at the first
  start). It goes into the set as one tar of that folder (``tpm-state.tar``):
  the folder's layout and file names vary with the TPM's version and state,
  swtpm runs as its own user, and one tar keeps names, modes and owners in
  one file that the manifest covers, copies like an image and is put back
  by renaming one folder into place.
- ``<os><kernel>``, ``<initrd>``, ``<dtb>``: read by QEMU at the start only.

Parsing is pure (XML text in, paths out); ``pack_tpm`` and ``unpack_tpm``
touch only the folders they are given.
"""

from __future__ import annotations

import os
import stat
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from backupninja_kvm.errors import BackupNinjaKvmError

NVRAM = "nvram"
TPM = "tpm"
KERNEL = "kernel"
INITRD = "initrd"
DTB = "dtb"
ROLES = (NVRAM, TPM, KERNEL, INITRD, DTB)
BOOT_FILES = (KERNEL, INITRD, DTB)  # read-only to QEMU, shared by a copy
# Where libvirt's system instance keeps each domain's swtpm state (qemu.conf
# has no setting for it in libvirt 9.0).
SWTPM_DIR = "/var/lib/libvirt/swtpm"
TPM_SET_NAME = "tpm-state.tar"
# swtpm writes a new state file as TMP2-00.permall, then renames it over the
# old one: a temporary caught mid-write is not state.
SWTPM_TEMPORARY_PREFIX = "TMP"


class MachineStateError(BackupNinjaKvmError):
    """A machine-state file cannot be read or put back; the message says which."""


@dataclass(frozen=True)
class StateFile:
    """One piece of the machine's state: its role and where the domain has it
    (for the TPM: the domain's swtpm folder)."""

    role: str
    path: str


def state_files(xml: str, uuid: str, swtpm_dir: str = SWTPM_DIR) -> list[StateFile]:
    """The machine-state files the definition *xml* of the domain *uuid*
    names, in role order. Raises MachineStateError when *xml* is not XML."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise MachineStateError(f"the domain definition is not XML: {error}") from None
    found = []
    nvram = nvram_file(root)
    if nvram:
        found.append(StateFile(NVRAM, nvram))
    if uuid and has_tpm_emulator(root):
        found.append(StateFile(TPM, tpm_folder(uuid, swtpm_dir)))
    for role in BOOT_FILES:
        text = (root.findtext(f"./os/{role}") or "").strip()
        if text:
            found.append(StateFile(role, text))
    return found


def nvram_file(root: ET.Element) -> str:
    """The path of the UEFI variable store a file holds, or "" (none, or a
    block or network one, which is not a file of ours to copy)."""
    element = root.find("./os/nvram")
    if element is None:
        return ""
    kind = element.get("type", "file")
    if kind != "file":
        return ""
    source = element.find("source")
    if source is not None and source.get("file"):
        return source.get("file", "").strip()
    return (element.text or "").strip()


def has_tpm_emulator(root: ET.Element) -> bool:
    return any(
        backend.get("type") == "emulator" for backend in root.findall("./devices/tpm/backend")
    )


def tpm_folder(uuid: str, swtpm_dir: str = SWTPM_DIR) -> str:
    return os.path.join(swtpm_dir, uuid)


def set_name(item: StateFile) -> str:
    """The file's name in the set: its role, then its own name (never a
    disk's TARGET-IMAGE name: no disk target is a role's name)."""
    if item.role == TPM:
        return TPM_SET_NAME
    return f"{item.role}-{os.path.basename(item.path)}"


def pack_tpm(folder: str, tar_path: str) -> None:
    """Write the swtpm state *folder* (its own entry ``.`` and everything in
    it, owners and modes kept) as an uncompressed tar at *tar_path*.

    Each file is opened before it is described, so that a state file swtpm
    replaces meanwhile (by a rename) is taken whole, old or new; swtpm's
    temporaries and files that vanish are left out. Raises OSError."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(folder, arcname=".", recursive=False)
        for current, folders, files in os.walk(folder):
            folders.sort()
            relative = os.path.relpath(current, folder)
            for name in folders:
                tar.add(
                    os.path.join(current, name), arcname=_arcname(relative, name), recursive=False
                )
            for name in sorted(files):
                if name.startswith(SWTPM_TEMPORARY_PREFIX):
                    continue
                try:
                    handle = open(os.path.join(current, name), "rb")  # noqa: SIM115 - closed below
                except FileNotFoundError:
                    continue
                with handle:
                    info = tar.gettarinfo(arcname=_arcname(relative, name), fileobj=handle)
                    if info.isreg():
                        tar.addfile(info, handle)


def _arcname(relative: str, name: str) -> str:
    return name if relative == "." else os.path.join(relative, name)


def unpack_tpm(tar_path: str, into: str) -> None:
    """Extract a set's TPM state tar into the empty folder *into*, owners and
    modes as they were. Only folders and regular files inside it are taken:
    any other member (a link, a device, a name reaching outside) refuses the
    whole tar. Raises MachineStateError."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
            for member in members:
                name = os.path.normpath(member.name)
                inside = not os.path.isabs(name) and name != ".." and not name.startswith("../")
                if not inside or not (member.isdir() or member.isreg()):
                    raise MachineStateError(
                        f"{os.path.basename(tar_path)}: {member.name!r} is not a file or "
                        f"folder inside the TPM state; not restored"
                    )
                member.mode = stat.S_IMODE(member.mode) & 0o777
            tar.extractall(into, members=members)  # noqa: S202 - every member checked above
    except (OSError, tarfile.TarError) as error:
        raise MachineStateError(
            f"{os.path.basename(tar_path)}: cannot unpack the TPM state: {error}"
        ) from None
