"""Backup sets at the destination: partial folders, manifest, latest link, pruning."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from backupninja_kvm import destination
from backupninja_kvm.destination import MANIFEST, BackupSet
from backupninja_kvm.errors import DomainError

STAMPS = [
    "20260101T010000",
    "20260102T010000",
    "20260103T010000",
    "20260104T010000",
    "20260105T010000",
]


def make_set(domain_dir: Path, stamp: str, files: dict[str, bytes] | None = None) -> Path:
    """Write a complete set the way a run does."""
    backup_set = BackupSet(str(domain_dir), stamp)
    partial = Path(backup_set.begin())
    if files is None:
        files = {"domain.xml": b"<domain/>", "vda-web1.qcow2": b"QFI\xfb"}
    for name, data in files.items():
        (partial / name).write_bytes(data)
    return Path(backup_set.complete())


def test_a_set_is_written_in_a_partial_folder_first(tmp_path):
    domain_dir = tmp_path / "web1"
    backup_set = BackupSet(str(domain_dir), STAMPS[0])

    partial = backup_set.begin()

    assert partial == str(domain_dir / f"{STAMPS[0]}.partial")
    assert os.path.isdir(partial)
    assert stat.S_IMODE(os.stat(partial).st_mode) == 0o700
    assert destination.complete_sets(str(domain_dir)) == []
    assert not os.path.lexists(domain_dir / "latest")


def test_a_completed_set_has_its_final_name_a_manifest_and_no_partial(tmp_path):
    domain_dir = tmp_path / "web1"
    files = {
        "domain.xml": b"<domain><name>web1</name></domain>",
        "vda-web1.qcow2": b"QFI\xfb" + bytes(4096),
        "vdb-web1 data.img": b"data with a space in the name",
    }

    final = make_set(domain_dir, STAMPS[0], files)

    assert final == domain_dir / STAMPS[0]
    assert not (domain_dir / f"{STAMPS[0]}.partial").exists()
    assert sorted(p.name for p in final.iterdir()) == sorted([*files, MANIFEST])
    listed = [line.split("  ", 1)[1] for line in (final / MANIFEST).read_text().splitlines()]
    assert listed == sorted(files)
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0]]


def test_b3sum_accepts_the_manifest(tmp_path):
    files = {
        "domain.xml": b"<domain/>",
        "vda-web1.qcow2": b"x" * 70000,
        "vdb-odd name\\with backslash.img": b"",
    }
    final = make_set(tmp_path / "web1", STAMPS[0], files)
    # A sparse image: a hole, data, and a hole at the end.
    with open(final / "vdc-sparse.img", "wb") as image:
        image.seek(5 << 20)
        image.write(b"data after a hole")
        image.truncate(12 << 20)
    digest = destination.file_b3sum(str(final / "vdc-sparse.img"))
    with open(final / MANIFEST, "a") as manifest:
        manifest.write(f"{digest}  vdc-sparse.img\n")

    check = subprocess.run(
        ["b3sum", "--check", MANIFEST],
        cwd=final,
        capture_output=True,
        text=True,
    )

    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 4


# Made by the PyPI blake3 module before 0.6 (and by `b3sum` itself): sets
# made then must still verify.
SPARSE_SUM = "cecaad3669d00cd6633510b37a5d4ef843a4c008bd6fc7565a2c3108b9262ca4"
EMPTY_SUM = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def sparse_image(path: Path) -> str:
    with open(path, "wb") as image:
        image.seek(5 << 20)
        image.write(b"data after a hole")
        image.truncate(12 << 20)
    return str(path)


@pytest.mark.parametrize(
    ("module", "streamed_holes"),
    [(True, 0), (False, destination.STREAMED_HOLES), (False, 0)],
    ids=["blake3-module", "b3sum-whole", "b3sum-piped"],
)
def test_sums_are_the_ones_earlier_versions_wrote(tmp_path, monkeypatch, module, streamed_holes):
    monkeypatch.setattr(destination, "STREAMED_HOLES", streamed_holes)
    if not module:
        monkeypatch.setattr(destination, "_blake3", None)
    else:
        assert destination._blake3 is not None, "the test venv installs blake3 (setup.cfg fast)"
    sparse = sparse_image(tmp_path / "vda-sparse.img")
    (tmp_path / "empty").write_bytes(b"")

    sums = destination.file_b3sums([sparse, str(tmp_path / "empty"), sparse])

    assert sums == [SPARSE_SUM, EMPTY_SUM, SPARSE_SUM]


def test_a_missing_b3sum_program_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(destination, "_blake3", None)
    monkeypatch.setattr(destination, "B3SUM", "b3sum-not-installed")
    (tmp_path / "image").write_bytes(b"x")

    with pytest.raises(OSError, match="apt install b3sum"):
        destination.file_b3sum(str(tmp_path / "image"))


def test_b3sum_detects_a_damaged_image(tmp_path):
    final = make_set(tmp_path / "web1", STAMPS[0], {"vda-web1.qcow2": b"x" * 70000})
    with open(final / "vda-web1.qcow2", "r+b") as image:
        image.seek(1234)
        image.write(b"y")

    check = subprocess.run(["b3sum", "--check", MANIFEST], cwd=final, capture_output=True)

    assert check.returncode != 0


def test_latest_is_a_relative_link_to_the_newest_set(tmp_path):
    domain_dir = tmp_path / "web1"

    make_set(domain_dir, STAMPS[0])
    assert os.readlink(domain_dir / "latest") == STAMPS[0]

    make_set(domain_dir, STAMPS[1])
    assert os.readlink(domain_dir / "latest") == STAMPS[1]
    assert (domain_dir / "latest" / MANIFEST).is_file()
    assert not os.path.lexists(domain_dir / "latest.new")


def test_latest_still_points_at_its_set_when_the_destination_moves(tmp_path):
    make_set(tmp_path / "old" / "web1", STAMPS[0])
    os.rename(tmp_path / "old", tmp_path / "new")

    assert (tmp_path / "new" / "web1" / "latest" / "domain.xml").read_bytes() == b"<domain/>"


def test_an_empty_set_still_gets_a_manifest(tmp_path):
    final = make_set(tmp_path / "web1", STAMPS[0], {})

    assert (final / MANIFEST).read_text() == ""
    assert destination.complete_sets(str(tmp_path / "web1")) == [STAMPS[0]]


def test_a_partial_set_left_by_an_interrupted_run_is_replaced(tmp_path):
    first = BackupSet(str(tmp_path / "web1"), STAMPS[0])
    Path(first.begin(), "vda-web1.qcow2").write_bytes(b"half")

    second = BackupSet(str(tmp_path / "web1"), STAMPS[0]).begin()

    assert os.listdir(second) == []


def test_a_complete_set_of_the_same_name_is_never_overwritten(tmp_path):
    make_set(tmp_path / "web1", STAMPS[0], {"vda-web1.qcow2": b"data"})

    with pytest.raises(destination.SetExists):
        BackupSet(str(tmp_path / "web1"), STAMPS[0]).begin()


def test_discard_removes_the_partial_folder_and_its_files(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0])
    backup_set = BackupSet(str(domain_dir), STAMPS[1])
    partial = Path(backup_set.begin())
    (partial / "vda-web1.qcow2").write_bytes(b"half a copy")

    backup_set.discard()

    assert not partial.exists()
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0]]
    assert os.readlink(domain_dir / "latest") == STAMPS[0]


def test_discard_of_a_set_never_begun_is_harmless(tmp_path):
    BackupSet(str(tmp_path / "web1"), STAMPS[0]).discard()

    assert not (tmp_path / "web1").exists()


def test_only_complete_sets_count(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[3])
    make_set(domain_dir, STAMPS[0])
    interrupted = domain_dir / f"{STAMPS[4]}.partial"
    interrupted.mkdir()
    (interrupted / MANIFEST).write_text("")  # even with a manifest, a partial is no set
    (domain_dir / STAMPS[1]).mkdir()  # renamed but without manifest
    (domain_dir / STAMPS[2]).write_text("a file, not a folder")
    for name in ("notes", "2026-01-03", "20260103T0100", "20260103T010000.old", "20261399T999999Z"):
        (domain_dir / name).mkdir()
        (domain_dir / name / MANIFEST).write_text("")

    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0], STAMPS[3]]


def test_sets_with_the_older_sha256sums_manifest_still_count_and_are_pruned(tmp_path):
    domain_dir = tmp_path / "web1"
    for stamp in STAMPS[:2]:  # written by an earlier version
        (domain_dir / stamp).mkdir(parents=True)
        (domain_dir / stamp / "SHA256SUMS").write_text(f"{'0' * 64}  vda-web1.qcow2\n")
    make_set(domain_dir, STAMPS[2])

    assert destination.complete_sets(str(domain_dir)) == STAMPS[:3]
    assert destination.prune(str(domain_dir), 1) == STAMPS[:2]


def test_a_domain_without_backups_has_no_sets(tmp_path):
    assert destination.complete_sets(str(tmp_path / "never")) == []
    assert destination.stale_partials(str(tmp_path / "never"), STAMPS[0]) == []
    assert destination.prune(str(tmp_path / "never"), 1) == []


@pytest.mark.parametrize(("keep", "kept"), [(1, 1), (2, 2), (4, 4), (5, 5), (7, 5)])
def test_prune_keeps_the_newest_sets(tmp_path, keep, kept):
    domain_dir = tmp_path / "web1"
    for stamp in STAMPS:
        make_set(domain_dir, stamp)

    removed = destination.prune(str(domain_dir), keep)

    assert removed == STAMPS[: len(STAMPS) - kept]
    assert destination.complete_sets(str(domain_dir)) == STAMPS[len(STAMPS) - kept :]
    assert all(not (domain_dir / stamp).exists() for stamp in removed)
    assert os.readlink(domain_dir / "latest") == STAMPS[-1]
    assert (domain_dir / "latest").is_dir()


def test_prune_leaves_partial_and_foreign_folders_alone(tmp_path):
    domain_dir = tmp_path / "web1"
    for stamp in STAMPS[:3]:
        make_set(domain_dir, stamp)
    (domain_dir / f"{STAMPS[3]}.partial").mkdir()
    (domain_dir / "notes").mkdir()

    destination.prune(str(domain_dir), 1)

    assert sorted(p.name for p in domain_dir.iterdir()) == sorted(
        [STAMPS[2], f"{STAMPS[3]}.partial", "notes", "latest"]
    )


def test_stale_partials_are_those_of_other_runs(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0])
    for stamp in (STAMPS[1], STAMPS[2], STAMPS[4]):
        BackupSet(str(domain_dir), stamp).begin()
    (domain_dir / "notes.partial").mkdir()
    (domain_dir / "20260103.partial").mkdir()

    stale = destination.stale_partials(str(domain_dir), STAMPS[4])

    assert stale == [f"{STAMPS[1]}.partial", f"{STAMPS[2]}.partial"]


def test_a_stale_partial_can_be_discarded_by_its_stamp(tmp_path):
    domain_dir = tmp_path / "web1"
    BackupSet(str(domain_dir), STAMPS[0]).begin()
    BackupSet(str(domain_dir), STAMPS[1]).begin()

    for name in destination.stale_partials(str(domain_dir), STAMPS[1]):
        BackupSet(str(domain_dir), name[: -len(destination.PARTIAL)]).discard()

    assert sorted(p.name for p in domain_dir.iterdir()) == [f"{STAMPS[1]}.partial"]


def test_point_latest_replaces_a_dangling_link(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0])
    os.symlink("gone", domain_dir / "latest.new")  # left by an interrupted run

    destination.point_latest(str(domain_dir), STAMPS[0])

    assert os.readlink(domain_dir / "latest") == STAMPS[0]
    assert not os.path.lexists(domain_dir / "latest.new")


def test_point_latest_removes_leftover_links_that_point_at_a_set(tmp_path):
    # A kill between the link and its rename leaves it pointing at a real
    # set (0.2 named it latest.new, as the first-day probe found it).
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0])
    make_set(domain_dir, STAMPS[1])
    os.symlink(STAMPS[0], domain_dir / ".latest.new")
    os.symlink(STAMPS[0], domain_dir / "latest.new")

    problem = destination.point_latest(str(domain_dir), STAMPS[1])

    assert problem is None
    assert os.readlink(domain_dir / "latest") == STAMPS[1]
    assert not os.path.lexists(domain_dir / ".latest.new")
    assert not os.path.lexists(domain_dir / "latest.new")


def remote_complete(tmp_path, path_entries: list[str]) -> Path:
    """Run the script the remote host runs to complete a set, here, with a
    PATH holding only *path_entries* (symlinks to the real tools)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in path_entries:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    domain_dir = tmp_path / "web1"
    partial = domain_dir / f"{STAMPS[0]}.partial"
    partial.mkdir(parents=True)
    (partial / "domain.xml").write_bytes(b"<domain/>")
    (partial / "vda-web1.qcow2").write_bytes(b"x" * 70000)
    subprocess.run(
        ["/bin/sh", "-c", destination._COMPLETE, "sh", str(domain_dir), STAMPS[0]],
        env={"PATH": str(bin_dir)},
        check=True,
    )
    return domain_dir


