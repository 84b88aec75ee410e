"""The view against the real kernel and the real tools: read-only bind mounts
of a qcow2 and a sparse raw image (and one raw image on a tmpfs, another
filesystem) read by rsync, borg and restic; writes refused; a reader that
keeps a file busy; a view left by a crashed process. No libvirt needed.

Every test takes down every mount under its scratch folder in a ``finally``.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import stat
import subprocess
import sys

import pytest

from backupninja_kvm import view
from backupninja_kvm.view import Manifest, ViewError, ViewFile

MiB = 1 << 20
DOMAIN = "bnkvm-vw-web"
XML = "<domain type='qemu'><name>bnkvm-vw-web</name></domain>\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


def _run(argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def _unmount_everything_under(folder: str) -> None:
    """Last-resort cleanup: detach every mount inside *folder*, newest first."""
    for mount in view.mounts_under(view.read_mountinfo(), os.path.realpath(folder)):
        subprocess.run(["umount", "-l", mount.mount_point], capture_output=True)


@pytest.fixture
def images(scratch):
    """A qcow2 and a sparse raw image in scratch, a raw image on a tmpfs; the view's path."""
    folder = os.path.join(scratch, "images")
    os.mkdir(folder)
    qcow2 = os.path.join(folder, "a.qcow2")
    _run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "64M"])
    _run(["qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 20M 512k", qcow2])
    raw = os.path.join(folder, "b.raw")
    with open(raw, "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(3 * MiB)
        handle.write(b"\x33" * MiB)
        handle.seek(40 * MiB)
        handle.write(b"\x44" * 4096)
    other_fs = os.path.join(scratch, "tmpfs")
    os.mkdir(other_fs)
    _run(["mount", "-t", "tmpfs", "-o", "size=32m", "bnkvm-vw-tmpfs", other_fs])
    try:
        on_tmpfs = os.path.join(other_fs, "c.raw")
        with open(on_tmpfs, "wb") as handle:
            handle.truncate(8 * MiB)
            handle.seek(MiB)
            handle.write(b"\x55" * 8192)
        files = [
            ViewFile("vda", "vda-a.qcow2", qcow2, "qcow2", 64 * MiB),
            ViewFile("vdb", "vdb-b.raw", raw, "raw", 64 * MiB),
            ViewFile("vdc", "vdc-c.raw", on_tmpfs, "raw", 8 * MiB),
        ]
        yield os.path.join(scratch, "view"), files
    finally:
        _unmount_everything_under(scratch)
        subprocess.run(["umount", "-l", other_fs], capture_output=True)


def _build(view_dir, files, domain=DOMAIN):
    manifest = Manifest(domain, "2026-12-02T01:00:00Z", "crash-consistent")
    return view.build(view_dir, domain, files, XML, manifest)


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _same_images(files, folder):
    for view_file in files:
        copy = os.path.join(folder, view_file.name)
        assert stat.S_ISREG(os.lstat(copy).st_mode), copy
        assert filecmp.cmp(view_file.source, copy, shallow=False), copy


def test_view_reads_as_the_frozen_images_and_refuses_writes(images):
    view_dir, files = images
    domain_dir = _build(view_dir, files)
    assert stat.S_IMODE(os.lstat(view_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(domain_dir).st_mode) == 0o700
    assert sorted(os.listdir(domain_dir)) == sorted(
        ["domain.xml", "manifest.json", "vda-a.qcow2", "vdb-b.raw", "vdc-c.raw"]
    )
    for name in ("domain.xml", "manifest.json"):
        assert stat.S_IMODE(os.lstat(os.path.join(domain_dir, name)).st_mode) == 0o600
    with open(os.path.join(domain_dir, "domain.xml")) as handle:
        assert handle.read() == XML
    with open(os.path.join(domain_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert [(f["name"], f["original_path"], f["format"]) for f in manifest["files"]] == [
        (f.name, f.source, f.format) for f in files
    ]
    assert manifest["consistency"] == "crash-consistent"
    for view_file in files:
        path = os.path.join(domain_dir, view_file.name)
        shown, real = os.lstat(path), os.stat(view_file.source)
        assert stat.S_ISREG(shown.st_mode)
        assert (shown.st_ino, shown.st_size, shown.st_ctime_ns) == (
            real.st_ino,
            real.st_size,
            real.st_ctime_ns,
        )
        assert filecmp.cmp(path, view_file.source, shallow=False)
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as refused:
                os.open(path, flags)
            assert refused.value.errno == errno.EROFS
    points = {m.mount_point: m for m in view.mounted(view_dir)}
    assert set(points) == {os.path.join(domain_dir, f.name) for f in files}
    assert all(m.read_only for m in points.values())
    assert {view.domain_of(view_dir, m) for m in points.values()} == {DOMAIN}

    taken = view.take_down(view_dir, DOMAIN, wait=5)
    assert sorted(taken.unmounted) == sorted(points) and not taken.forced
    assert view.mounted(view_dir) == []
    assert not os.path.exists(domain_dir)
    assert all(os.path.getsize(f.source) > 0 for f in files)  # the images themselves stay
    assert view.take_down(view_dir, DOMAIN).removed == []  # idempotent


def test_rsync_of_the_view_gives_the_images_with_holes_kept(images, scratch):
    view_dir, files = images
    try:
        _build(view_dir, files)
        target = os.path.join(scratch, "rsync")
        _run(["rsync", "-a", "-S", f"{view_dir}/", f"{target}/"])
        _same_images(files, os.path.join(target, DOMAIN))
        # -x stops at mount points of folders only: the tmpfs image is still read
        one_fs = os.path.join(scratch, "rsync-x")
        _run(["rsync", "-a", "-S", "-x", f"{view_dir}/", f"{one_fs}/"])
        _same_images(files, os.path.join(one_fs, DOMAIN))
        raw_copy = os.path.join(target, DOMAIN, "vdb-b.raw")
        # 1 MiB + 4 KiB of data in 64 MiB: holes kept, no more allocated than the source
        assert _allocated(raw_copy) <= _allocated(files[1].source) + MiB
        assert _allocated(raw_copy) < 8 * MiB
    finally:
        view.take_down(view_dir, DOMAIN, wait=5)


def test_borg_create_and_extract_of_the_view_give_the_images(images, scratch):
    view_dir, files = images
    env = dict(
        os.environ,
        BORG_PASSPHRASE="",
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_BASE_DIR=os.path.join(scratch, "borg-home"),
    )
    repository = os.path.join(scratch, "borg")
    try:
        _build(view_dir, files)
        _run(["borg", "init", "--encryption=none", repository], env=env)
        _run(["borg", "create", "-x", f"{repository}::vms", view_dir], env=env)
        target = os.path.join(scratch, "extract")
        os.mkdir(target)
        _run(["borg", "extract", "--sparse", f"{repository}::vms"], env=env, cwd=target)
        # borg -x still archives a file bound from another filesystem (only recursion stops)
        _same_images(files, os.path.join(target, view_dir.lstrip("/"), DOMAIN))
    finally:
        view.take_down(view_dir, DOMAIN, wait=5)


def _restic(scratch, *argv):
    env = dict(
        os.environ,
        RESTIC_PASSWORD="bnkvm-vw",
        RESTIC_REPOSITORY=os.path.join(scratch, "restic"),
        RESTIC_CACHE_DIR=os.path.join(scratch, "restic-cache"),
    )
    return _run(["restic", *argv], env=env)


def test_restic_backup_and_restore_of_the_view_give_the_images(images, scratch):
    view_dir, files = images
    try:
        _build(view_dir, files)
        _restic(scratch, "init")
        _restic(scratch, "backup", view_dir)
        target = os.path.join(scratch, "restore")
        _restic(scratch, "restore", "latest", "--target", target)
        _same_images(files, os.path.join(target, view_dir.lstrip("/"), DOMAIN))
    finally:
        view.take_down(view_dir, DOMAIN, wait=5)


def test_restic_one_file_system_drops_the_image_bound_from_another_filesystem(images, scratch):
    """The known rule (docs/architecture.md): never one_file_system with a view."""
    view_dir, files = images
    try:
        _build(view_dir, files)
        _restic(scratch, "init")
        _restic(scratch, "backup", "--one-file-system", view_dir)  # rc 0: silent
        target = os.path.join(scratch, "restore")
        _restic(scratch, "restore", "latest", "--target", target)
        restored = os.path.join(target, view_dir.lstrip("/"), DOMAIN)
        _same_images(files[:2], restored)  # the images on the view's own filesystem
        assert not os.path.exists(os.path.join(restored, "vdc-c.raw"))  # the tmpfs one
    finally:
        view.take_down(view_dir, DOMAIN, wait=5)


def test_take_down_with_a_reader_detaches_names_the_reader_and_leaves_no_mount(images):
    view_dir, files = images
    reader = None
    try:
        domain_dir = _build(view_dir, files)
        busy = os.path.join(domain_dir, "vdb-b.raw")
        with open(busy, "rb") as handle:
            reader = subprocess.Popen(["sleep", "3600"], stdin=handle)
        taken = view.take_down(view_dir, DOMAIN, wait=0.5)
        assert [f.path for f in taken.forced] == [busy]
        assert [(r.pid, r.command) for r in taken.forced[0].readers] == [(reader.pid, "sleep")]
        assert "sleep (pid" in taken.forced[0].describe() and busy in taken.forced[0].describe()
        assert len(taken.unmounted) == 2
        assert view.mounted(view_dir) == []
        assert not os.path.exists(domain_dir)
        # the orphaned reader still reads the frozen image through its descriptor
        with open(f"/proc/{reader.pid}/fd/0", "rb") as held:
            held.seek(3 * MiB)
            assert held.read(16) == b"\x33" * 16
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
        view.take_down(view_dir, DOMAIN, wait=0)


def test_a_view_left_by_a_crashed_process_is_found_and_taken_down(images):
    view_dir, files = images
    other = "bnkvm-vw-db"
    try:
        # the process that built the view exits without taking it down
        code = (
            "import sys; from backupninja_kvm import view\n"
            "files = [view.ViewFile(*f) for f in eval(sys.argv[2])]\n"
            "for domain in sys.argv[3:]:\n"
            "    view.build(sys.argv[1], domain, files, '<domain/>',"
            " view.Manifest(domain, '2026-12-02T01:00:00Z', 'quiesced'))\n"
            "import os; os._exit(9)\n"
        )
        plain = repr([(f.target, f.name, f.source, f.format, f.virtual_size) for f in files])
        crashed = subprocess.run([sys.executable, "-c", code, view_dir, plain, DOMAIN, other])
        assert crashed.returncode == 9
        left = view.mounted(view_dir)
        assert len(left) == 6
        for domain in sorted({view.domain_of(view_dir, m) for m in left}):
            assert not view.take_down(view_dir, domain, wait=5).forced
        assert view.mounted(view_dir) == []
        assert os.listdir(view_dir) == []
    finally:
        view.take_down(view_dir, DOMAIN, wait=0)
        view.take_down(view_dir, other, wait=0)


def test_a_view_half_built_when_its_process_was_killed_is_taken_down(images):
    view_dir, files = images
    try:
        code = (
            "import sys; from backupninja_kvm import view\n"
            "files = [view.ViewFile(*f) for f in eval(sys.argv[2])]\n"
            "view.build(sys.argv[1], sys.argv[3], files, '<domain/>',"
            " view.Manifest(sys.argv[3], '2026-12-02T01:00:00Z', 'quiesced'))\n"
        )
        plain = repr([(f.target, f.name, f.source, f.format, f.virtual_size) for f in files])
        killed = subprocess.run(
            [sys.executable, "-c", code, view_dir, plain, DOMAIN],
            env=dict(os.environ, BACKUPNINJA_KVM_FAULT="mid-view"),
        )
        assert killed.returncode == -9
        assert [m.mount_point for m in view.mounted(view_dir)] == [
            os.path.join(view_dir, DOMAIN, files[0].name)
        ]
        assert len(os.listdir(os.path.join(view_dir, DOMAIN))) == 3  # manifest, xml, one file
        taken = view.take_down(view_dir, DOMAIN, wait=5)
        assert len(taken.unmounted) == 1 and not taken.forced
        assert view.mounted(view_dir) == [] and os.listdir(view_dir) == []
    finally:
        view.take_down(view_dir, DOMAIN, wait=0)


def test_a_view_folder_that_is_not_ours_is_refused(images, scratch):
    view_dir, files = images
    elsewhere = os.path.join(scratch, "elsewhere")
    os.mkdir(elsewhere, 0o700)
    os.mkdir(view_dir, 0o700)
    os.symlink(elsewhere, os.path.join(view_dir, DOMAIN))
    with pytest.raises(ViewError, match="already exists"):
        _build(view_dir, files)
    os.unlink(os.path.join(view_dir, DOMAIN))
    os.symlink(elsewhere, os.path.join(view_dir, "x"))
    with pytest.raises(ViewError, match="not a folder of ours"):
        view.take_down(view_dir, "x", wait=0)  # never followed, never emptied
    os.unlink(os.path.join(view_dir, "x"))
    os.chmod(view_dir, 0o755)
    with pytest.raises(ViewError, match="root-owned 0700"):
        _build(view_dir, files)
    os.chmod(view_dir, 0o700)
    link = os.path.join(scratch, "view-link")
    os.symlink(view_dir, link)
    with pytest.raises(ViewError, match="symbolic link"):
        _build(link, files)
    assert view.mounted(view_dir) == [] and os.listdir(elsewhere) == []


def test_a_source_that_is_not_a_regular_file_is_refused_before_anything_is_made(images, scratch):
    view_dir, files = images
    folder = os.path.join(scratch, "images")
    refused = [*files[:1], ViewFile("vdd", "vdd-images", folder, "raw", 1)]
    with pytest.raises(ViewError, match="not a regular file"):
        _build(view_dir, refused)
    assert view.mounted(view_dir) == []
    assert not os.path.exists(os.path.join(view_dir, DOMAIN))
