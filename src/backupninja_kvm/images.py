"""``qemu-img`` on image files: read a disk's chain, fix the headers of copies.

Reads never take QEMU's image locks (``-U``): the images belong to running
domains. Writes are made only on the copies in a backup set, never on a
domain's own images.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

from backupninja_kvm.disks import Layer, parse_chain
from backupninja_kvm.errors import BackupNinjaKvmError


class ImageError(BackupNinjaKvmError):
    """qemu-img could not read or change an image; the message says which."""


def chain(path: str) -> list[Layer]:
    """Every layer of the image *path* and its backing files, top first.

    Raises ImageError when qemu-img cannot read it.
    """
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise ImageError(f"qemu-img cannot read {path}: {message[0]}")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        raise ImageError(f"qemu-img info of {path}: unreadable output") from None
    if isinstance(info, dict):
        info = [info]
    layers = parse_chain(info)
    if layers:  # the top as we named it (qemu-img shows it as given)
        layers[0] = replace(layers[0], path=os.path.abspath(path))
    return layers


def rebase_argv(backing_name: str, backing_format: str, image: str) -> list[str]:
    """Point the copy *image* at another backing file, data untouched (``-u``)."""
    return ["rebase", "-u", "-f", "qcow2", "-b", backing_name, "-F", backing_format, image]


def data_file_argv(data_file: str, image: str) -> list[str]:
    """Point the copy *image* (a qcow2) at the data file *data_file*.

    The image is opened with *data_file* given explicitly and without its
    backing file: opened as it is, it would open the files its header names,
    the domain's own.
    """
    options = (
        f"driver=qcow2,file.filename={_escape(image)},"
        f"data-file.filename={_escape(data_file)},backing="
    )
    return ["amend", "--image-opts", options, "-o", f"data_file={_escape(data_file)}"]


def _escape(value: str) -> str:
    return value.replace(",", ",,")  # qemu's option syntax


def run_in(directory: str, argv: list[str]) -> None:
    """Run ``qemu-img ARGV`` in *directory* (relative names are the set's).

    Raises ImageError with qemu-img's message.
    """
    result = subprocess.run(["qemu-img", *argv], cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise ImageError(f"qemu-img {' '.join(argv)} failed in {directory}: {message[0]}")