BASIC_TOOLS = ["mv", "ln", "sync"]


def test_a_remote_host_with_b3sum_writes_b3sums(tmp_path):
    domain_dir = remote_complete(tmp_path, [*BASIC_TOOLS, "b3sum", "sha256sum"])

    final = domain_dir / STAMPS[0]
    assert sorted(os.listdir(final)) == ["B3SUMS", "domain.xml", "vda-web1.qcow2"]
    subprocess.run(["b3sum", "--check", "B3SUMS"], cwd=final, check=True, capture_output=True)
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0]]
    assert os.readlink(domain_dir / "latest") == STAMPS[0]


def test_a_remote_host_without_b3sum_writes_sha256sums(tmp_path):
    domain_dir = remote_complete(tmp_path, [*BASIC_TOOLS, "sha256sum"])

    final = domain_dir / STAMPS[0]
    assert sorted(os.listdir(final)) == ["SHA256SUMS", "domain.xml", "vda-web1.qcow2"]
    subprocess.run(
        ["sha256sum", "--check", "SHA256SUMS"], cwd=final, check=True, capture_output=True
    )
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0]]


# Names, order and retention (M5, m6, C2).

IMAGES = {"domain.xml": b"<domain/>", "vda-web1.qcow2": b"QFI\xfb"}
DEFINITION_ONLY = {"domain.xml": b"<domain/>"}


