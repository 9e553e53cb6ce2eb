"""The session fixtures of every tier but the engine tier: sample archives made once per run, bundles
packed from them, and a sandbox per test. The harness itself (running commands, the invariants,
paths of the committed fixtures) is tests/harness.py."""
from __future__ import annotations

import pytest

from isep.samples import write_sample_set
from tests.harness import FORMATS, SAMPLE_LAYER_KIB, Sandbox, isep, pack_args, run
from tests.release_samples import write_releases


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    """isep.samples sets (base, lib, app1, app2, app1-2, app1+app2, inspect-*.json) per format."""
    root = tmp_path_factory.mktemp("samples")
    return {fmt: write_sample_set(root / fmt, fmt, layer_kib=SAMPLE_LAYER_KIB) for fmt in FORMATS}


@pytest.fixture(scope="session")
def samples_seed1(tmp_path_factory):
    """The same images with other content (seed 1): parts of the same names from another pack."""
    root = tmp_path_factory.mktemp("samples-seed1")
    return {"docker-oci": write_sample_set(root / "docker-oci", "docker-oci", seed=1, layer_kib=SAMPLE_LAYER_KIB)}


@pytest.fixture(scope="session")
def stores(tmp_path_factory, samples, samples_seed1):
    """Pristine bundles of app1 (copy them before damaging): per format, plus 'gzip' (docker-oci with
    --compress gzip) and 'seed1' (docker-oci images of other content, same part names)."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for key, s, extra in [(f, samples[f], []) for f in FORMATS] + [
            ("gzip", samples["docker-oci"], ["--compress", "gzip"]),
            ("seed1", samples_seed1["docker-oci"], [])]:
        run("pack", *pack_args(s), "-o", root / key, *extra)
        made[key] = root / key
    return made


@pytest.fixture
def sb(tmp_path) -> Sandbox:
    return Sandbox(tmp_path / "sb")


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    """The delta tests' release series (tests/release_samples.py), and `build`: the build host's store
    after release 1 (plain, all parts). Made once per test module."""
    root = tmp_path_factory.mktemp("releases")
    made = write_releases(root / "saves")
    isep("pack", made["r1"], "--base", made["base1"], "-o", root / "build", check=0)
    return {**made, "build": root / "build", "root": root}
