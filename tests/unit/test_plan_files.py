"""What goes into a set for one disk, and how the copies are made to refer
to each other (pure: a chain plan in, file names and qemu-img steps out)."""

from __future__ import annotations

from backupninja_kvm.disks import INFO, WARNING, ChainPlan, Disk, Layer
from backupninja_kvm.plan import Plan, SetFile, _plan_files

DISK = Disk("vda", "disk", "file", "/srv/vm/web1.s2", "qcow2")
TOP = Layer("/srv/vm/web1.s2", "qcow2", "/srv/vm/web1.s1")
SNAP = Layer("/srv/vm/web1.s1", "qcow2", "web1.qcow2")
BASE = Layer("/srv/vm/web1.qcow2", "qcow2")
TEMPLATE = Layer("/srv/tmpl/debian.qcow2", "qcow2")


def plan_for(chain: ChainPlan, backing: str = "chain") -> Plan:
    plan = Plan("web1", True, [DISK], [])
    _plan_files(plan, DISK, chain, backing)
    return plan


def test_a_whole_chain_is_copied_and_each_copy_rebased_onto_the_next_by_name():
    plan = plan_for(ChainPlan((TOP, SNAP, BASE)))

    assert plan.files == [
        SetFile("vda", "/srv/vm/web1.s2", "vda-web1.s2"),
        SetFile("vda", "/srv/vm/web1.s1", "vda-web1.s1"),
        SetFile("vda", "/srv/vm/web1.qcow2", "vda-web1.qcow2"),
    ]
    assert [fix.argv for fix in plan.fixes] == [
        ("rebase", "-u", "-f", "qcow2", "-b", "vda-web1.s1", "-F", "qcow2", "vda-web1.s2"),
        ("rebase", "-u", "-f", "qcow2", "-b", "vda-web1.qcow2", "-F", "qcow2", "vda-web1.s1"),
    ]
    assert [level for level, _ in plan.notes] == [INFO]


def test_a_layer_left_out_with_backing_top_is_a_warning_naming_it():
    plan = plan_for(ChainPlan((TOP,), own_left=(SNAP, BASE)), "top")

    assert [f.name for f in plan.files] == ["vda-web1.s2"]
    assert plan.fixes == []  # the top names its backing file by an absolute path already
    ((level, text),) = plan.notes
    assert level == WARNING and SNAP.path in text and BASE.path in text
    assert "backing = chain" in text


def test_a_relative_backing_name_below_the_set_is_made_absolute_on_the_copy():
    plan = plan_for(ChainPlan((TOP, SNAP), shared=(BASE,), shared_with=("web2",)))

    # web1.s1 names "web1.qcow2" relative to its folder: the copy names the file itself.
    assert plan.fixes[-1].argv == (
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "/srv/vm/web1.qcow2",
        "-F",
        "qcow2",
        "vda-web1.s1",
    )
    assert any(level == INFO and "web2" in text for level, text in plan.notes)


def test_a_data_file_is_copied_and_pointed_at_before_any_rebase_of_its_image():
    with_data = Layer("/srv/vm/web1.s1", "qcow2", "/srv/vm/web1.qcow2", "/srv/vm/web1.raw")
    plan = plan_for(ChainPlan((TOP, with_data, BASE)))

    assert SetFile("vda", "/srv/vm/web1.raw", "vda-web1.raw") in plan.files
    images = [(fix.image, fix.argv[0]) for fix in plan.fixes]
    # Until its data file is the copy's, qemu-img would open the domain's own.
    assert images.index(("vda-web1.s1", "amend")) < images.index(("vda-web1.s1", "rebase"))
    amend = next(fix.argv for fix in plan.fixes if fix.argv[0] == "amend")
    assert "data-file.filename=vda-web1.raw" in amend[2] and amend[2].endswith(",backing=")


def test_layers_with_the_same_file_name_get_distinct_names_in_the_set():
    other = Layer("/srv/other/web1.s2", "qcow2")
    plan = plan_for(ChainPlan((TOP, other)))

    assert [f.name for f in plan.files] == ["vda-web1.s2", "vda-2-web1.s2"]
