"""Several versions of a base under one floating tag in one store (docs/deltas.md §8): the rebuilt
base's part takes a chainID-suffixed name beside the first, both apps join byte for byte, and a new
base ships as a delta against the old one."""
from __future__ import annotations

import io
import json
import subprocess

import pytest

from isep.deltarank import LayerInfo, rank_references
from isep.legacy import chain_ids
from isep.names import versioned_part_name
from isep.samples import Image, inspect_json, write_archive
from isep.tarstream import Source, TarReader
from tests.harness import bundle_doc, command_argv, copy_store, isep
from tests.release_samples import base_layer, code_layer, deps_layer

OLD_BASE = "base_12_base_image.tar.zst"


def floating_saves(out, prefix: str = "isep-float") -> dict:
    """PREFIX/app:1 on base v1 and PREFIX/app:2 on base v2, both bases tagged PREFIX/base:12; lib and
    app layers alike."""
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for n in (1, 2):
        base = Image(f"{prefix}/base:12", [base_layer(n)])
        app = Image(f"{prefix}/app:{n}", [base_layer(n), deps_layer(1), code_layer(1)])
        (out / f"base{n}.json").write_text(inspect_json(base, "docker-oci"))
        with open(out / f"app{n}.tar", "wb") as fh:
            write_archive(fh, "docker-oci", [app])
        made[f"base{n}"], made[f"app{n}"] = out / f"base{n}.json", out / f"app{n}.tar"
        made[f"stack{n}"] = json.loads(made[f"base{n}"].read_text())[0]["RootFS"]["Layers"]
    return made


@pytest.fixture(scope="module")
def fl(tmp_path_factory):
    root = tmp_path_factory.mktemp("floating")
    made = floating_saves(root / "saves")
    isep("pack", made["app1"], "--base", made["base1"], "-o", root / "v1", check=0)
    return {**made, "root": root, "v1": root / "v1"}


def new_base_name(fl) -> str:
    return versioned_part_name(OLD_BASE, "base", fl["stack2"])


def test_versioned_name_inserts_the_chain_id():
    ids = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    chain = chain_ids(ids)[-1][7:19]
    assert versioned_part_name("base_bookworm_base_image.tar.zst", "base", ids) == \
        f"base_bookworm_{chain}_base_image.tar.zst"
    assert versioned_part_name("mybase.tar.gz", "base", ids) == f"mybase_{chain}.tar.gz"


def test_two_versions_coexist_and_both_join(fl, tmp_path):
    store = copy_store(fl["v1"], tmp_path / "store")
    isep("pack", fl["app2"], "--base", fl["base2"], "-o", store, check=0)
    doc = bundle_doc(store)
    bases = {p["file"]: p["diff_ids"] for p in doc["parts"] if p["role"] == "base"}
    assert bases == {OLD_BASE: fl["stack1"], new_base_name(fl): fl["stack2"]}
    app2 = next(im for im in doc["images"] if im["tags"] == ["isep-float/app:2"])
    assert app2["parts"][0] == new_base_name(fl)
    assert (store / OLD_BASE).is_file() and (store / new_base_name(fl)).is_file()
    assert isep("join", store, "isep-float/app:1", check=0).stdout == fl["app1"].read_bytes()
    assert isep("join", store, "isep-float/app:2", check=0).stdout == fl["app2"].read_bytes()
    isep("verify", store, check=0)
    # isula-build's manifest names each app's own base
    isula = json.loads((store / "manifest").read_text())
    assert isula["isep-float/app:1"]["base"] == OLD_BASE
    assert isula["isep-float/app:2"]["base"] == new_base_name(fl)


def test_a_third_pack_of_either_version_reuses_its_part(fl, tmp_path):
    store = copy_store(fl["v1"], tmp_path / "store")
    isep("pack", fl["app2"], "--base", fl["base2"], "-o", store, check=0)
    before = sorted(p.name for p in store.iterdir())
    for n in (1, 2):
        isep("pack", fl[f"app{n}"], "--base", fl[f"base{n}"], "-o", store, check=0)
    assert sorted(p.name for p in store.iterdir()) == before
    assert isep("join", store, "isep-float/app:2", check=0).stdout == fl["app2"].read_bytes()


def _stream_doc(stream: bytes) -> dict:
    for member in TarReader(Source(io.BytesIO(stream), prefetch=False)):
        if member.name == "isep-bundle.json":
            return json.loads(member.read_all(1 << 24))
        member.skip()
    raise AssertionError("no manifest in the stream")


