"""set.json, and the same description read from older sets and view copies."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from backupninja_kvm import setinfo, sets

DOMAIN_XML = """<domain type='qemu'><name>web1</name><uuid>{uuid}</uuid><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/srv/vm/web1.s1.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='/srv/vm/data.raw'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/srv/iso/d.iso'/><target dev='hdc'/></disk>
</devices></domain>"""
UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def qemu_img(*args: str, cwd: str) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True)


def legacy_set(path) -> str:
    """A set as 0.4 wrote it: no set.json; vda's top names its layer below by
    the set's relative name (what fix_headers did)."""
    folder = str(path)
    (path / "domain.xml").write_text(DOMAIN_XML.format(uuid=UUID))
    qemu_img("create", "-q", "-f", "qcow2", "vda-web1.qcow2", "1M", cwd=folder)
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda-web1.qcow2",
        "-F",
        "qcow2",
        "vda-web1.s1.qcow2",
        cwd=folder,
    )
    (path / "vdb-data.raw").write_bytes(b"\0" * 4096)
    (path / "B3SUMS").write_text("")
    return folder


def test_an_old_set_is_described_from_its_definition_and_headers(tmp_path):
    info = setinfo.read(legacy_set(tmp_path))

    assert (info.domain, info.uuid, info.source) == ("web1", UUID, "domain.xml")
    assert [(f.name, f.role, f.original_path, f.format, f.backing) for f in info.files] == [
        ("vda-web1.s1.qcow2", "disk", "/srv/vm/web1.s1.qcow2", "qcow2", "vda-web1.qcow2"),
        ("vda-web1.qcow2", "backing", "/srv/vm/web1.qcow2", "qcow2", ""),
        ("vdb-data.raw", "disk", "/srv/vm/data.raw", "raw", ""),
    ]
    assert info.by_name()["vda-web1.s1.qcow2"].virtual_size == 1024 * 1024


def test_set_json_round_trips_and_refuses_names_outside_the_set():
    info = setinfo.SetInfo(
        "web1",
        UUID,
        "2026-12-02T01:00:00Z",
        "quiesced",
        (setinfo.SetImage("vda-web1.qcow2", "vda", "disk", "/srv/web1.qcow2", "qcow2", 10),),
    )
    assert setinfo.SetInfo.from_json(info.to_json(), "set.json") == info
    for bad_name in ("../etc/passwd", "B3SUMS", "", "domain.xml"):
        data = json.loads(info.to_json())
        data["files"][0]["name"] = bad_name
        with pytest.raises(setinfo.SetInfoError, match="cannot be an image's name"):
            setinfo.SetInfo.from_json(json.dumps(data), "set.json")
    data = json.loads(info.to_json())
    data["files"][0]["backing"] = "elsewhere.qcow2"
    with pytest.raises(
        setinfo.SetInfoError, match="refers to elsewhere.qcow2, which it does not list"
    ):
        setinfo.SetInfo.from_json(json.dumps(data), "set.json")
    with pytest.raises(setinfo.SetInfoError, match="set.json: not a set description"):
        setinfo.SetInfo.from_json("{", "set.json")


def test_a_view_copy_is_described_from_its_manifest(tmp_path):
    folder = str(tmp_path)
    (tmp_path / "domain.xml").write_text(DOMAIN_XML.format(uuid=UUID))
    qemu_img("create", "-q", "-f", "qcow2", "vda-web1.qcow2", "1M", cwd=folder)
    # The exposed layer still names the domain's own file below it.
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/srv/vm/web1.qcow2",
        "-F",
        "qcow2",
        "vda-web1.s1.qcow2",
        "1M",
        cwd=folder,
    )
    manifest = {
        "version": 1,
        "domain": "web1",
        "freeze_time": "2026-12-02T01:00:00Z",
        "consistency": "crash-consistent",
        "files": [
            {
                "name": "vda-web1.s1.qcow2",
                "target": "vda",
                "original_path": "/srv/vm/web1.s1.qcow2",
                "format": "qcow2",
                "virtual_size": 1048576,
            },
            {
                "name": "vda-web1.qcow2",
                "target": "vda",
                "original_path": "/srv/vm/web1.qcow2",
                "format": "qcow2",
                "virtual_size": 1048576,
            },
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    info = setinfo.read(folder)
    ref = sets.local_set(folder)

    assert ref.view_copy and ref.domain == "web1"
    assert info.uuid == UUID
    top = info.by_name()["vda-web1.s1.qcow2"]
    assert top.backing == "vda-web1.qcow2"  # found by its original path


def test_checks_are_recorded_atomically_and_kept_per_kind(tmp_path):
    setinfo.record_check(str(tmp_path), "verify", {"ok": True})
    setinfo.record_check(str(tmp_path), "rehearse", {"ok": False})
    setinfo.record_check(str(tmp_path), "verify", {"ok": False})

    assert setinfo.read_checks(str(tmp_path)) == {
        "verify": {"ok": False},
        "rehearse": {"ok": False},
    }
    assert sorted(os.listdir(tmp_path)) == ["checks.json"]


def test_a_set_is_named_by_path_or_by_domain_at_a_destination(tmp_path):
    domain_dir = tmp_path / "web1"
    for stamp in ("20261201T010000Z", "20261202T010000Z"):
        (domain_dir / stamp).mkdir(parents=True)
        (domain_dir / stamp / "B3SUMS").write_text("00  vda-web1.qcow2\n")
    (domain_dir / "20261203T010000Z.partial").mkdir()
    where = sets.Destination(str(tmp_path))

    assert sets.resolve("web1", where).stamp == "20261202T010000Z"
    assert sets.resolve("web1/20261201T010000Z", where).stamp == "20261201T010000Z"
    assert sets.resolve(str(domain_dir / "20261201T010000Z"), None).domain == "web1"
    with pytest.raises(sets.SetNotFound, match="no such complete set .* 20261201T010000Z, "):
        sets.resolve("web1/20261203T010000Z", where)
    with pytest.raises(sets.SetNotFound, match="an incomplete set"):
        sets.resolve(str(domain_dir / "20261203T010000Z.partial"), None)
    with pytest.raises(sets.SetNotFound, match="give the path of a set's folder, or --action"):
        sets.resolve("web1", None)
    remote = sets.destination_from(None, "backup@nas:/srv/kvm")
    assert remote is not None and remote.remote is not None
    assert (remote.remote.label, remote.directory) == ("backup@nas", "/srv/kvm")
