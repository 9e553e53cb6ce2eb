"""A three-release chain (full, delta, delta) over a real sshd into real Docker 26, with a tag per
release and with one floating tag for all three.

The build host keeps a store of every release it packed; the device keeps the store `isep-join STORE
- --keep` leaves (release 1 from a full stream, then each release's app part rebuilt from its delta).
Each release crosses the link as one bundle stream; on the device it is joined (byte for byte the
save), loaded into Docker 26 and inspected. Image names are isep-delta/chain:N (unique to this test:
other sessions may use the engines at the same time). Needs only the `oci` engine and openssh: it
does not build the other fixture images.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from isep.samples import Image, diff_ids, write_archive
from tests.release_samples import releases, write_releases

lib = sys.modules["isep_engines_lib"]  # loaded by this directory's conftest.py
pytestmark = pytest.mark.engines
REPO = "isep-delta/chain"
FLOATING = "isep-delta/float-chain:stable"
ENGINE = "oci"  # dockerd 26


@pytest.fixture(scope="module")
def docker26(tmp_path_factory):
    return lib.running_docker26(tmp_path_factory.mktemp("delta-chain"))


@pytest.fixture(scope="module")
def ssh():
    with lib.ssh_server() as server:
        yield server


def _isep(*args, stdout=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **lib.isep_env()}
    return subprocess.run(lib.isep_cmd(args[0]) + [str(a) for a in args[1:]], stdout=stdout,
                          stderr=subprocess.PIPE, env=env, timeout=300)


def _remote_join(store, joined) -> str:
    """On the device: join the stream against the store, keep the parts, load the archive."""
    join = " ".join(shlex.quote(x) for x in lib.isep_cmd("join"))
    load = " ".join(shlex.quote(x) for x in ["env", f"DOCKER_HOST={_state()['engines'][ENGINE]['host']}",
                                              f"DOCKER_CONFIG={_state()['docker_config']}", _state()["docker"],
                                              "load", "-i", str(joined)])
    return (f"cd {shlex.quote(str(lib.REPO))} && export PATH={shlex.quote(os.environ.get('PATH', ''))} "
            f"PYTHONPATH={shlex.quote(lib.isep_env()['PYTHONPATH'])} && "
            f"{join} {shlex.quote(str(store))} - --keep -o {shlex.quote(str(joined))} && {load}")


def _state() -> dict:
    return json.loads((lib.WORK / "engines.json").read_text())


def test_three_release_chain_over_ssh(docker26, ssh, tmp_path):
    saves = write_releases(tmp_path / "saves", repo=REPO)
    images = releases(REPO)
    build, device = tmp_path / "build", tmp_path / "device"
    tags = [f"{REPO}:{n}" for n in (1, 2, 3)]
    docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)
    link_bytes = {}
    try:
        for n, key in enumerate(("r1", "r2", "r3"), start=1):
            with lib.cell("delta chain", f"release {n}", "Docker 26 over ssh"):
                stream = tmp_path / f"{key}.stream"
                delta = [] if n == 1 else ["--parts", "app", "--delta-from", build]
                with open(stream, "wb") as fh:
                    res = _isep("pack", saves[key], "--base", saves["base1"], "-o", "-", *delta, stdout=fh)
                assert res.returncode == 0, res.stderr.decode()
                link_bytes[key] = stream.stat().st_size
                joined = tmp_path / f"joined-{key}.tar"
                with open(stream, "rb") as fh:
                    r = subprocess.run(ssh["ssh"] + [_remote_join(device, joined)], stdin=fh,
                                       capture_output=True, timeout=300)
                assert r.returncode == 0, f"device side: {lib.tail(r.stderr, 4)}"
                assert joined.read_bytes() == saves[key].read_bytes(), f"release {n} is not byte-exact"
                inspect = docker26.docker(ENGINE, "image", "inspect", tags[n - 1], timeout=60)
                assert inspect.returncode == 0, lib.tail(inspect.stderr, 2)
                layers = json.loads(inspect.stdout)[0]["RootFS"]["Layers"]
                assert layers == diff_ids(images[key])
                # the build host's store mirrors the device's: this release's parts, plain
                assert _isep("pack", saves[key], "--base", saves["base1"], "-o", build).returncode == 0
        kept = json.loads((device / "isep-bundle.json").read_text())
        assert not any("from" in m for p in kept["parts"] for m in p["members"]), "a delta part was kept"
        assert len([p for p in kept["parts"] if p["role"] == "app"]) == 3, kept["parts"]
        assert _isep("verify", device).returncode == 0
        assert link_bytes["r2"] * 10 < link_bytes["r1"] and link_bytes["r3"] * 10 < link_bytes["r1"], link_bytes
        print(f"bytes on the link: {link_bytes}")
    finally:
        docker26.docker(ENGINE, "rmi", "-f", *tags, timeout=120)


def test_a_floating_tag_chain_over_ssh(docker26, ssh, tmp_path):
    """Three releases all tagged isep-delta/float-chain:stable: the device keeps each beside the last
    and joins by the tag; the build host keeps each release by piping its stream into isep-join
    BUILD - --keep, so each delta is made against the release the device holds. Docker's tag moves
    to each release in turn."""
    saves = write_releases(tmp_path / "saves", repo=REPO)
    images = releases(REPO)
    build, device = tmp_path / "build", tmp_path / "device"
    docker26.docker(ENGINE, "rmi", "-f", FLOATING, timeout=120)
    try:
        for n, key in enumerate(("r1", "r2", "r3"), start=1):
            with lib.cell("delta chain", f"floating tag, release {n}", "Docker 26 over ssh"):
                save = tmp_path / f"{key}-stable.tar"
                with open(save, "wb") as fh:
                    write_archive(fh, "docker-oci", [Image(FLOATING, images[key].layers)])
                stream = tmp_path / f"{key}-stable.stream"
                delta = [] if n == 1 else ["--parts", "app", "--delta-from", build]
                with open(stream, "wb") as fh:
                    res = _isep("pack", save, "--base", saves["base1"], "-o", "-", *delta, stdout=fh)
                assert res.returncode == 0, res.stderr.decode()
                joined = tmp_path / f"joined-{key}-stable.tar"
                with open(stream, "rb") as fh:
                    r = subprocess.run(ssh["ssh"] + [_remote_join(device, joined)], stdin=fh,
                                       capture_output=True, timeout=300)
                assert r.returncode == 0, f"device side: {lib.tail(r.stderr, 4)}"
                assert joined.read_bytes() == save.read_bytes(), f"release {n} is not byte-exact"
                inspect = docker26.docker(ENGINE, "image", "inspect", FLOATING, timeout=60)
                assert inspect.returncode == 0, lib.tail(inspect.stderr, 2)
                assert json.loads(inspect.stdout)[0]["RootFS"]["Layers"] == diff_ids(images[key])
                with open(stream, "rb") as fh:  # the build host keeps what the device keeps
                    kept = subprocess.run(lib.isep_cmd("join") + [str(build), "-", "--keep"], stdin=fh,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          env={**os.environ, **lib.isep_env()}, timeout=300)
                assert kept.returncode == 0, kept.stderr.decode()
        apps = [p["file"] for p in json.loads((device / "isep-bundle.json").read_text())["parts"]
                if p["role"] == "app"]
        assert len(apps) == 3 and len(set(apps)) == 3, apps
        again = _isep("join", device, FLOATING, stdout=subprocess.PIPE)
        assert again.returncode == 0 and again.stdout == (tmp_path / "r3-stable.tar").read_bytes()
    finally:
        docker26.docker(ENGINE, "rmi", "-f", FLOATING, timeout=120)
