"""Every disk accounted for: how loudly a skipped disk is reported, which
layers of a chain go into the set, data files, overlays of symlinked images."""

from __future__ import annotations

import os

import pytest

from backupninja_kvm.disks import (
    INFO,
    WARNING,
    ChainPlan,
    Layer,
    overlay_path,
    parse_chain,
    parse_disks,
    plan_chain,
    select_disks,
)
from tests.unit.test_disks import SKIPPED_DISKS, STAMP, VDA, VDB, disk, domain_xml

# What holds none of the VM's data is an Info (hidden from the report mail);
# everything else a skipped disk holds is data that is not saved: a Warning.
EXPECTED_LEVELS = {
    "cdrom": INFO,
    "empty-cdrom": INFO,
    "floppy": WARNING,  # a writable floppy image is data
    "readonly": WARNING,
    "shareable": WARNING,
    "network-rbd": WARNING,
    "block-device": WARNING,
    "lun": WARNING,
    "vmdk": WARNING,
    "no-format": WARNING,
    "volume": WARNING,
    "empty-drive": INFO,
}

READONLY_FLOPPY = (
    "<disk type='file' device='floppy'><driver name='qemu' type='raw'/>"
    "<source file='/srv/boot.img'/><target dev='fda' bus='fdc'/><readonly/></disk>"
)


@pytest.mark.parametrize("case", SKIPPED_DISKS.keys())
def test_a_skipped_disk_with_data_is_a_warning_and_without_data_an_info(case):
    element, _reason = SKIPPED_DISKS[case]
    _, skipped = select_disks(parse_disks(domain_xml(VDA, element, VDB)))

    assert [s.level for s in skipped] == [EXPECTED_LEVELS[case]]


def test_every_skip_reason_has_an_expected_level():
    assert set(EXPECTED_LEVELS) == set(SKIPPED_DISKS)


def test_a_read_only_floppy_is_an_install_medium_not_data():
    _, skipped = select_disks(parse_disks(domain_xml(VDA, READONLY_FLOPPY)))

    assert [(s.disk.target, s.level) for s in skipped] == [("fda", INFO)]


def test_the_data_store_of_a_qcow2_is_read_from_the_xml():
    element = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/srv/vm/d.qcow2'><dataStore type='file'><format type='raw'/>"
        "<source file='/srv/vm/d.raw'/></dataStore></source>"
        "<target dev='vdb' bus='virtio'/></disk>"
    )
    (parsed,) = parse_disks(domain_xml(element))

    assert parsed.path == "/srv/vm/d.qcow2" and parsed.data_file == "/srv/vm/d.raw"


def test_the_chain_from_qemu_img_names_each_layer_its_backing_and_data_file():
    info = [
        {
            "filename": "/srv/vm/e.s1",
            "format": "qcow2",
            "backing-filename": "e.qcow2",
            "full-backing-filename": "/srv/vm/e.qcow2",
        },
        {
            "filename": "/srv/vm/e.qcow2",
            "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"data-file": "e.raw"}},
        },
    ]

    assert parse_chain(info) == [
        Layer("/srv/vm/e.s1", "qcow2", "e.qcow2", None),
        Layer("/srv/vm/e.qcow2", "qcow2", None, "/srv/vm/e.raw"),
    ]


TOP = Layer("/srv/vm/web1.s2", "qcow2", "/srv/vm/web1.s1")
SNAP = Layer("/srv/vm/web1.s1", "qcow2", "/srv/vm/web1.qcow2")
OWN_BASE = Layer("/srv/vm/web1.qcow2", "qcow2", "/srv/tmpl/debian.qcow2")
TEMPLATE = Layer("/srv/tmpl/debian.qcow2", "qcow2", "/srv/tmpl/debian.raw")
TEMPLATE_ROOT = Layer("/srv/tmpl/debian.raw", "raw")


@pytest.mark.parametrize(
    ("layers", "owners", "backing", "expected"),
    [
        pytest.param([TOP], {}, "chain", ChainPlan((TOP,)), id="no-backing-file"),
        pytest.param(
            [TOP, SNAP, OWN_BASE], {}, "chain", ChainPlan((TOP, SNAP, OWN_BASE)), id="own-chain"
        ),
        pytest.param(
            [TOP, SNAP, OWN_BASE],
            {},
            "top",
            ChainPlan((TOP,), own_left=(SNAP, OWN_BASE)),
            id="own-chain-top-only",
        ),
        pytest.param(
            [TOP, TEMPLATE, TEMPLATE_ROOT],
            {TEMPLATE.path: {"web2", "db1"}},
            "chain",
            ChainPlan((TOP,), shared=(TEMPLATE, TEMPLATE_ROOT), shared_with=("db1", "web2")),
            id="shared-template",
        ),
        pytest.param(
            [TOP, SNAP, OWN_BASE, TEMPLATE, TEMPLATE_ROOT],
            {TEMPLATE.path: {"web2"}, TEMPLATE_ROOT.path: {"web2"}},
            "chain",
            ChainPlan(
                (TOP, SNAP, OWN_BASE), shared=(TEMPLATE, TEMPLATE_ROOT), shared_with=("web2",)
            ),
            id="own-layers-above-a-shared-template",
        ),
        pytest.param(
            [TOP, SNAP, OWN_BASE, TEMPLATE],
            {TEMPLATE.path: {"web2"}},
            "top",
            ChainPlan((TOP,), own_left=(SNAP, OWN_BASE), shared=(TEMPLATE,), shared_with=("web2",)),
            id="top-only-above-a-shared-template",
        ),
        pytest.param(
            # another domain on a layer means every layer below it is its base too
            [TOP, SNAP, OWN_BASE],
            {SNAP.path: {"clone"}},
            "chain",
            ChainPlan((TOP,), shared=(SNAP, OWN_BASE), shared_with=("clone",)),
            id="a-middle-layer-shared",
        ),
    ],
)
def test_which_layers_of_a_chain_go_into_the_set(layers, owners, backing, expected):
    assert plan_chain(layers, owners, backing) == expected


def test_a_template_reached_through_a_symlink_is_still_shared(tmp_path):
    real = tmp_path / "debian.qcow2"
    real.write_bytes(b"")
    link = tmp_path / "link.qcow2"
    link.symlink_to(real)
    layers = [TOP, Layer(str(link), "qcow2")]

    plan = plan_chain(layers, {str(real): {"web2"}}, "chain")

    assert plan.copied == (TOP,) and plan.shared_with == ("web2",)


def test_the_overlay_of_a_symlinked_image_goes_beside_the_real_file(tmp_path):
    real_dir = tmp_path / "big"
    real_dir.mkdir()
    (real_dir / "web1-root.qcow2").write_bytes(b"")
    links = tmp_path / "images"
    links.mkdir()
    (links / "web1.qcow2").symlink_to(real_dir / "web1-root.qcow2")

    path = overlay_path(disk(str(links / "web1.qcow2")), STAMP)

    assert os.path.dirname(path) == str(real_dir)
    assert os.path.basename(path) == f"web1-root.bnkvm-{STAMP}.qcow2"