def test_new_base_ships_as_a_delta_against_the_old_one(fl, tmp_path):
    stream = isep("pack", fl["app2"], "--base", fl["base2"], "-o", "-", "--delta-from", fl["v1"], check=0).stdout
    doc = _stream_doc(stream)
    base = next(p for p in doc["parts"] if p["role"] == "base")
    assert base["file"] == new_base_name(fl)  # the sender already names it as the device will keep it
    kinds = {rec["sha256"]: (rec.get("from") or {}).get("kind") for p in doc["parts"] for rec in p["members"]
             if rec["type"] == "file" and rec["sha256"] in doc["images"][0]["diff_ids"]}
    assert kinds[fl["stack2"][0]] == "delta"
    assert base["needs"][0]["part"] == OLD_BASE
    assert sorted(k for k in kinds.values() if k != "delta") == ["reference", "reference"]
    assert len(stream) < 150_000
    device = copy_store(fl["v1"], tmp_path / "device")
    got = isep("join", device, "-", "--keep", stdin=stream, check=0).stdout
    assert got == fl["app2"].read_bytes()
    kept = bundle_doc(device)
    assert {p["file"] for p in kept["parts"] if p["role"] == "base"} == {OLD_BASE, new_base_name(fl)}
    for n in (1, 2):
        assert isep("join", device, f"isep-float/app:{n}", check=0).stdout == fl[f"app{n}"].read_bytes()
    isep("verify", "--deep", device, check=0)


def test_keep_renames_a_plain_stream_base_beside_the_old_one(fl, tmp_path):
    """A sender that did not know the device's store names the new base as the old one: --keep keeps
    it under the suffixed name instead of refusing, and the image follows it."""
    stream = isep("pack", fl["app2"], "--base", fl["base2"], "-o", "-", check=0).stdout
    assert {p["file"] for p in _stream_doc(stream)["parts"]} >= {OLD_BASE}
    device = copy_store(fl["v1"], tmp_path / "device")
    assert isep("join", device, "-", "--keep", stdin=stream, check=0).stdout == fl["app2"].read_bytes()
    kept = bundle_doc(device)
    app2 = next(im for im in kept["images"] if im["tags"] == ["isep-float/app:2"])
    assert app2["parts"][0] == new_base_name(fl)
    assert (device / new_base_name(fl)).is_file()
    for n in (1, 2):
        assert isep("join", device, f"isep-float/app:{n}", check=0).stdout == fl[f"app{n}"].read_bytes()
    isep("verify", device, check=0)


def test_pipe_into_keep_through_real_pipes(fl, tmp_path):
    device = copy_store(fl["v1"], tmp_path / "device")
    pack = subprocess.Popen(command_argv("pack", [fl["app2"], "--base", fl["base2"], "-o", "-",
                                                  "--delta-from", fl["v1"]]), stdout=subprocess.PIPE)
    join = subprocess.run(command_argv("join", [device, "-", "--keep"]), stdin=pack.stdout,
                          capture_output=True, timeout=600)
    pack.stdout.close()
    assert pack.wait(timeout=600) == 0 and join.returncode == 0, join.stderr
    assert join.stdout == fl["app2"].read_bytes()
    assert (device / new_base_name(fl)).is_file() and (device / OLD_BASE).is_file()


def test_a_stream_naming_the_old_base_joins_by_layers(fl, tmp_path):
    """The image names the old base's file but carries the new stack (a store holding both): the part
    is found by its layers, not taken by name."""
    store = copy_store(fl["v1"], tmp_path / "store")
    isep("pack", fl["app2"], "--base", fl["base2"], "-o", store, check=0)
    doc = bundle_doc(store)
    for im in doc["images"]:
        if im["tags"] == ["isep-float/app:2"]:
            im["parts"][0] = OLD_BASE
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    assert isep("join", store, "isep-float/app:2", check=0).stdout == fl["app2"].read_bytes()


def test_ties_in_rank_references_prefer_the_newest():
    target = LayerInfo("sha256:" + "0" * 64, 1000, "r", 0, "base")
    old = LayerInfo("sha256:" + "1" * 64, 1000, "r", 0, "base", newness=0)
    new = LayerInfo("sha256:" + "f" * 64, 1000, "r", 0, "base", newness=3)
    assert [c.diff_id for c in rank_references(target, [old, new])] == [new.diff_id, old.diff_id]


