"""tests/engines/engines.sh takes its Debian mirror from the machine's own apt sources (the engine tier
itself needs root and real engines; this checks the parsing alone, on sample sources files)."""
from __future__ import annotations

import subprocess
from pathlib import Path

ENGINES_SH = Path(__file__).resolve().parent / "engines" / "engines.sh"
DEB822 = """\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
# a comment line
URIs: http://mirror.site.lan/debian-security/
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main

Types: deb deb-src
URIs: http://mirror.site.lan/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
CLASSIC = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://security.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://proxy.lan:3142/debian bookworm main
"""


def mirror(apt_dir: Path, env: dict | None = None, function: str = "apt_mirror") -> str:
    script = f'. "$1" && {function} "$2"'
    proc = subprocess.run(["bash", "-c", script, "test", str(ENGINES_SH), str(apt_dir)],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(ENGINES_SH)], check=True)


def test_deb822_and_classic_sources(tmp_path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert mirror(apt) == "http://mirror.site.lan/debian"
    (apt / "sources.list").write_text(CLASSIC)  # read before sources.list.d, as apt does
    assert mirror(apt) == "http://proxy.lan:3142/debian"


def test_no_sources_falls_back_to_deb_debian_org_and_the_variable_wins(tmp_path):
    assert mirror(tmp_path) == ""
    env = {"PATH": "/usr/bin:/bin", "ISEP_DEBIAN_MIRROR": "http://local.lan/debian/"}
    assert mirror(tmp_path, env, "debian_mirror") == "http://local.lan/debian"
