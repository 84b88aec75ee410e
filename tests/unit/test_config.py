"""The .kvm action file: defaults, every problem at once with its line, the example."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from backupninja_kvm import config
from backupninja_kvm.errors import ConfigError, HypervisorError

EXAMPLE = Path(__file__).parents[2] / "examples" / "example.kvm"


def write(tmp_path: Path, text: str, name: str = "10-vms.kvm", domains: str | None = "all") -> str:
    """Write an action file (leading indentation removed) and return its path.

    ``domains`` is required: a file without a [source] section gets one with
    ``domains = DOMAINS`` at its end (line numbers above stay as written),
    unless *domains* is None.
    """
    text = textwrap.dedent(text).lstrip("\n")
    if domains is not None and "[source]" not in text:
        text += f"[source]\ndomains = {domains}\n"
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems_of(path: str, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path, **kwargs)
    assert info.value.path == path
    return info.value.problems


def test_a_file_with_domains_and_directory_gets_the_documented_defaults(tmp_path):
    path = write(tmp_path, f"[source]\ndomains = all\n[dest]\ndirectory = {tmp_path}\n")

    settings = config.load(path)

    assert settings.path == path
    assert settings.stage == "full"
    assert settings.merge == "commit"
    assert settings.merge_timeout == 600
    assert settings.bandwidth == 0
    assert settings.uri == "qemu:///system"
    assert settings.domains == ()  # all domains
    assert settings.exclude == ()
    assert settings.overlaydir == ""  # next to each image
    assert settings.dest == "local"
    assert settings.directory == str(tmp_path)
    assert settings.keep == 7
    assert (settings.quiesce, settings.quiesce_timeout) == ("auto", 60)


def test_every_key_can_be_set(tmp_path):
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    path = write(
        tmp_path,
        f"""
        [general]
        stage = full
        merge = pull
        merge_timeout = 30
        bandwidth = 50
        quiesce = yes
        quiesce_timeout = 30
        [source]
        uri = qemu+unix:///session
        domains = web1, db
        exclude = test-*
        overlaydir = {overlays}
        [dest]
        dest = local
        directory = {tmp_path}
        keep = 2
        """,
    )

    settings = config.load(path)

    assert (settings.merge, settings.merge_timeout, settings.bandwidth) == ("pull", 30, 50)
    assert (settings.quiesce, settings.quiesce_timeout) == ("yes", 30)
    assert settings.uri == "qemu+unix:///session"
    assert settings.domains == ("web1", "db")
    assert settings.exclude == ("test-*",)
    assert settings.overlaydir == str(overlays)
    assert settings.keep == 2


def test_repeated_when_lines_belong_to_backupninja_and_are_ignored(tmp_path):
    path = write(
        tmp_path,
        f"""
        when = everyday at 01:00
        when = sundays at 03:00
        [general]
        merge = pull
        [dest]
        directory = {tmp_path}
        """,
    )

    assert config.load(path).merge == "pull"


def test_line_numbers_stay_true_after_repeated_when_lines(tmp_path):
    path = write(
        tmp_path,
        f"""
        when = everyday at 01:00
        when = sundays at 03:00
        when = mondays at 04:00
        [general]
        when = tuesdays at 05:00
        bandwidht = 3
        [dest]
        directory = {tmp_path}
        """,
    )

    assert problems_of(path) == [
        f"{path} line 6: [general] bandwidht: unknown key (did you mean bandwidth?)"
    ]


def test_settings_name_the_line_of_a_key_for_later_messages(tmp_path):
    path = write(tmp_path, f"when = everyday\n\n[dest]\ndirectory = {tmp_path}\nkeep = 3\n")

    settings = config.load(path)

    assert settings.where("dest", "keep") == f"{path} line 5: [dest] keep"
    assert settings.where("source", "uri") == f"{path}: [source] uri"  # default, no line


def test_every_problem_is_reported_at_once_sorted_by_line(tmp_path):
    path = write(
        tmp_path,
        """
        when = everyday at 01:00
        [general]
        merge = comit
        merge_timout = 5
        bandwidth = fast
        [source]
        overlaydir = relative/overlays
        domains = all
        [dest]
        keep = 0
        directory = /nonexistent/x
        [extra]
        colour = blue
        """,
    )

    problems = problems_of(path)

    expected = [
        (3, "[general] merge", 'the value "comit" is unacceptable (one of: commit, pull)'),
        (4, "[general] merge_timout", "unknown key (did you mean merge_timeout?)"),
        (5, "[general] bandwidth", 'the value "fast" is of the wrong type'),
        (7, "[source] overlaydir", "'relative/overlays' is not an absolute path"),
        (10, "[dest] keep", 'the value "0" is too small (at least 1)'),
        (11, "[dest] directory", "directory /nonexistent/x does not exist"),
        (12, "unknown section [extra]", ""),
    ]
    assert len(problems) == len(expected), problems
    for problem, (line, place, reason) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path} line {line}: {place}"), problem
        assert problem.endswith(reason), problem


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(
            "[general]\nmerge_timout = 5",
            "line 2: [general] merge_timout: unknown key (did you mean merge_timeout?)",
            id="misspelt-key",
        ),
        pytest.param(
            "[general]\nquiesce = always",
            'line 2: [general] quiesce: the value "always" is unacceptable (one of: auto, yes, no)',
            id="quiesce-value",
        ),
        pytest.param(
            "[general]\nbandwidth = fast",
            'line 2: [general] bandwidth: the value "fast" is of the wrong type',
            id="wrong-type",
        ),
        pytest.param(
            "[general]\nmerge_timeout = 0",
            'line 2: [general] merge_timeout: the value "0" is too small (at least 1)',
            id="timeout-zero",
        ),
        pytest.param(
            "[general]\nbandwidth = -1",
            'line 2: [general] bandwidth: the value "-1" is too small (at least 0)',
            id="negative-bandwidth",
        ),
        pytest.param(
            "[general]\nmerge = comit",
            'line 2: [general] merge: the value "comit" is unacceptable (one of: commit, pull)',
            id="option-not-allowed",
        ),
        pytest.param(
            "[general]\nstage = frozen",
            'line 2: [general] stage: the value "frozen" is unacceptable (one of: full, freeze, '
            "thaw)",
            id="stage-not-allowed",
        ),
        pytest.param(
            "[dest]\ndest = s3",
            'line 2: [dest] dest: the value "s3" is unacceptable (one of: local, remote)',
            id="dest-not-allowed",
        ),
        pytest.param(
            "[sorce]\nuri = qemu:///system",
            "line 1: unknown section [sorce] (did you mean source?)",
            id="misspelt-section",
        ),
        pytest.param(
            "[source]\noverlaydir = /nonexistent/overlays\ndomains = all",
            "line 2: [source] overlaydir: directory /nonexistent/overlays does not exist",
            id="missing-overlaydir",
        ),
    ],
)
def test_a_single_problem_names_file_line_and_key(tmp_path, lines, expected):
    dest = "" if "[dest]" in lines else "\n[dest]"
    path = write(tmp_path, f"{lines}{dest}\ndirectory = {tmp_path}\n")

    assert problems_of(path) == [f"{path} {expected}"]


@pytest.mark.parametrize(
    ("directory", "reason"),
    [
        ("/nonexistent/x", "directory /nonexistent/x does not exist"),
        ("backups/kvm", "'backups/kvm' is not an absolute path"),
    ],
)
def test_the_destination_directory_must_be_an_existing_absolute_path(tmp_path, directory, reason):
    path = write(tmp_path, f"[dest]\nkeep = 3\ndirectory = {directory}\n")

    assert problems_of(path) == [f"{path} line 3: [dest] directory: {reason}"]


def test_without_a_directory_the_default_must_exist(tmp_path):
    path = write(tmp_path, "[general]\nmerge = commit\n")

    assert problems_of(path) == [
        f"{path}: [dest] directory: directory /var/backups/kvm does not exist"
    ]


def test_an_unreadable_action_file_is_a_config_error(tmp_path):
    path = str(tmp_path / "missing.kvm")

    problems = problems_of(path)

    assert problems == [f"{path}: cannot read the action file: No such file or directory"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("[general]\nmerge = pull\n[dest\n", 3, id="unclosed-section"),
        pytest.param("[general\nmerge = pull\n", 1, id="unclosed-first-section"),
        pytest.param('[general]\nmerge = "pull\n', 2, id="unterminated-quote"),
        pytest.param("[dest]\nkeep = 2\nkeep = 3\n", 3, id="duplicate-key"),
        pytest.param("[dest]\nkeep = 2\n[dest]\n", 3, id="duplicate-section"),
    ],
)
def test_a_syntax_error_is_a_config_error_with_its_line(tmp_path, text, line):
    path = write(tmp_path, text)

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path} line {line}: ")
    assert "Traceback" not in problems[0]


@pytest.mark.parametrize(
    ("value", "domains"),
    [
        ("a, b", ("a", "b")),
        ("a,b", ("a", "b")),
        ("  web1 ,  db  ", ("web1", "db")),
        ("a, b,", ("a", "b")),
        ("single", ("single",)),
        ("all", ()),
    ],
)
def test_domains_are_a_comma_separated_list_and_all_means_every_domain(tmp_path, value, domains):
    path = write(tmp_path, f"[source]\ndomains = {value}\n[dest]\ndirectory = {tmp_path}\n")

    assert config.load(path).domains == domains


@pytest.mark.parametrize(
    ("name", "excluded"),
    [
        ("web1", True),
        ("web", True),
        ("webserver", True),
        ("test-a", True),
        ("test-ab", False),
        ("db", False),
        ("Web1", False),  # patterns are case-sensitive, like domain names
        ("scratch", True),
        ("scratch2", False),
    ],
)
def test_exclude_takes_names_and_shell_patterns(tmp_path, name, excluded):
    path = write(
        tmp_path,
        f"[source]\ndomains = all\nexclude = web*, test-?, scratch\n"
        f"[dest]\ndirectory = {tmp_path}\n",
    )

    assert config.load(path).is_excluded(name) is excluded


def test_a_name_libvirt_does_not_know_is_left_to_the_run_not_a_config_problem(tmp_path):
    # A decommissioned VM must not stop the backup of the others: `run` makes
    # it an Error of its own (tests/e2e/test_input_edges.py).
    path = write(
        tmp_path,
        f"""
        [source]
        uri = qemu:///system
        domains = a, zz
        [dest]
        directory = {tmp_path}
        """,
    )

    assert config.load(path, list_domains=lambda uri: ["a"]).domains == ("a", "zz")


def test_the_domain_list_is_asked_of_the_configured_uri(tmp_path):
    path = write(
        tmp_path,
        f"[source]\nuri = qemu:///session\ndomains = a\n[dest]\ndirectory = {tmp_path}\n",
    )
    asked = []

    config.load(path, list_domains=lambda uri: asked.append(uri) or ["a"])

    assert asked == ["qemu:///session"]


def test_domains_all_needs_no_known_name(tmp_path):
    path = write(tmp_path, f"[source]\ndomains = all\n[dest]\ndirectory = {tmp_path}\n")

    assert config.load(path, list_domains=lambda uri: []).domains == ()


def test_an_unreachable_hypervisor_is_reported_on_the_uri_line(tmp_path):
    path = write(
        tmp_path,
        f"""
        [source]
        domains = a
        uri = qemu:///nowhere
        [dest]
        directory = {tmp_path}
        """,
    )

    def list_domains(uri):
        raise HypervisorError("cannot connect")

    assert problems_of(path, list_domains=list_domains) == [
        f"{path} line 3: [source] uri: cannot connect"
    ]


def test_an_unknown_domain_is_not_among_the_problems_of_a_broken_file(tmp_path):
    path = write(
        tmp_path,
        """
        [source]
        domains = zz
        [dest]
        keep = 0
        directory = /nonexistent/x
        """,
    )

    problems = problems_of(path, list_domains=lambda uri: ["a"])

    assert [p.split(": ")[1] for p in problems] == ["[dest] keep", "[dest] directory"]


def test_the_example_file_is_the_rendered_schema():
    assert EXAMPLE.read_text() == config.render_example(), (
        "examples/example.kvm drifted from the schema: "
        "regenerate it with `backupninja-kvm example-config`"
    )


def test_the_rendered_example_documents_every_key():
    example = config.render_example().splitlines()
    spec = config._spec()

    for section in spec.sections:
        assert f"[{section}]" in example
        for key in spec[section].scalars:
            assert any(line.split("=")[0].strip() == key for line in example), key


def test_the_rendered_example_loads_once_its_directory_exists(tmp_path):
    example = config.render_example()
    assert "directory = /var/backups/kvm" in example
    text = example.replace("directory = /var/backups/kvm", f"directory = {tmp_path}")
    path = write(tmp_path, text)

    settings = config.load(path)

    assert (settings.merge, settings.keep, settings.domains) == ("commit", 7, ())


@pytest.mark.parametrize(
    ("key", "rest"),
    [("dest", "[general]\nmerge = pull\n"), ("general", "[dest]\ndirectory = /tmp\n")],
    ids=["dest", "general"],
)
def test_a_section_name_used_as_a_key_is_a_config_error(tmp_path, key, rest):
    path = write(tmp_path, f"{key} = local\n{rest}")

    problems = problems_of(path)

    assert any("line 1" in p and key in p for p in problems)


def test_all_is_never_taken_for_a_domain_name(tmp_path):
    path = write(tmp_path, f"[source]\ndomains = all, web\n[dest]\ndirectory = {tmp_path}\n")

    try:
        settings = config.load(path, list_domains=lambda uri: ["web", "db"])
    except ConfigError:
        return  # refusing the mix is fine too
    assert "all" not in settings.domains


def test_a_key_above_every_section_is_named_without_an_empty_section(tmp_path):
    path = write(tmp_path, f"keep = 3\n[dest]\ndirectory = {tmp_path}\n")

    (problem,) = problems_of(path)

    assert problem.startswith(f"{path} line 1: ")
    assert "[]" not in problem


@pytest.mark.parametrize(
    ("line", "maximum"),
    [
        pytest.param("[general]\nbandwidth = 18446744073709551616", 1048576, id="bandwidth-64bit"),
        pytest.param("[general]\nbandwidth = 8796093022207", 1048576, id="bandwidth-libvirt"),
        pytest.param("[general]\nmerge_timeout = 9223372036854775808", 604800, id="merge-timeout"),
        pytest.param("[general]\nquiesce_timeout = 2147483648", 3600, id="quiesce-timeout"),
        pytest.param(
            "[source]\noverlay_reserve = 17592186044416\ndomains = all", 16777216, id="rsv"
        ),
        pytest.param("[dest]\nkeep = 1000000000", 100000, id="keep"),
        pytest.param("[dest]\nport = 65536", 65535, id="port"),
    ],
)
def test_every_number_has_an_upper_bound_that_libvirt_and_the_os_accept(tmp_path, line, maximum):
    key = line.splitlines()[1].split(" =")[0]
    value = line.splitlines()[1].split("= ")[1]
    dest = "" if "[dest]" in line else "\n[dest]"
    path = write(tmp_path, f"{line}{dest}\ndirectory = {tmp_path}\n")

    (problem,) = problems_of(path)

    section = line.splitlines()[0]
    assert problem == (
        f'{path} line 2: {section} {key}: the value "{value}" is too big (at most {maximum})'
    )


def test_the_upper_bounds_themselves_are_accepted(tmp_path):
    path = write(
        tmp_path,
        f"""
        [general]
        bandwidth = 1048576
        merge_timeout = 604800
        quiesce_timeout = 3600
        [dest]
        directory = {tmp_path}
        keep = 100000
        """,
    )

    settings = config.load(path)

    assert (settings.bandwidth, settings.merge_timeout, settings.quiesce_timeout) == (
        1048576,
        604800,
        3600,
    )
    assert settings.bandwidth < 8796093022207  # libvirt refuses a bandwidth from there on


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            b"# sauvegarde \xe9t\xe9\n[source]\ndomains = all\n",
            "not UTF-8 text (byte 0xe9 at line 1); save it as UTF-8",
            id="latin1-comment",
        ),
        pytest.param(
            b"[source]\ndomains = all\n# caf\xe9\n",
            "not UTF-8 text (byte 0xe9 at line 3); save it as UTF-8",
            id="latin1-line-3",
        ),
        pytest.param(
            b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe\n\x00\x00",
            "not UTF-8 text (byte 0xff at line 1); save it as UTF-8",
            id="binary",
        ),
        pytest.param(
            b"[source]\ndomains = all\n\x00\x00\x00\n",
            "not a text file (a NUL byte at line 3)",
            id="nul-bytes",
        ),
        pytest.param(
            b"\xef\xbb\xbf[source]\ndomains = all\n",
            "starts with a byte order mark (BOM), which backupninja's parser does not expect: "
            "save it as UTF-8 without BOM",
            id="bom",
        ),
    ],
)
def test_a_file_that_is_not_utf8_text_is_a_config_error_naming_the_line(tmp_path, data, expected):
    path = tmp_path / "40-latin1.kvm"
    path.write_bytes(data)

    assert problems_of(str(path)) == [f"{path}: {expected}"]


WRITE_ALL = "write domains = all to back up every domain, or list their names (comma-separated)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[source]\ndomains =\n", f"line 2: [source] domains: empty: {WRITE_ALL}", id="empty"
        ),
        pytest.param(
            "[source]\ndomains = ,\n", f"line 2: [source] domains: empty: {WRITE_ALL}", id="comma"
        ),
        pytest.param(
            "[source]\nexclude = web*\n", f"[source] domains: missing: {WRITE_ALL}", id="no-key"
        ),
        pytest.param(
            "when = everyday\n", f"[source] domains: missing: {WRITE_ALL}", id="only-when"
        ),
        pytest.param("", f"[source] domains: missing: {WRITE_ALL}", id="empty-file"),
    ],
)
def test_no_domain_selected_by_omission_the_administrator_writes_all(tmp_path, text, expected):
    path = write(tmp_path, f"{text}[dest]\ndirectory = {tmp_path}\n", domains=None)

    assert problems_of(path) == [
        f"{path} {expected}" if expected.startswith("line") else f"{path}: {expected}"
    ]


def test_domains_all_and_names_together_are_refused(tmp_path):
    path = write(tmp_path, f"[source]\ndomains = all, web\n[dest]\ndirectory = {tmp_path}\n")

    assert problems_of(path) == [
        f"{path} line 2: [source] domains: use either all or a list of names, not both"
    ]


def test_duplicate_names_are_kept_for_the_run_to_report_once(tmp_path):
    path = write(tmp_path, f"[source]\ndomains = web, db, web\n[dest]\ndirectory = {tmp_path}\n")

    assert config.load(path).domains == ("web", "db", "web")


def test_a_duplicate_key_is_named_with_the_line_it_was_first_set_on(tmp_path):
    path = write(
        tmp_path, f"[general]\nmerge = pull\nmerge = commit\n[dest]\ndirectory = {tmp_path}\n"
    )

    assert problems_of(path) == [
        f"{path} line 3: duplicate key merge (first set on line 2; lists are comma-separated)"
    ]


def test_a_duplicate_section_is_named(tmp_path):
    path = write(tmp_path, f"[dest]\ndirectory = {tmp_path}\n[dest]\nkeep = 2\n")

    assert problems_of(path) == [f"{path} line 3: duplicate section [dest]"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[source]\nkeep = 3\ndomains = all\n",
            "line 2: [source] keep: unknown key (it belongs in [dest])",
            id="keep-in-source",
        ),
        pytest.param(
            "[dest]\nmerge = pull\n[source]\ndomains = all\n",
            "line 2: [dest] merge: unknown key (it belongs in [general])",
            id="merge-in-dest",
        ),
        pytest.param(
            "uri = qemu:///system\n[source]\ndomains = all\n",
            "line 1: uri: unknown key (it belongs in [source])",
            id="above-every-section",
        ),
    ],
)
def test_a_key_in_the_wrong_section_names_its_section(tmp_path, text, expected):
    dest = "" if "[dest]" in text else "[dest]\n"
    path = write(tmp_path, f"{text}{dest}directory = {tmp_path}\n")

    problems = problems_of(path)

    assert f"{path} {expected}" in problems, problems


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("qemu+ssh://other/system", "transport ssh"),
        ("qemu+ssh://root@other:2222/system", "transport ssh"),
        ("qemu+tcp://other/system", "transport tcp"),
        ("qemu+tls://other/system", "transport tls"),
        ("qemu+libssh2://other/system", "transport libssh2"),
        ("qemu+ext:///system?command=/tmp/x", "transport ext"),
        ("qemu://other/system", "host other"),
        ("qemu+unix://other/system", "host other"),
        ("other", "not a URI of the form driver:///path"),
        ("", "not a URI of the form driver:///path"),
    ],
)
def test_a_remote_libvirt_uri_is_refused_since_the_images_are_read_locally(tmp_path, uri, reason):
    path = write(tmp_path, f"[source]\nuri = {uri}\ndomains = a\n[dest]\ndirectory = {tmp_path}\n")
    asked = []

    problems = problems_of(path, list_domains=lambda u: asked.append(u) or ["a"])

    assert problems == [
        f"{path} line 2: [source] uri: {uri!r} is not a local libvirt connection ({reason}); "
        "the images are read from this host's files, so run the backup on the VMs' host with "
        "a local URI such as qemu:///system"
    ]
    assert asked == []  # never connected (an ssh URI would run ssh)


@pytest.mark.parametrize(
    "uri", ["qemu:///system", "qemu:///session", "qemu+unix:///system", "test:///default"]
)
def test_a_local_libvirt_uri_is_accepted(tmp_path, uri):
    path = write(tmp_path, f"[source]\nuri = {uri}\ndomains = a\n[dest]\ndirectory = {tmp_path}\n")

    assert config.load(path).uri == uri


def stat_of(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "group", "admingroup", "refused"),
    [
        pytest.param(0o100600, 0, 0, "root", "root", [], id="root-600"),
        pytest.param(0o100640, 0, 0, "root", "root", [], id="group-root"),
        pytest.param(0o100666, 0, 0, "root", "root", ["every user"], id="666"),
        pytest.param(0o100604, 0, 0, "root", "root", ["every user"], id="world-readable"),
        pytest.param(0o100600, 65534, 0, "root", "root", ["uid 65534"], id="owner-nobody"),
        pytest.param(0o100660, 0, 100, "users", "root", ["group users"], id="group-users"),
        pytest.param(0o100660, 0, 100, "users", "users", [], id="admingroup-name"),
        pytest.param(0o100660, 0, 100, "users", "100", [], id="admingroup-gid"),
        pytest.param(
            0o100666, 65534, 100, "users", "root", ["uid", "every user", "group"], id="all"
        ),
        # backupninja reads `stat %A`: a sticky or setgid bit fills a letter there.
        pytest.param(0o101600, 0, 0, "root", "root", ["every user"], id="sticky-file"),
        pytest.param(0o041700, 0, 0, "root", "root", ["every user"], id="sticky-folder"),
        pytest.param(0o042700, 0, 1, "daemon", "root", ["group daemon"], id="setgid-folder"),
        pytest.param(0o042700, 0, 0, "root", "root", [], id="setgid-root-group"),
    ],
)
def test_permissions_are_checked_as_backupninja_checks_them(
    mode, uid, gid, group, admingroup, refused
):
    problems = config.permission_problems(
        "/etc/backup.d/20.kvm", stat_of(mode, uid, gid), group, admingroup
    )

    assert len(problems) == len(refused), problems
    for problem, word in zip(problems, refused, strict=True):
        assert problem.startswith("/etc/backup.d/20.kvm: ") and word in problem
        assert "backupninja refuses" in problem


@pytest.mark.parametrize(
    ("text", "line", "name"),
    [
        pytest.param("[dest]\nkeep = 2\n[[dest]]\n", 3, "dest", id="named-like-a-key"),
        pytest.param("[general]\n[[merge]]\nx = 1\n", 2, "merge", id="general-merge"),
        pytest.param("[source]\ndomains = a\n  [[ sub ]]\n", 3, "sub", id="indented"),
    ],
)
def test_a_nested_section_is_a_config_error_not_a_traceback(tmp_path, text, line, name):
    path = write(tmp_path, text)

    problems = problems_of(path)

    expected = f"{path} line {line}: [[{name}]]: nested sections are not used"
    assert any(p.startswith(expected) for p in problems), problems


def test_line_numbers_count_newlines_only_as_backupninja_does(tmp_path):
    path = write(tmp_path, f"[general]\n\x0c\nbandwidht = 3\n[dest]\ndirectory = {tmp_path}\n")

    assert problems_of(path) == [
        f"{path} line 3: [general] bandwidht: unknown key (did you mean bandwidth?)"
    ]


def test_percent_signs_are_text_not_references_to_other_keys(tmp_path):
    path = write(
        tmp_path,
        f"""[source]
        domains = "%(z)s", web1
        [dest]
        directory = {tmp_path}
        user = %(host)s
        host = backup.example.org
        sshoptions = -o ProxyCommand=%(user)s
        """,
        domains=None,
    )

    settings = config.load(path)

    assert settings.domains == ("%(z)s", "web1")
    assert settings.user == "%(host)s"
    assert settings.sshoptions == "-o ProxyCommand=%(user)s"


def test_a_quoted_name_keeps_the_spaces_at_its_ends(tmp_path):
    path = write(
        tmp_path,
        f'[source]\ndomains = " lead", "trail ", plain \n[dest]\ndirectory = {tmp_path}\n',
        domains=None,
    )

    assert config.load(path).domains == (" lead", "trail ", "plain")


def test_whatever_the_bytes_loading_raises_only_a_config_error(tmp_path):
    import random

    rng = random.Random(8)
    pieces = ["[general]", "[source]", "[dest]", "[[dest]]", "[", "domains = a", "keep = 3"]
    pieces += ["merge = pull", '"', "'", "a = b = c", "\x0c", "\x00", "é", "\xe9", "=x"]
    pieces += [f"directory = {tmp_path}", "exclude = ,,", "port = -1", "[[[x]]]", "\\"]
    pieces += ["user = %(nokey)s", "user = %(user)s", "host = %(user)s", "domains = %(x)s"]
    path = tmp_path / "fuzz.kvm"
    for case in range(600):
        if case % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        else:
            lines = [rng.choice(pieces) for _ in range(rng.randrange(10))]
            data = "\n".join(lines).encode("utf-8", "surrogateescape")
        path.write_bytes(data)
        try:
            config.load(str(path))
        except ConfigError:
            pass


@pytest.mark.parametrize(
    ("key", "value"),
    [("user", "-oProxyCommand=touch /tmp/x"), ("host", "-oProxyCommand=x"), ("host", "a b")],
)
def test_a_remote_host_or_user_that_ssh_would_take_for_an_option_is_refused(tmp_path, key, value):
    values = {"host": "backup.example.org", "user": "root", key: value}
    path = write(
        tmp_path,
        f"[dest]\ndest = remote\ndirectory = /srv/backups\nhost = {values['host']}\n"
        f"user = {values['user']}\n",
    )

    problems = problems_of(path)

    assert any(f"[dest] {key}: {value!r} is not" in p for p in problems), problems


@pytest.mark.parametrize("host", ["backup.example.org", "192.0.2.7", "[2001:db8::1]", "nas_1"])
def test_ordinary_remote_hosts_are_accepted(tmp_path, host):
    path = write(tmp_path, f"[dest]\ndest = remote\ndirectory = /srv/backups\nhost = {host}\n")

    assert config.load(path).host == host


def test_rehearse_needs_a_local_destination_and_a_pattern_that_compiles(tmp_path):
    path = write(
        tmp_path,
        """
        [dest]
        dest = remote
        host = nas
        directory = /srv/kvm
        rehearse = yes
        rehearse_pattern = login(
        """,
    )

    found = problems_of(path)

    assert found == [
        f"{path} line 5: [dest] rehearse: needs dest = local (a rehearsal boots the set from "
        f"this host's files); rehearse remote sets on their host",
        f"{path} line 6: [dest] rehearse_pattern: 'login(' is not a regular expression "
        f"(missing ), unterminated subpattern at position 5)",
    ]


def test_exclude_disks_takes_domain_target_pairs_and_names_a_bad_one(tmp_path):
    dest = f"[dest]\ndirectory = {tmp_path}\n"
    good = write(tmp_path, "[source]\ndomains = all\nexclude_disks = web1:vdb, *:vd[cd]\n" + dest)
    bad = write(
        tmp_path, "[source]\ndomains = all\nexclude_disks = web1:vdb, vdc\n" + dest, "b.kvm"
    )

    settings = config.load(good)
    found = problems_of(bad)

    assert settings.exclude_disks == (("web1", "vdb"), ("*", "vd[cd]"))
    assert found == [
        f"{bad} line 3: [source] exclude_disks: 'vdc': not DOMAIN:TARGET (for example "
        f"web1:vdb, or *:vdc for every domain)"
    ]


def test_the_action_file_manual_page_documents_every_key_of_the_schema():
    from backupninja_kvm.config import _spec, render_man_page

    page = render_man_page("9.9", "2026-01-01")

    assert page.startswith('.TH BACKUPNINJA-KVM.KVM 5 "2026-01-01" "backupninja-kvm 9.9"')
    spec = _spec()
    for section in spec.sections:
        assert f".SH [{section}]" in page
        for key in spec[section].scalars:
            assert f"\\fB{key}\\fR =" in page, key