def test_new_set_names_are_utc_with_the_zone_marked(monkeypatch):
    monkeypatch.setenv("TZ", "UTC-12")
    time.tzset()
    try:
        assert destination.new_stamp(1796180207) == "20261202T025647Z"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_old_local_time_names_are_sets_and_older_than_every_utc_name(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, "20261202T144652")  # 0.2, local time 12 h ahead of UTC
    make_set(domain_dir, "20261202T024654Z")

    assert destination.complete_sets(str(domain_dir)) == ["20261202T144652", "20261202T024654Z"]
    assert destination.prune(str(domain_dir), 1, "20261202T024654Z") == ["20261202T144652"]
    assert destination.complete_sets(str(domain_dir)) == ["20261202T024654Z"]


def test_after_a_clock_step_back_the_new_set_is_still_the_newest(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, "20261202T144652Z")  # made while the clock was 12 h ahead
    backup_set = BackupSet(str(domain_dir), "20261202T024654Z")

    assert backup_set.choose_stamp() == "20261202T144653Z"
    final = make_set(domain_dir, backup_set.stamp, IMAGES)

    assert destination.prune(str(domain_dir), 1, backup_set.stamp) == ["20261202T144652Z"]
    assert destination.complete_sets(str(domain_dir)) == [final.name]
    assert destination.latest_set(str(domain_dir)) == final.name


