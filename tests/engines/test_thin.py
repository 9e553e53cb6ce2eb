"""Real-engine tier: thin joins (`isep-join --have`) into engines that already hold base and lib.

For Docker 20.10, Docker 26, Docker 28 (containerd store) and `ctr images import`: load base and
lib, thin-join the app from an app-only store and from an app-only bundle stream, load it, compare
RootFS.Layers and tags; refuse (exit 6, nothing written) when the engine lacks a layer, leaving the
engine unchanged. podman: its inspect JSON is refused as --have, and podman load itself refuses a
thin archive (which is why). Images are named isep-thin/* and built from isep.samples with seeds
of their own, so no other test's images share their layers.

Uses the engines engines.sh started (never starts or builds anything itself).
"""
from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from isep.samples import inspect_json, sample_images, write_archive

lib = sys.modules["isep_engines_lib"]
run, tail, isep_cmd, isep_env, WORK = lib.run, lib.tail, lib.isep_cmd, lib.isep_env, lib.WORK

pytestmark = pytest.mark.engines
TIMEOUT = 300
FORMAT = {"legacy": "docker-legacy", "oci": "docker-oci", "cstore": "docker-cstore", "ctr": "docker-cstore",
          "podman": "podman"}
SEED = {"legacy": 1501, "oci": 1502, "cstore": 1503, "ctr": 1504, "podman": 1505}
NAMES = {"base": "isep-thin/base:1", "lib": "isep-thin/lib:1", "app1": "isep-thin/app:1"}
DOCKERS = ["legacy", "oci", "cstore"]


@pytest.fixture(scope="module")
def thin_engines(tmp_path_factory):
    state_file = WORK / "engines.json"
    if not state_file.exists():
        if lib.strict_mode():
            pytest.fail(f"{state_file} missing: the engines are not running")
        pytest.skip("real engines are not running (bash tests/engines/engines.sh install start)")
    state = json.loads(state_file.read_text())
    return lib.Engines(state, tmp_path_factory.mktemp("thin-out"), tmp_path_factory.mktemp("thin-work"))


def sample_saves(engine: str, root: Path) -> dict[str, Path]:
    """base, lib, app1 saves in the engine's own format, named isep-thin/*, and their inspect JSON."""
    root.mkdir(parents=True, exist_ok=True)
    images = sample_images(SEED[engine], 32)
    out = {}
    for key, name in NAMES.items():
        image = dataclasses.replace(images[key], name=name)
        with open(root / f"{key}.tar", "wb") as fh:
            write_archive(fh, FORMAT[engine], [image])
        (root / f"inspect-{key}.json").write_text(inspect_json(image, FORMAT[engine]))
        out[key] = root / f"{key}.tar"
    return out


