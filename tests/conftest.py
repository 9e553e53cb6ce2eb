"""Shared helpers: run isep commands through real pipes, locate fixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
REAL = DATA / "real"
ISULA = DATA / "isula"
REAL_FORMATS = {  # fixture folder -> isep format name
    "docker-legacy": "docker-legacy", "docker-oci": "docker-oci", "docker-cstore": "docker-cstore",
    "podman-docker-archive": "podman", "skopeo-docker-archive": "podman",
    "umoci-docker-archive": "podman", "podman-oci-archive": "oci-archive",
    "skopeo-oci-archive": "oci-archive",
}
WITH_INSPECT = ("docker-legacy", "docker-oci", "docker-cstore", "podman-docker-archive")


@dataclass
class Result:
    rc: int
    stdout: bytes
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if ": error: " in line]


def isep(cmd: str, *args, stdin: bytes | None = None, stdin_file=None, cwd=None, check=None,
         env=None) -> Result:
    """Run bin/isep-<cmd> as a separate process with real pipes."""
    argv = [sys.executable, str(ROOT / "bin" / f"isep-{cmd}"), *map(str, args)]
    proc = subprocess.run(argv, input=stdin, stdin=stdin_file if stdin is None else None,
                          capture_output=True, cwd=cwd, env=env, timeout=600)
    result = Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))
    assert "Traceback" not in result.stderr, result.stderr
    if check is not None:
        assert result.rc == check, f"isep-{cmd} {args}: rc {result.rc}\n{result.stderr}"
    return result


def pipeline(shell: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{ROOT / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=cwd, env=env,
                          capture_output=True, timeout=600)


def inspect_layers(folder: str, image: str) -> list[str]:
    doc = json.loads((REAL / folder / f"inspect-{image}.json").read_text())
    return doc[0]["RootFS"]["Layers"]


@pytest.fixture(scope="session")
def sample_sets(tmp_path_factory):
    """Sample archives (isep.samples) for every producer format, made once per session."""
    from isep.samples import FORMATS, write_sample_set
    root = tmp_path_factory.mktemp("samples")
    return {fmt: write_sample_set(root / fmt, fmt) for fmt in FORMATS}
