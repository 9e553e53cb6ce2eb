"""A floating base tag rebuilt (docs/deltas.md §8): base v1 + app:1, then base v2 under the same tag +
app:2, packed into one store; both join byte for byte and load into real Docker 26 with their own
base's layers; isep-prune --keep-last 1 then leaves app:2, which still joins and loads. Image names
isep-float-engine/* are unique to this test (other sessions may use the engines at the same time)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_versions import floating_saves

lib = sys.modules["isep_engines_lib"]  # loaded by this directory's conftest.py
pytestmark = pytest.mark.engines
PREFIX = "isep-float-engine"
ENGINE = "oci"  # dockerd 26


@pytest.fixture(scope="module")
def docker26(tmp_path_factory):
    return lib.running_docker26(tmp_path_factory.mktemp("floating-base"))


def _isep(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, **lib.isep_env()}
    return subprocess.run(lib.isep_cmd(args[0]) + [str(a) for a in args[1:]], capture_output=True, env=env,
                          timeout=300)


def _join_and_load(docker26, store, n: int, saves: dict, tmp_path) -> None:
    tag = f"{PREFIX}/app:{n}"
    joined = _isep("join", store, tag)
    assert joined.returncode == 0, joined.stderr.decode()
    assert joined.stdout == saves[f"app{n}"].read_bytes(), f"app:{n} is not byte-exact"
    archive = tmp_path / f"joined-{n}.tar"
    archive.write_bytes(joined.stdout)
    load = docker26.docker(ENGINE, "load", "-i", str(archive), timeout=120)
    assert load.returncode == 0, lib.tail(load.stderr, 3)
    inspect = docker26.docker(ENGINE, "image", "inspect", tag, timeout=60)
    assert inspect.returncode == 0, lib.tail(inspect.stderr, 2)
    layers = json.loads(inspect.stdout)[0]["RootFS"]["Layers"]
    assert layers[0] == saves[f"stack{n}"][0] and len(layers) == 3


def test_floating_base_update_into_one_store(docker26, tmp_path):
    saves = floating_saves(tmp_path / "saves", PREFIX)
    store = tmp_path / "store"
    tags = [f"{PREFIX}/app:{n}" for n in (1, 2)]
    docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)
    try:
        for n in (1, 2):
            res = _isep("pack", saves[f"app{n}"], "--base", saves[f"base{n}"], "-o", store)
            assert res.returncode == 0, res.stderr.decode()
        bases = [p for p in json.loads((store / "isep-bundle.json").read_text())["parts"] if p["role"] == "base"]
        assert len(bases) == 2 and bases[0]["file"] == "base_12_base_image.tar.zst"
        for n in (1, 2):
            with lib.cell("floating base tag", f"app:{n} from one store", "Docker 26"):
                _join_and_load(docker26, store, n, saves, tmp_path)
        docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)
        pruned = _isep("prune", store, "--keep-last", "1")
        assert pruned.returncode == 0, pruned.stderr.decode()
        assert pruned.stdout.decode().split() == ["app_1_app_image.tar.zst", "base_12_base_image.tar.zst"]
        with lib.cell("floating base tag", "app:2 after isep-prune", "Docker 26"):
            _join_and_load(docker26, store, 2, saves, tmp_path)
        assert _isep("verify", store).returncode == 0
    finally:
        docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)
