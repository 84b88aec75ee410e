"""The .kvm action file: defaults, every problem at once with its line, the example."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from backupninja_kvm import config
from backupninja_kvm.errors import ConfigError, HypervisorError

EXAMPLE = Path(__file__).parents[2] / "examples" / "example.kvm"


def write(tmp_path: Path, text: str, name: str = "10-vms.kvm") -> str:
    """Write an action file (leading indentation removed) and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def problems_of(path: str, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path, **kwargs)
    assert info.value.path == path
    return info.value.problems


def test_a_file_with_only_the_destination_directory_gets_the_documented_defaults(tmp_path):
    path = write(tmp_path, f"[dest]\ndirectory = {tmp_path}\n")

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
        uri = qemu+ssh://root@host/system
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
    assert settings.uri == "qemu+ssh://root@host/system"
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
        (9, "[dest] keep", 'the value "0" is too small'),
        (10, "[dest] directory", "directory /nonexistent/x does not exist"),
        (11, "unknown section [extra]", ""),
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
            'line 2: [general] merge_timeout: the value "0" is too small',
            id="timeout-zero",
        ),
        pytest.param(
            "[general]\nbandwidth = -1",
            'line 2: [general] bandwidth: the value "-1" is too small',
            id="negative-bandwidth",
        ),
        pytest.param(
            "[general]\nmerge = comit",
            'line 2: [general] merge: the value "comit" is unacceptable (one of: commit, pull)',
            id="option-not-allowed",
        ),
        pytest.param(
            "[general]\nstage = freeze",
            'line 2: [general] stage: the value "freeze" is unacceptable (one of: full)',
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
            "[source]\noverlaydir = /nonexistent/overlays",
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
        f"[source]\nexclude = web*, test-?, scratch\n[dest]\ndirectory = {tmp_path}\n",
    )

    assert config.load(path).is_excluded(name) is excluded


def test_unknown_domain_names_are_reported_on_the_domains_line(tmp_path):
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

    problems = problems_of(path, list_domains=lambda uri: ["a"])

    assert problems == [f"{path} line 3: [source] domains: unknown domain 'zz'"]


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
        uri = qemu+ssh://nowhere/system
        [dest]
        directory = {tmp_path}
        """,
    )

    def list_domains(uri):
        raise HypervisorError("cannot connect")

    assert problems_of(path, list_domains=list_domains) == [
        f"{path} line 3: [source] uri: cannot connect"
    ]


def test_unknown_domains_are_reported_with_the_other_problems(tmp_path):
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

    assert [p.split(": ")[1] for p in problems] == [
        "[source] domains",
        "[dest] keep",
        "[dest] directory",
    ]


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
