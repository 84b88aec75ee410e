"""The machine's state besides its disks: which files a definition names,
their names in a set, the TPM state's tar, and where a restore puts each."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from backupninja_kvm import machine, restore, setinfo
from backupninja_kvm.definition import point_os_files
from backupninja_kvm.machine import StateFile

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UEFI_TPM = """<domain type='kvm'><name>web1</name><uuid>{uuid}</uuid>
<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
</os><devices>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
</devices></domain>"""
DIRECT_KERNEL = """<domain type='qemu'><name>k1</name><os><type>hvm</type>
<kernel> /srv/boot/vmlinuz </kernel><initrd>/srv/boot/initrd.img</initrd>
<dtb>/srv/boot/board.dtb</dtb><cmdline>console=ttyS0</cmdline></os>
<devices><tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>
</backend></tpm></devices></domain>"""


def test_a_uefi_domain_with_an_emulated_tpm_names_its_variables_and_tpm_folder():
    assert machine.state_files(UEFI_TPM.format(uuid=UUID), UUID) == [
        StateFile("nvram", "/var/lib/libvirt/qemu/nvram/web1_VARS.fd"),
        StateFile("tpm", f"/var/lib/libvirt/swtpm/{UUID}"),
    ]


def test_the_source_form_of_nvram_is_read_and_a_network_one_is_not_ours():
    source_form = UEFI_TPM.replace(
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd"
        "</nvram>",
        "<nvram type='file'><source file='/srv/nvram/web1.fd'/></nvram>",
    )
    assert machine.state_files(source_form, UUID)[0] == StateFile("nvram", "/srv/nvram/web1.fd")
    network = UEFI_TPM.replace(
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd"
        "</nvram>",
        "<nvram type='network'><source protocol='iscsi' name='x'/></nvram>",
    )
    assert [f.role for f in machine.state_files(network, UUID)] == ["tpm"]


def test_direct_kernel_boot_files_are_named_and_a_passthrough_tpm_has_no_state_of_ours():
    assert machine.state_files(DIRECT_KERNEL, UUID) == [
        StateFile("kernel", "/srv/boot/vmlinuz"),
        StateFile("initrd", "/srv/boot/initrd.img"),
        StateFile("dtb", "/srv/boot/board.dtb"),
    ]


def test_a_domain_without_machine_state_and_what_is_not_xml():
    assert (
        machine.state_files("<domain><name>a</name><os><type>hvm</type></os></domain>", UUID) == []
    )
    with pytest.raises(machine.MachineStateError, match="not XML"):
        machine.state_files("<domain", UUID)


def test_names_in_the_set_never_look_like_a_disks():
    assert machine.set_name(StateFile("nvram", "/x/web1_VARS.fd")) == "nvram-web1_VARS.fd"
    assert machine.set_name(StateFile("tpm", f"/var/lib/libvirt/swtpm/{UUID}")) == "tpm-state.tar"
    assert machine.set_name(StateFile("kernel", "/boot/vmlinuz-6.1")) == "kernel-vmlinuz-6.1"


def swtpm_folder(root) -> str:
    folder = root / UUID
    (folder / "tpm2").mkdir(parents=True)
    (folder / "tpm2" / "tpm2-00.permall").write_bytes(b"\x01permanent" * 100)
    (folder / "tpm2" / "TMP2-00.permall").write_bytes(b"half written")
    os.chmod(folder / "tpm2", 0o700)
    os.chmod(folder / "tpm2" / "tpm2-00.permall", 0o600)
    return str(folder)


def test_the_tpm_state_round_trips_through_its_tar_modes_kept_temporaries_left_out(tmp_path):
    folder = swtpm_folder(tmp_path / "swtpm")
    packed = str(tmp_path / "tpm-state.tar")
    machine.pack_tpm(folder, packed)
    into = tmp_path / "restored"
    into.mkdir()

    machine.unpack_tpm(packed, str(into))

    permall = into / "tpm2" / "tpm2-00.permall"
    assert permall.read_bytes() == b"\x01permanent" * 100
    assert os.stat(permall).st_mode & 0o777 == 0o600
    assert os.stat(into / "tpm2").st_mode & 0o777 == 0o700
    assert sorted(os.listdir(into / "tpm2")) == ["tpm2-00.permall"]


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../outside"),
        tarfile.TarInfo("/etc/passwd"),
        tarfile.TarInfo("tpm2/link"),
    ],
)
def test_a_tar_with_anything_but_files_and_folders_inside_is_refused(tmp_path, member):
    packed = tmp_path / "tpm-state.tar"
    with tarfile.open(packed, "w") as tar:
        if member.name == "tpm2/link":
            member.type = tarfile.SYMTYPE
            member.linkname = "/etc/shadow"
            tar.addfile(member)
        else:
            member.size = 3
            tar.addfile(member, io.BytesIO(b"bad"))
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(machine.MachineStateError, match="not restored"):
        machine.unpack_tpm(str(packed), str(into))
    assert os.listdir(into) == []


def state_set() -> setinfo.SetInfo:
    return setinfo.SetInfo(
        "web1",
        UUID,
        "2026-12-02T01:00:00Z",
        "crash-consistent",
        (
            setinfo.SetImage("vda-web1.qcow2", "vda", "disk", "/srv/vm/web1.qcow2", "qcow2", 10),
            setinfo.SetImage(
                "nvram-web1_VARS.fd", "", "nvram", "/var/lib/nv/web1_VARS.fd", "raw", 540672
            ),
            setinfo.SetImage(
                "tpm-state.tar", "", "tpm", f"/var/lib/libvirt/swtpm/{UUID}", "tar", 1
            ),
            setinfo.SetImage("kernel-vmlinuz", "", "kernel", "/srv/boot/vmlinuz", "file", 5),
        ),
    )


def test_set_json_holds_machine_state_and_refuses_two_of_a_role():
    info = state_set()
    assert setinfo.SetInfo.from_json(info.to_json(), "set.json") == info
    assert [f.role for f in info.images()] == ["disk"]
    assert [f.role for f in info.state()] == ["nvram", "tpm", "kernel"]
    data = json.loads(info.to_json())
    data["files"].append(dict(data["files"][1], name="nvram-other.fd"))
    with pytest.raises(setinfo.SetInfoError, match="two files have the role 'nvram'"):
        setinfo.SetInfo.from_json(json.dumps(data), "set.json")
    data = json.loads(info.to_json())
    data["files"][1]["role"] = "bios"
    with pytest.raises(setinfo.SetInfoError, match="role 'bios' is not one of"):
        setinfo.SetInfo.from_json(json.dumps(data), "set.json")


def test_in_place_every_file_goes_back_to_its_path_the_tpm_to_its_uuid_folder():
    assert restore.plan_paths(state_set(), restore.Options()) == {
        "vda-web1.qcow2": "/srv/vm/web1.qcow2",
        "nvram-web1_VARS.fd": "/var/lib/nv/web1_VARS.fd",
        "tpm-state.tar": f"/var/lib/libvirt/swtpm/{UUID}",
        "kernel-vmlinuz": "/srv/boot/vmlinuz",
    }


def test_in_place_into_another_folder_the_tpm_still_goes_to_its_uuid_folder():
    paths = restore.plan_paths(state_set(), restore.Options(to="/restore"))
    assert paths["nvram-web1_VARS.fd"] == "/restore/web1_VARS.fd"
    assert paths["kernel-vmlinuz"] == "/restore/vmlinuz"
    assert paths["tpm-state.tar"] == f"/var/lib/libvirt/swtpm/{UUID}"


def test_a_copy_gets_its_own_variables_where_its_definition_points_and_shares_the_kernel():
    paths = restore.plan_paths(state_set(), restore.Options(new_name="web2"))
    assert paths["vda-web1.qcow2"] == "/srv/vm/web2-vda-web1.qcow2"
    assert paths["nvram-web1_VARS.fd"] == "/srv/vm/web2_VARS.fd"  # copy_definition's files_dir
    assert paths["tpm-state.tar"] == "/var/lib/libvirt/swtpm/UUID-OF-web2"  # known once defined
    assert "kernel-vmlinuz" not in paths


def test_a_restore_into_another_folder_points_the_os_files_there():
    xml = point_os_files(
        UEFI_TPM.format(uuid=UUID).replace("</nvram>", "</nvram><kernel>/boot/k</kernel>"),
        {"nvram": "/restore/web1_VARS.fd", "kernel": "/restore/k", "dtb": "/restore/x.dtb"},
    )
    assert machine.state_files(xml, UUID)[0] == StateFile("nvram", "/restore/web1_VARS.fd")
    assert "<kernel>/restore/k</kernel>" in xml
    assert "dtb" not in xml  # not added where the definition had none
    assert "OVMF_VARS_4M.fd" in xml  # the template stays


def test_the_plan_takes_what_exists_and_says_what_does_not(tmp_path):
    from backupninja_kvm.plan import Plan, _plan_state

    nvram = tmp_path / "web1_VARS.fd"
    nvram.write_bytes(b"\0" * 4096)
    xml = UEFI_TPM.format(uuid=UUID).replace("/var/lib/libvirt/qemu/nvram/web1_VARS.fd", str(nvram))
    xml = xml.replace("</nvram>", "</nvram><kernel>/nonexistent/vmlinuz</kernel>")
    plan = Plan("web1", True, [], [])

    _plan_state(plan, xml, UUID, str(tmp_path / "swtpm"))

    assert [(f.role, f.name, f.format, f.virtual_size) for f in plan.state] == [
        ("nvram", "nvram-web1_VARS.fd", "raw", 4096)
    ]
    assert [level for level, _ in plan.notes] == ["info", "warning"]
    assert "its TPM has no state yet" in plan.notes[0][1]
    assert "/nonexistent/vmlinuz is not a file" in plan.notes[1][1]
    assert plan.files == []  # a ride-along view exposes only the disks' files
