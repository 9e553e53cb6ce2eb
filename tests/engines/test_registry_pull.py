"""A release chain pulled from a real registry into real Docker 26: `isep-join oci://... STORE |
docker load`.

A three-release chain (full, delta, delta; tests/release_chain.py) is pushed to a docker-registry this
test starts itself (private config and storage, 127.0.0.1, a free port, stopped by pid: the engine
tier does not depend on the registry tier's registries); a device store pulls each release in turn,
the joined archive is piped into Docker 26 and the loaded image's layers are checked. Image names
are isep-registry-engine/app1:N (unique to this test: other sessions may use the engines).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from isep.samples import diff_ids
from tests.release_chain import RELEASES, app_image, build_chain

lib = sys.modules["isep_engines_lib"]  # loaded by this directory's conftest.py
pytestmark = pytest.mark.engines
REPO = "isep-registry-engine"
ENGINE = "oci"  # dockerd 26


def _unavailable(message: str) -> None:
    if lib.strict_mode():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def docker26(tmp_path_factory):
    return lib.running_docker26(tmp_path_factory.mktemp("registry-pull"))


@pytest.fixture(scope="module")
def registry_host(tmp_path_factory):
    """A docker-registry of this test's own on 127.0.0.1 (tests/registry/registry.sh installs it)."""
    binary = shutil.which("docker-registry")
    if binary is None:
        _unavailable("docker-registry is missing: bash tests/registry/registry.sh install")
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}/storage\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: isep-engine-tier\n")
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([binary, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            _unavailable(f"docker-registry did not start: {lib.tail((root / 'log').read_bytes(), 3)}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _isep(*args) -> subprocess.CompletedProcess:
    return lib.run(lib.isep_cmd(args[0]) + [str(a) for a in args[1:]], env=lib.isep_env(), timeout=300)


def test_release_chain_pulled_from_a_registry_into_docker26(docker26, registry_host, tmp_path):
    chain = build_chain(tmp_path / "chain", repo=REPO)
    tags = [f"{REPO}/app1:{n}" for n in RELEASES]
    store = tmp_path / "device"
    docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)
    try:
        for n in RELEASES:
            ref = f"oci://{registry_host}/fleet/app1:{n}"
            delta = ["--delta", chain[f"app1/d{n - 1}{n}"]] if n > 1 else []
            pushed = _isep("push", chain[f"app1/r{n}"], ref, *delta)
            assert pushed.returncode == 0, lib.tail(pushed.stderr, 4)
            with lib.cell("registry pull", f"release {n}", "Docker 26"):
                join = " ".join(shlex.quote(x) for x in lib.isep_cmd("join") + [ref, str(store)])
                load = " ".join(shlex.quote(x) for x in docker26.docker_argv(ENGINE, "load"))
                r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{join} | {load}"], capture_output=True,
                                   env={**os.environ, **lib.isep_env()}, timeout=300)
                assert r.returncode == 0, lib.tail(r.stderr, 4)
                inspect = docker26.docker(ENGINE, "image", "inspect", tags[n - 1], timeout=60)
                assert inspect.returncode == 0, lib.tail(inspect.stderr, 2)
                layers = json.loads(inspect.stdout)[0]["RootFS"]["Layers"]
                assert layers == diff_ids(app_image("app1", n, REPO))
        kept = json.loads((store / "isep-bundle.json").read_text())
        assert len([p for p in kept["parts"] if p["role"] == "app"]) == 3, kept["parts"]
        assert _isep("verify", store).returncode == 0
    finally:
        docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)
