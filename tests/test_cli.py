"""The command-line contract: data on stdout only, one-line errors, exit codes, man pages."""
from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest

from isep.cli.manpage import (
    PAGES,
    exit_status_lines,
    readme_exit_table,
    render,
    render_umbrella,
)
from isep.errors import ExitStatus
from tests.harness import REAL, ROOT, isep, pipeline

COMMANDS = ["index", "partition", "pack", "verify", "join", "prune", "push", "demo"]


@pytest.mark.parametrize("name", PAGES)
def test_man_pages_are_generated_from_the_command_definitions(name):
    committed = (ROOT / "man" / f"isep-{name}.1").read_text()
    assert committed == render(name), "man page out of date: run python -m isep.cli.manpage man README.md"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_and_version(name):
    text = isep(name, "--help", check=0).stdout.decode()
    assert text.startswith(f"Usage: isep-{name} ")
    first_paragraph = text.split("\n\n")[1]
    assert first_paragraph.strip().endswith(".") and first_paragraph.count(". ") == 0, first_paragraph
    assert "Exit status: 0 success;" in text and "Examples:" in text
    assert isep(name, "--version", check=0).stdout.startswith(b"isep ")


def _words(text: str) -> str:
    return " ".join(text.split())


def test_exit_codes_agree_in_enum_help_man_pages_and_readme():
    """One source, ExitStatus: every code and its meaning, in --help, each man page and the README."""
    statuses = list(ExitStatus)
    assert [s.value for s in statuses] == [0, 1, 2, 3, 4, 5, 6, 130, 141, 143]
    help_text = _words(isep("pack", "--help", check=0).stdout.decode())
    readme = (ROOT / "README.md").read_text()
    assert readme_exit_table() in readme, "README exit codes out of date: run python -m isep.cli.manpage man README.md"
    for status in statuses:
        assert f" {status.value} {status.meaning}" in help_text
        assert f"| {status.value} | {status.meaning} |" in readme
    pages = [(ROOT / "man" / f"isep-{name}.1").read_text() for name in PAGES] + [(ROOT / "man" / "isep.1").read_text()]
    for page in pages:
        section = page.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
        codes = [int(line[3:]) for line in section.splitlines() if line.startswith(".B ")]
        assert codes == [s.value for s in statuses]
        assert "\n".join(exit_status_lines()) in section


def test_a_bad_option_is_one_line_and_exit_2():
    for args in (["--bogus"], ["--compress", "lz4"], ["--format", "tar"]):
        result = isep("pack", *args)
        assert result.rc == 2 and result.stdout == b""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("isep-pack: error: ")
    result = isep("demo", "--format", "rpm")
    assert result.rc == 2 and result.stderr.startswith("isep-demo: error: ") and "docker-oci" in result.stderr


def test_man_pages_do_not_use_clicks_metavar_spelling():
    """typer 0.23 and 0.28 spell a choice's or a type's metavar differently; the pages spell their own."""
    page = (ROOT / "man" / "isep-pack.1").read_text()
    assert ".B \\-c, \\-\\-compress zstd|gzip|none\n" in page
    assert ".B \\-\\-format isep|isula\n" in page
    for spelling in ("TEXT", "INTEGER", "[zstd|gzip|none]", "<zstd|gzip|none>", "[default:"):
        assert spelling not in page
    assert ".SH EXAMPLES\n" in page


def test_umbrella_command_runs_the_same_commands():
    direct = isep("index", REAL / "docker-oci" / "base.tar", check=0).stdout
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "isep"), "index", str(REAL / "docker-oci" / "base.tar")],
                          capture_output=True)
    assert proc.returncode == 0 and proc.stdout == direct


@pytest.mark.parametrize("args,code", [
    (["pack", "-o", "x"], 2),                                   # neither --plan nor --base
    (["pack", "--base", "a", "--plan", "b", "-o", "x"], 2),     # both
    (["pack", "--base", "/nonexistent.json", "-o", "-"], 2),
    (["pack", "--base", str(REAL / "docker-oci" / "inspect-base.json"), "--parts", "nope", "-o", "x"], 2),
    (["partition", "--base", str(REAL / "docker-oci" / "inspect-base.json"), "/nonexistent"], 3),
    (["join", "/nonexistent-dir"], 3),
    (["verify", "/nonexistent-file"], 3),
    (["join", str(REAL / "docker-oci")], 2),                      # a directory that is no bundle
])
def test_usage_and_environment_errors_are_one_line(args, code, tmp_path):
    result = isep(*args, cwd=tmp_path, stdin=b"")
    assert result.rc == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"isep-{args[0]}: error: ")
    assert result.stdout == b""


def test_stdout_carries_only_data_and_stderr_only_messages(tmp_path):
    folder = REAL / "docker-oci"
    result = isep("pack", folder / "app1.tar", "--base", folder / "inspect-base.json", "-o", tmp_path / "s", check=0)
    assert result.stdout == b"" and "part(s)" in result.stderr
    joined = isep("join", tmp_path / "s", check=0)
    assert joined.stdout == (folder / "app1.tar").read_bytes()
    assert isep("join", tmp_path / "s", "-q", check=0).stderr == ""


def test_a_closed_stdout_ends_quietly():
    big = REAL / "docker-oci" / "app1+app2.tar"
    proc = pipeline(f"isep-index {big} | head -c 1 > /dev/null; echo ${{PIPESTATUS[0]}}")
    assert proc.stderr == b"" and proc.stdout.strip() in (b"0", b"141")
    proc = pipeline(f"isep-pack {big} --base {REAL}/docker-oci/inspect-base.json -o - -q | head -c 10 > /dev/null; "
                    f"echo ${{PIPESTATUS[0]}}")
    assert proc.stderr == b"" and proc.stdout.strip() == b"141"


def test_binary_output_is_refused_on_a_terminal():
    folder = REAL / "docker-oci"
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, str(ROOT / "bin" / "isep-pack"), str(folder / "app1.tar"),
                                  "--base", str(folder / "inspect-base.json"), "-o", "-"])
    output = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    assert b"refusing to write binary data to a terminal" in output


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "isep-demo"), "--dir", str(tmp_path / "d")],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    out = proc.stdout.decode()
    assert "demo OK" in out and "byte-identical" in out and "FAILED" not in out.replace("FAILED: `isep-join damaged", "")


def test_umbrella_man_page_is_generated():
    assert (ROOT / "man" / "isep.1").read_text() == render_umbrella()


def test_every_man_page_is_installed_by_pyproject():
    # pyproject's data-files list is written by hand: a new command's page was once left out of it
    listed = re.search(r'"share/man/man1" = \[(.*?)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    installed = sorted(re.findall(r'"(man/[^"]+)"', listed))
    on_disk = sorted(f"man/{p.name}" for p in (ROOT / "man").glob("*.1"))
    assert installed == on_disk