def isep(*argv, stdin=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return run(isep_cmd(argv[0]) + [str(a) for a in argv[1:]], env=isep_env(), input=stdin, timeout=timeout)


def shell(script: str) -> subprocess.CompletedProcess:
    """A bash pipeline (pipefail) with the isep commands and the engines' clients as functions."""
    prelude = "".join(f"{name}() {{ {' '.join(isep_cmd(name))} \"$@\"; }}\n"
                      for name in ("index", "pack", "join"))
    return run(["bash", "-o", "pipefail", "-c", prelude + script], env=isep_env(), timeout=TIMEOUT)


def load_argv(engines, engine: str) -> str:
    return " ".join(f"'{a}'" for a in engines.loader_argv(engine))


def images_of(engines, engine: str) -> list[str]:
    """The isep-thin images an engine holds (name and id), sorted."""
    if engine == "ctr":
        r = engines.ctr("images", "ls", timeout=60)
        rows = [line.split()[:3] for line in r.stdout.decode().splitlines()[1:]]
        return sorted(f"{row[0]} {row[2]}" for row in rows if "isep-thin/" in row[0])
    r = engines.docker(engine, "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}", timeout=60)
    assert r.returncode == 0, tail(r.stderr)
    return sorted(line for line in r.stdout.decode().splitlines() if line.startswith("isep-thin/"))


def remove_all(engines, engine: str) -> None:
    if engine == "ctr":
        names = [line.split()[0] for line in images_of(engines, engine)]
        if names:
            engines.ctr("images", "rm", "--sync", *names, timeout=120)
    else:
        for line in images_of(engines, engine):
            engines.docker(engine, "rmi", "-f", line.split()[0], timeout=120)
    assert images_of(engines, engine) == []


def load_file(engines, engine: str, archive: Path) -> None:
    r = run(engines.loader_argv(engine), input=archive.read_bytes(), timeout=TIMEOUT)
    assert r.returncode == 0, f"{engine} load {archive.name}: {tail(r.stderr or r.stdout)}"


def have_ref(engines, engine: str, saves: dict[str, Path], keys: list[str], work: Path) -> Path:
    """What the device would give --have: `docker inspect` of the loaded images (for ctr, which has
    no inspect, isep indexes of the saves it imported)."""
    path = work / f"have-{'-'.join(keys)}.json"
    if engine == "ctr":
        path.write_bytes(isep("index", saves[keys[-1]]).stdout)
        return path
    r = engines.docker(engine, "inspect", *[NAMES[k] for k in keys], timeout=60)
    assert r.returncode == 0, tail(r.stderr)
    path.write_bytes(r.stdout)
    return path


def loaded_layers(engines, engine: str) -> list[str]:
    name = NAMES["app1"]
    if engine == "ctr":
        digest = dict(line.split() for line in images_of(engines, engine))[f"docker.io/{name}"]
        return _ctr_diff_ids(engines, digest)
    r = engines.docker(engine, "image", "inspect", name, timeout=60)
    assert r.returncode == 0, f"{engine}: {name} not loaded: {tail(r.stderr)}"
    doc = json.loads(r.stdout)[0]
    assert name in doc["RepoTags"], doc["RepoTags"]
    return doc["RootFS"]["Layers"]


def _ctr_diff_ids(engines, digest: str) -> list[str]:
    doc = json.loads(engines.ctr("content", "get", digest, timeout=60).stdout)
    if "manifests" in doc:
        amd64 = [d for d in doc["manifests"] if (d.get("platform") or {}).get("architecture") == "amd64"]
        return _ctr_diff_ids(engines, amd64[0]["digest"])
    config = json.loads(engines.ctr("content", "get", doc["config"]["digest"], timeout=60).stdout)
    return config["rootfs"]["diff_ids"]


@pytest.mark.parametrize("engine", DOCKERS + ["ctr"])
def test_thin_join_loads_from_app_only_store_and_stream(thin_engines, engine, tmp_path):
    engines = thin_engines
    with lib.cell("thin", "isep-join --have (app-only store, app-only stream)", engine):
        saves = sample_saves(engine, tmp_path / "saves")
        want = json.loads((tmp_path / "saves" / "inspect-app1.json").read_text())[0]["RootFS"]["Layers"]
        remove_all(engines, engine)
        load_file(engines, engine, saves["base"])
        load_file(engines, engine, saves["lib"])
        have = have_ref(engines, engine, saves, ["base", "lib"], tmp_path)
        pack = (f"pack '{saves['app1']}' --base '{tmp_path}/saves/inspect-base.json' "
                f"--lib '{tmp_path}/saves/inspect-lib.json'")
        store = tmp_path / "app-only"
        r = shell(f"{pack} -o '{store}' --parts app")
        assert r.returncode == 0, tail(r.stderr)
        assert {p.name for p in store.iterdir() if p.name.endswith(".zst")} == {
            p["file"] for p in json.loads((store / "isep-bundle.json").read_text())["parts"]}
        # the archive is thin: none of base's or lib's layer files is in it
        thin = isep("join", store, "--have", have)
        assert thin.returncode == 0, tail(thin.stderr)
        with tarfile.open(fileobj=io.BytesIO(thin.stdout)) as tar:
            names = set(tar.getnames())
        for key in ("base", "lib"):
            index = json.loads(isep("index", saves[key]).stdout)
            layer_files = {layer["member"] for layer in index["images"][0]["layers"]}
            assert layer_files and not layer_files & names, f"{key} layer files in the thin archive"
        for how in (f"join '{store}' --have '{have}'", f"{pack} -o - --parts app | join - --have '{have}'"):
            r = shell(f"{how} | {load_argv(engines, engine)}")
            assert r.returncode == 0, f"{how}: {tail(r.stderr or r.stdout)}"
            assert loaded_layers(engines, engine) == want
            if engine == "ctr":
                engines.ctr("images", "rm", "--sync", f"docker.io/{NAMES['app1']}", timeout=120)
            else:
                engines.docker(engine, "rmi", NAMES["app1"], timeout=120)
        remove_all(engines, engine)


@pytest.mark.parametrize("engine", DOCKERS + ["ctr"])
def test_thin_join_refuses_a_layer_the_engine_lacks(thin_engines, engine, tmp_path):
    engines = thin_engines
    with lib.cell("thin", "refusal: the engine lacks lib (exit 6, engine unchanged)", engine):
        saves = sample_saves(engine, tmp_path / "saves")
        remove_all(engines, engine)
        load_file(engines, engine, saves["base"])
        have = have_ref(engines, engine, saves, ["base"], tmp_path)
        before = images_of(engines, engine)
        store = tmp_path / "app-only"
        assert isep("pack", saves["app1"], "--base", tmp_path / "saves" / "inspect-base.json", "--lib",
                    tmp_path / "saves" / "inspect-lib.json", "-o", store, "--parts", "app").returncode == 0
        r = shell(f"join '{store}' --have '{have}' | {load_argv(engines, engine)}; "
                  f"echo \"rc=${{PIPESTATUS[0]}}\" >&2")
        assert "rc=6" in r.stderr.decode(), tail(r.stderr)
        assert "layer 2 (sha256:" in r.stderr.decode(), tail(r.stderr)  # base has 2 layers: lib's first is missing
        assert images_of(engines, engine) == before
        remove_all(engines, engine)


def test_podman_inspect_refused_and_podman_refuses_thin_archives(thin_engines, tmp_path):
    engines = thin_engines
    with lib.cell("thin", "podman: inspect JSON as --have refused (exit 2); podman load refuses a thin archive",
                  "podman"):
        saves = sample_saves("podman", tmp_path / "saves")
        names = [NAMES[k] for k in ("base", "lib", "app1")]
        engines.podman("rmi", "-f", "--ignore", *names, *[f"localhost/{n}" for n in names], timeout=120)
        load_file(engines, "podman", saves["base"])
        load_file(engines, "podman", saves["lib"])
        r = engines.podman("inspect", f"localhost/{NAMES['base']}", f"localhost/{NAMES['lib']}", timeout=60)
        if r.returncode != 0:  # podman keeps a docker-archive's own name when it is fully qualified
            r = engines.podman("inspect", NAMES["base"], NAMES["lib"], timeout=60)
        assert r.returncode == 0, tail(r.stderr)
        have = tmp_path / "podman-inspect.json"
        have.write_bytes(r.stdout)
        store = tmp_path / "store"
        assert isep("pack", saves["app1"], "--base", tmp_path / "saves" / "inspect-base.json", "--lib",
                    tmp_path / "saves" / "inspect-lib.json", "-o", store, "--parts", "app").returncode == 0
        refused = isep("join", store, "--have", have)
        assert refused.returncode == 2 and refused.stdout == b"", tail(refused.stderr)
        assert b"podman" in refused.stderr and b"leave out --have" in refused.stderr
        # the reason: podman load refuses what docker loads (an index names the same chains)
        index = tmp_path / "lib.index.json"
        index.write_bytes(isep("index", saves["lib"]).stdout)
        r = shell(f"join '{store}' --have '{index}' | {load_argv(engines, 'podman')}")
        assert r.returncode != 0
        assert b"missing" in (r.stderr + r.stdout), tail(r.stderr or r.stdout)
        engines.podman("rmi", "-f", "--ignore", *names, *[f"localhost/{n}" for n in names], timeout=120)