STABLE_APP = "app_stable_app_image.tar.zst"


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    """Three releases of one floating app tag, isep-float/app:stable (code, then code and deps
    changed), on one base; release 1 packed into the build host's store."""
    root = tmp_path_factory.mktemp("stable")
    base = Image("isep-float/base:12", [base_layer(1)])
    (root / "base.json").write_text(inspect_json(base, "docker-oci"))
    made = {"root": root, "base": root / "base.json"}
    for n, deps in ((1, 1), (2, 1), (3, 2)):
        image = Image("isep-float/app:stable", [base_layer(1), deps_layer(deps), code_layer(n)])
        with open(root / f"r{n}.tar", "wb") as fh:
            write_archive(fh, "docker-oci", [image])
        made[f"r{n}"] = root / f"r{n}.tar"
    isep("pack", made["r1"], "--base", made["base"], "-o", root / "build", check=0)
    return made


def _release_stream(stable, n: int, store) -> bytes:
    return isep("pack", stable[f"r{n}"], "--base", stable["base"], "--parts", "app", "--delta-from", store,
                "-o", "-", check=0).stdout


def test_a_device_follows_a_floating_app_tag(stable, tmp_path):
    """Each release of app:stable is kept beside the last (the new app part chainID-suffixed, as a
    rebuilt base's is); a join by the tag gives the newest, an older one is there by config digest;
    a build host that keeps each release the same way (its stream piped into isep-join BUILD - --keep)
    makes release 3 a delta against release 2 on both sides; prune drops what the tag left behind."""
    build = copy_store(stable["root"] / "build", tmp_path / "build")
    device = copy_store(build, tmp_path / "device")
    r1_config = bundle_doc(device)["images"][0]["config"]["digest"]
    for n in (2, 3):
        stream = _release_stream(stable, n, build)
        assert isep("join", device, "-", "--keep", stdin=stream, check=0).stdout == stable[f"r{n}"].read_bytes()
        isep("join", build, "-", "--keep", stdin=stream, check=0)
        apps = [p["file"] for p in bundle_doc(device)["parts"] if p["role"] == "app"]
        assert len(apps) == n and apps[0] == STABLE_APP and all(a.startswith("app_stable_") for a in apps)
        assert isep("join", device, "isep-float/app:stable", check=0).stdout == stable[f"r{n}"].read_bytes()
    r3_needs = _stream_doc(stream)["parts"][0]["needs"]
    # release 3 reads layers of the parts both stores hold, its code layer from release 2's (the newest)
    assert {need["part"] for need in r3_needs} <= set(apps[:2]) and apps[1] in {need["part"] for need in r3_needs}
    assert isep("join", device, r1_config, check=0).stdout == stable["r1"].read_bytes()
    isep("verify", "--deep", device, check=0)
    isep("prune", device, "--keep", "isep-float/app:stable", check=0)
    assert [p["file"] for p in bundle_doc(device)["parts"] if p["role"] == "app"] == [apps[2]]
    assert isep("join", device, "isep-float/app:stable", check=0).stdout == stable["r3"].read_bytes()


def test_the_build_host_packs_each_release_of_a_floating_tag_into_its_store(stable, tmp_path):
    """isep-pack -o BUILD of app:stable again: the new release's app part takes the chainID-suffixed
    name beside the last (base reused), isula-build's manifest entry for the tag moves to it, a join
    by the tag takes the newest; the next release's stream names its part as the device will keep it."""
    build = copy_store(stable["root"] / "build", tmp_path / "build")
    device = copy_store(build, tmp_path / "device")
    isep("pack", stable["r2"], "--base", stable["base"], "-o", build, check=0)
    apps = [p["file"] for p in bundle_doc(build)["parts"] if p["role"] == "app"]
    assert len(apps) == 2 and apps[0] == STABLE_APP and apps[1].startswith("app_stable_")
    assert json.loads((build / "manifest").read_text())["isep-float/app:stable"]["app"] == apps[1]
    assert isep("join", build, "isep-float/app:stable", check=0).stdout == stable["r2"].read_bytes()
    isep("join", device, "-", "--keep", stdin=_release_stream(stable, 2, stable["root"] / "build"), check=0)
    stream = _release_stream(stable, 3, build)
    assert _stream_doc(stream)["parts"][0]["file"].startswith("app_stable_")
    assert isep("join", device, "-", "--keep", stdin=stream, check=0).stdout == stable["r3"].read_bytes()
    isep("pack", stable["r3"], "--base", stable["base"], "-o", build, check=0)
    assert sorted(p["file"] for p in bundle_doc(device)["parts"]) == sorted(p["file"] for p in bundle_doc(build)["parts"])
    isep("verify", build, check=0)