def test_a_second_set_in_the_same_second_takes_the_next_free_name(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, "20261202T025647Z")
    second = BackupSet(str(domain_dir), "20261202T025647Z")
    second.choose_stamp()
    make_set(domain_dir, second.stamp)
    third = BackupSet(str(domain_dir), "20261202T025647Z")

    assert second.stamp == "20261202T025648Z"
    assert third.choose_stamp() == "20261202T025649Z"


def test_a_new_name_after_old_local_time_names_is_the_run_s_own_time(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, "20261202T144652")

    assert BackupSet(str(domain_dir), "20261202T024654Z").choose_stamp() == "20261202T024654Z"
    assert destination.next_stamp("20261202T024654Z", []) == "20261202T024654Z"


def test_the_set_just_made_is_never_pruned(tmp_path):
    domain_dir = tmp_path / "web1"
    for stamp in STAMPS[:3]:
        make_set(domain_dir, stamp)

    assert destination.prune(str(domain_dir), 1, current=STAMPS[0]) == [STAMPS[1]]
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0], STAMPS[2]]


def test_a_set_without_images_never_counts_toward_keep(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0], IMAGES)
    make_set(domain_dir, STAMPS[1], IMAGES)
    make_set(domain_dir, STAMPS[2], DEFINITION_ONLY)  # the VM's disks moved to LVM

    assert destination.prune(str(domain_dir), 2, STAMPS[2]) == []
    assert destination.prune(str(domain_dir), 1, STAMPS[2]) == [STAMPS[0]]
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[1], STAMPS[2]]


