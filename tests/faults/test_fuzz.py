"""Short atheris runs of the harnesses in fuzz/ (about 20 s in all): any exception other than
isep.errors.IsepError is a finding and fails the test. Skipped where atheris is not installed
(pip install atheris); fuzz/README.md tells how to run them for longer. fuzz_archive.py also
compares every archive isep accepts with Go's readers (tests/godiff) where go is installed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import ROOT

from . import ambiguous

atheris = pytest.importorskip("atheris")
FUZZ = ROOT / "fuzz"
SECONDS = {"fuzz_tarstream.py": 6, "fuzz_archive.py": 8, "fuzz_json.py": 6}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-seeds")
    subprocess.run([sys.executable, str(FUZZ / "make_seeds.py"), str(out)], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def godiff_env(tmp_path_factory):
    binary = ambiguous.build_godiff(tmp_path_factory.mktemp("godiff"))
    if binary is None and os.environ.get("CI") == "true":
        pytest.fail("go is not installed (tests/run.sh installs golang-go)")
    return dict(os.environ, ISEP_GODIFF=str(binary)) if binary else None


@pytest.mark.parametrize("harness", sorted(SECONDS))
def test_harness_finds_nothing(harness, seeds, tmp_path, godiff_env):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed_dir = seeds / ("json" if harness == "fuzz_json.py" else "tar")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / harness), f"-max_total_time={SECONDS[harness]}", "-max_len=65536",
         "-rss_limit_mb=2048", "-timeout=20", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
         str(corpus), str(seed_dir)],
        capture_output=True, text=True, timeout=SECONDS[harness] + 120, cwd=tmp_path,
        env=godiff_env if harness == "fuzz_archive.py" else None)
    log = proc.stderr[-4000:]
    assert "Uncaught Python exception" not in proc.stderr, log
    assert proc.returncode == 0, log
    assert "Done " in proc.stderr, log
