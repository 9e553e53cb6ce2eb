"""Issue #11's two core flows with real Docker 26 saves (OCI layout, blobs sorted by digest) and a
base layer of 110 MiB: a release update whose base layer release 1's save places after release 2's
metadata, joined from an app-part stream against the device's store into `docker load`; and a
device's first delivery as a stream into an empty store with --keep, then the update into it.

Images are isep-flows/* (unique to this test), built in the `oci` engine. This module does not use
the session's `engines` fixture: that one rebuilds (and wipes) every fixture image of the engines,
which other runs may be using; it only needs the engines running.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

lib = sys.modules["isep_engines_lib"]
run, tail, isep_cmd, isep_env = lib.run, lib.tail, lib.isep_cmd, lib.isep_env

pytestmark = pytest.mark.engines

ENGINE = "oci"  # dockerd 26
BASE, APP1, APP2 = "isep-flows/base:1", "isep-flows/app:1", "isep-flows/app:2"
BIG = 110 << 20
TIMEOUT = 600


class Docker:
    def __init__(self, state: dict):
        self.argv = [state["docker"]]
        self.env = {"DOCKER_HOST": state["engines"][ENGINE]["host"], "DOCKER_CONFIG": state["docker_config"]}

    def __call__(self, *args, check=True, **kw):
        return run(self.argv + list(args), env=dict(self.env, DOCKER_BUILDKIT="0"), check=check,
                   timeout=TIMEOUT, **kw)

    def layers(self, ref: str) -> list[str]:
        return json.loads(self("image", "inspect", ref).stdout)[0]["RootFS"]["Layers"]

    def remove(self, *refs: str) -> None:
        self("rmi", "-f", *refs, check=False)


@pytest.fixture(scope="module")
def docker26():
    state_file = lib.WORK / "engines.json"
    problem = None
    if not state_file.exists():
        problem = f"{state_file} missing (engines.sh start has not run)"
    else:
        docker = Docker(json.loads(state_file.read_text()))
        r = docker("version", check=False)
        if r.returncode != 0:
            problem = f"dockerd 26 is not answering: {tail(r.stderr, 2)}"
    if problem:
        if lib.strict_mode():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    yield docker
    docker.remove(APP2, APP1, BASE)


def _write_rootfs(path: Path, seed: int) -> None:
    """A base rootfs: a few files and BIG bytes of random data (an OS's worth of layer)."""
    with tarfile.open(path, mode="w") as tar:
        for name, data in (("etc/os-release", b"NAME=isep-flows\n"), ("srv/seed", str(seed).encode()),
                           ("opt/big.bin", os.urandom(BIG))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1704067200
            tar.addfile(info, io.BytesIO(data))


def _import_high_base(docker: Docker, root: Path) -> str:
    """Import base rootfs until the layer's digest sorts high (d, e or f first: a few tries), so that
    a build whose other blobs all sort below it is likely; returns its diffID."""
    for seed in range(60):
        _write_rootfs(root / "base.tar", seed)
        docker("import", "-c", 'CMD ["/srv/run"]', str(root / "base.tar"), BASE)
        diff_id = docker.layers(BASE)[0]
        if diff_id[7] in "def":
            return diff_id
        docker.remove(BASE)
    pytest.fail("no base layer digest sorted high in 60 imports")


def _names(path: Path) -> list[str]:
    with tarfile.open(path, mode="r|") as tar:
        return [m.name for m in tar]


def _build_release(docker: Docker, ctx: Path, ref: str, files: dict[str, bytes]) -> None:
    ctx.mkdir(parents=True, exist_ok=True)
    lines = [f"FROM {BASE}"]
    for name, data in files.items():
        (ctx / name).write_bytes(data)
        lines.append(f"COPY {name} /srv/{name}")
    (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
    docker("build", "-q", "-t", ref, str(ctx))


def _base_after_metadata(s1: Path, s2: Path, base_diff_id: str) -> bool:
    """In release 1's save the base layer comes after the position of release 2's metadata."""
    return _names(s1).index("blobs/sha256/" + base_diff_id[7:]) > _names(s2).index("index.json")


@pytest.fixture(scope="module")
def saves(docker26, tmp_path_factory) -> dict:
    """Docker 26 saves of base, app:1 (3 app layers) and app:2 (1), rebuilt with other app files
    until release 1's save places the base layer after release 2's metadata (the refused case)."""
    root = tmp_path_factory.mktemp("flows-engines")
    docker26.remove(APP2, APP1, BASE)
    base_diff_id = _import_high_base(docker26, root)
    (root / "inspect-base.json").write_bytes(docker26("image", "inspect", BASE).stdout)
    for attempt in range(40):
        _build_release(docker26, root / f"r1-{attempt}", APP1,
                       {f"a{n}": f"release 1 file {n} try {attempt}\n".encode() for n in range(3)})
        _build_release(docker26, root / f"r2-{attempt}", APP2, {"b0": f"release 2 try {attempt}\n".encode()})
        docker26("save", "-o", str(root / "app1.tar"), APP1)
        docker26("save", "-o", str(root / "app2.tar"), APP2)
        if _base_after_metadata(root / "app1.tar", root / "app2.tar", base_diff_id):
            break
    else:
        pytest.fail("no build placed the base layer after release 2's metadata in 40 tries")
    layers = {APP1: docker26.layers(APP1), APP2: docker26.layers(APP2)}
    docker26.remove(APP2, APP1, BASE)  # each load below must bring every layer itself
    return {"root": root, "layers": layers, "base-ref": root / "inspect-base.json",
            APP1: root / "app1.tar", APP2: root / "app2.tar"}


def _pipeline(docker: Docker, *stages: list) -> subprocess.CompletedProcess:
    shell = " | ".join(shlex.join(map(str, argv)) for argv in stages)
    env = dict(os.environ, **isep_env(), **docker.env)
    return subprocess.run(["bash", "-o", "pipefail", "-c", shell], env=env, capture_output=True,
                          timeout=TIMEOUT)


def _deliver(docker: Docker, saves: dict, ref: str, store: Path, *join_extra, parts=()) -> None:
    """isep-pack SAVE -o - [--parts ...] | isep-join STORE - ... | docker load, then the loaded
    image's layers are the built image's."""
    docker.remove(ref)
    pack = isep_cmd("pack") + [saves[ref], "--base", saves["base-ref"], "-o", "-", *parts]
    join = isep_cmd("join") + [store, "-", *join_extra]
    r = _pipeline(docker, pack, join, docker.argv + ["load"])
    assert r.returncode == 0, f"rc={r.returncode}: {tail(r.stderr, 6)}"
    assert docker.layers(ref) == saves["layers"][ref]


def test_release_update_with_a_big_base_placed_after_the_metadata(docker26, saves, tmp_path):
    device = tmp_path / "device"
    r = run(isep_cmd("pack") + [str(saves[APP1]), "--base", str(saves["base-ref"]), "-o", str(device)],
            env=isep_env(), timeout=TIMEOUT)
    assert r.returncode == 0, tail(r.stderr, 4)
    _deliver(docker26, saves, APP2, device, parts=("--parts", "app"))


def test_first_delivery_into_an_empty_store_with_keep_then_the_update(docker26, saves, tmp_path):
    device = tmp_path / "device"
    device.mkdir()
    _deliver(docker26, saves, APP1, device, "--keep")
    assert (device / "isep-bundle.json").exists()
    _deliver(docker26, saves, APP2, device, "--keep", parts=("--parts", "app"))
    tags = {t for im in json.loads((device / "isep-bundle.json").read_text())["images"] for t in im["tags"]}
    assert tags == {APP1, APP2}