def test_sets_without_images_never_make_a_good_set_go(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0], IMAGES)
    for stamp in STAMPS[1:]:
        make_set(domain_dir, stamp, DEFINITION_ONLY)

    assert destination.prune(str(domain_dir), 1, STAMPS[-1]) == []
    assert destination.complete_sets(str(domain_dir)) == STAMPS


def test_sets_without_images_older_than_every_kept_set_go_with_them(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0], IMAGES)
    make_set(domain_dir, STAMPS[1], DEFINITION_ONLY)
    make_set(domain_dir, STAMPS[2], IMAGES)

    assert destination.prune(str(domain_dir), 1, STAMPS[2]) == STAMPS[:2]


@pytest.mark.parametrize(
    ("manifest", "has_images"),
    [
        ("", False),
        (f"{'a' * 64}  domain.xml\n", False),
        (f"{'a' * 64}  domain.xml\n{'b' * 64}  vda-web1.qcow2\n", True),
        (f"{'b' * 64}  vdb-odd name.img\n", True),
    ],
)
def test_a_set_has_images_when_its_manifest_lists_more_than_the_definition(manifest, has_images):
    assert destination.manifest_has_images(manifest.splitlines(keepends=True)) is has_images


# latest (M6)


def test_latest_as_a_folder_is_a_warning_and_the_set_is_complete(tmp_path, caplog):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0])
    os.unlink(domain_dir / "latest")
    shutil.copytree(domain_dir / STAMPS[0], domain_dir / "latest")  # cp -rL

    final = make_set(domain_dir, STAMPS[1])

    assert destination.complete_sets(str(domain_dir)) == STAMPS[:2]
    assert (domain_dir / "latest").is_dir() and not (domain_dir / "latest").is_symlink()
    assert sorted(os.listdir(domain_dir)) == [*STAMPS[:2], "latest"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{final} is complete" in w and "latest is a folder" in w for w in warnings)


def test_the_latest_file_is_read_back_and_kept_up_to_date(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, STAMPS[0])
    (domain_dir / destination.LATEST_FILE).write_text(STAMPS[0] + "\n")  # copied from a NAS

    make_set(domain_dir, STAMPS[1])

    assert (domain_dir / destination.LATEST_FILE).read_text() == STAMPS[1] + "\n"
    assert destination.latest_set(str(domain_dir)) == STAMPS[1]
    assert not [n for n in os.listdir(domain_dir) if n.endswith(".new")]


# Names and folders that must not be trusted (m16, m4)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "../x", "web\n1", "web\x1b1", "a\x7f"])
def test_a_domain_name_that_is_no_safe_folder_name_is_refused(tmp_path, name):
    with pytest.raises(DomainError, match="cannot be a folder name at the destination"):
        destination.domain_directory(str(tmp_path), name)


@pytest.mark.parametrize("name", ["web1", "web-1.example", "..web", "a b", "ü"])
def test_ordinary_domain_names_are_folder_names(tmp_path, name):
    assert destination.domain_directory(str(tmp_path), name) == str(tmp_path / name)


def test_a_domain_folder_writable_by_others_is_refused(tmp_path):
    domain_dir = tmp_path / "web1"
    domain_dir.mkdir()
    domain_dir.chmod(0o777)

    with pytest.raises(DomainError, match=rf"web1: {domain_dir} is writable by group or others"):
        BackupSet(str(domain_dir), STAMPS[0]).begin()
    assert os.listdir(domain_dir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder away")
def test_a_domain_folder_owned_by_another_user_is_refused_not_taken_over(tmp_path):
    domain_dir = tmp_path / "web1"
    domain_dir.mkdir(mode=0o755)
    os.chown(domain_dir, 65534, 65534)

    with pytest.raises(DomainError, match=rf"{domain_dir} is owned by uid 65534"):
        BackupSet(str(domain_dir), STAMPS[0]).begin()
    assert os.stat(domain_dir).st_uid == 65534  # not silently chowned


def test_a_link_in_place_of_the_partial_folder_is_never_followed(tmp_path):
    domain_dir = tmp_path / "web1"
    domain_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    os.symlink(elsewhere, domain_dir / f"{STAMPS[0]}.partial")

    partial = BackupSet(str(domain_dir), STAMPS[0]).begin()

    assert not os.path.islink(partial) and os.listdir(partial) == []
    assert (elsewhere / "precious").read_text() == "keep me"


def test_a_world_writable_folder_gets_a_warning(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o1777)

    warning = destination.world_writable_warning(str(share), "[dest] directory")

    assert warning and "[dest] directory" in warning and "(sticky)" in warning
    share.chmod(0o755)
    assert destination.world_writable_warning(str(share), "[dest] directory") is None


# The same rules on a remote host: the shell snippets, run here.


def remote_listing(domain_dir: Path) -> tuple[list[str], list[destination.SetEntry]]:
    output = subprocess.run(
        ["/bin/sh", "-c", destination._LIST, "sh", str(domain_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return destination.parse_listing(output)


def test_the_remote_listing_tells_sets_with_images_from_those_without(tmp_path):
    domain_dir = tmp_path / "web1"
    make_set(domain_dir, "20261202T144652", IMAGES)
    make_set(domain_dir, "20261202T024654Z", DEFINITION_ONLY)
    (domain_dir / "20261203T000000Z.partial").mkdir()
    (domain_dir / "notes").mkdir()
    (domain_dir / "notes" / MANIFEST).write_text("")

    names, entries = remote_listing(domain_dir)

    assert entries == [
        destination.SetEntry("20261202T144652", True),
        destination.SetEntry("20261202T024654Z", False),
    ]
    assert "20261203T000000Z.partial" in names
    assert destination.sets_to_prune(entries, 1, "20261202T024654Z") == []
    assert destination.next_stamp("20261202T024654Z", names) == "20261203T000001Z"


def test_the_remote_listing_counts_images_as_the_local_one_does(tmp_path):
    # A blank line, or a name that only looks like domain.xml, is no image.
    domain_dir = tmp_path / "web1"
    for stamp, manifest in (
        ("20261201T000000Z", "abc  domain.xml\n\n"),
        ("20261202T000000Z", "abc  domain.xml\nabc  domainXxml\n"),
    ):
        (domain_dir / stamp).mkdir(parents=True)
        (domain_dir / stamp / MANIFEST).write_text(manifest)

    _, remote = remote_listing(domain_dir)

    local = [
        destination.SetEntry(
            e.stamp,
            destination.manifest_has_images(
                (domain_dir / e.stamp / MANIFEST).read_text().splitlines()
            ),
        )
        for e in remote
    ]
    assert (
        remote
        == local
        == [
            destination.SetEntry("20261201T000000Z", False),
            destination.SetEntry("20261202T000000Z", True),
        ]
    )


def test_a_remote_latest_folder_is_a_warning_after_the_set_is_complete(tmp_path):
    domain_dir = tmp_path / "web1"
    (domain_dir / "latest").mkdir(parents=True)
    partial = domain_dir / f"{STAMPS[0]}.partial"
    partial.mkdir()
    (partial / "vda-web1.qcow2").write_bytes(b"x")

    done = subprocess.run(
        ["/bin/sh", "-c", destination._COMPLETE, "sh", str(domain_dir), STAMPS[0]],
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
    assert "warning: " in done.stdout and "latest is a folder" in done.stdout
    assert destination.complete_sets(str(domain_dir)) == [STAMPS[0]]
    assert sorted(os.listdir(domain_dir)) == [STAMPS[0], "latest"]
