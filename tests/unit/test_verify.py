"""verify on sets made by hand: an old set with SHA256SUMS and no set.json."""

from __future__ import annotations

import hashlib

from backupninja_kvm import sets, verify

DEFINITION = """<domain type='qemu'><name>web1</name><memory>65536</memory>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='/srv/vm/data.raw'/><target dev='vdb' bus='virtio'/></disk>
</devices></domain>"""


def old_set(path):
    (path / "domain.xml").write_text(DEFINITION)
    (path / "vdb-data.raw").write_bytes(b"\1" * 8192)
    sums = "".join(
        f"{hashlib.sha256((path / n).read_bytes()).hexdigest()}  {n}\n"
        for n in ("domain.xml", "vdb-data.raw")
    )
    (path / "SHA256SUMS").write_text(sums)
    return sets.local_set(str(path))


def test_an_old_set_with_sha256sums_verifies(tmp_path):
    found = verify.verify_set(old_set(tmp_path))

    assert found.ok, found.problems
    assert found.summed == 2 and found.images == 1


def test_each_kind_of_damage_is_named_with_its_file(tmp_path):
    ref = old_set(tmp_path)
    (tmp_path / "vdb-data.raw").write_bytes(b"\1" * 8191 + b"\2")
    (tmp_path / "domain.xml").write_text("<domain><name>web1</name>")  # cut short

    found = verify.verify_set(ref)

    assert not found.ok
    assert any(
        p.startswith("vdb-data.raw: its content differs from SHA256SUMS") for p in found.problems
    )
    assert any(p.startswith("domain.xml: its content differs") for p in found.problems)
    assert any(p.startswith("domain.xml: not a domain definition") for p in found.problems)
    assert "DAMAGED" in found.summary()


def test_a_set_without_a_manifest_is_not_proven(tmp_path):
    ref = old_set(tmp_path)
    (tmp_path / "SHA256SUMS").unlink()
    (tmp_path / "set.json").write_text(
        '{"version": 1, "domain": "web1", "files": [{"name": "vdb-data.raw", "target": "vdb",'
        ' "role": "disk", "original_path": "/srv/vm/data.raw", "format": "raw",'
        ' "virtual_size": 8192}]}'
    )

    found = verify.verify_set(ref)

    assert found.problems == [
        "B3SUMS: missing: the set has no manifest, so its contents cannot be proven"
    ]


def test_machine_state_files_are_checked_by_their_size(tmp_path):
    ref = old_set(tmp_path)
    (tmp_path / "nvram-web1_VARS.fd").write_bytes(b"\0" * 4096)
    (tmp_path / "tpm-state.tar").write_bytes(b"\0" * 10240)
    sums = "".join(
        f"{hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()}  {n}\n"
        for n in ("domain.xml", "vdb-data.raw", "nvram-web1_VARS.fd", "tpm-state.tar")
    )
    (tmp_path / "SHA256SUMS").write_text(sums)
    (tmp_path / "set.json").write_text(
        '{"version": 1, "domain": "web1", "files": [{"name": "vdb-data.raw", "target": "vdb",'
        ' "role": "disk", "original_path": "/srv/vm/data.raw", "format": "raw",'
        ' "virtual_size": 8192}, {"name": "nvram-web1_VARS.fd", "target": "", "role": "nvram",'
        ' "original_path": "/nv/web1_VARS.fd", "format": "raw", "virtual_size": 4096},'
        ' {"name": "tpm-state.tar", "target": "", "role": "tpm", "original_path": "/swtpm/u",'
        ' "format": "tar", "virtual_size": 20480}]}'
    )

    found = verify.verify_set(ref)

    assert found.state_files == 1 and found.images == 1
    assert found.problems == [
        "tpm-state.tar: 10240 bytes, but the tpm file had 20480 (truncated or extended since "
        "the backup)"
    ]
