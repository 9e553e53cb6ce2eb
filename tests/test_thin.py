"""isep-join --have: thin archives that leave out the layer files the loading engine holds.

On real archives of every producer: what a thin join leaves out is exactly the members of the
covered layers (legacy `<v1id>/` directories, podman's `<diffID>.tar` and the symlinks to it, OCI
blobs, the containerd store's gzip blobs), everything else is kept byte for byte, and the result is
the same from a full store, an app-only store and an app-only bundle stream. Refusals come before
the first byte of output."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from isep.refs import Held
from isep.thin import covered_layers, left_out_members
from tests.harness import REAL, WITH_INSPECT, pipeline, run

FOLDERS = ["docker-legacy", "docker-oci", "docker-cstore", "podman-docker-archive", "podman-oci-archive"]
A, B, C, D = (f"sha256:{c * 64}" for c in "abcd")


def members(data: bytes) -> dict[str, bytes | str]:
    """name -> file bytes (or link target, or 'dir') of a tar."""
    out: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            if info.isfile():
                fh = tar.extractfile(info)
                out[info.name] = fh.read() if fh else b""
            else:
                out[info.name] = info.linkname if info.issym() else "dir"
    return out


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory):
    """Per producer: the indexes of base and lib, a full store and an app-only store of app1, and
    the full join."""
    made = {}
    for folder in FOLDERS:
        root = tmp_path_factory.mktemp(folder)
        base, lib = root / "base.json", root / "lib.json"
        base.write_bytes(run("index", REAL / folder / "base.tar").stdout)
        lib.write_bytes(run("index", REAL / folder / "lib.tar").stdout)
        pack = [REAL / folder / "app1.tar", "--base", base, "--lib", lib]
        run("pack", *pack, "-o", root / "full")
        run("pack", *pack, "-o", root / "app-only", "--parts", "app")
        full = run("join", root / "full").stdout
        made[folder] = {"root": root, "base": base, "lib": lib, "pack": pack, "full": full}
    return made


# --- the leave-out decision ----------------------------------------------------------------------

def test_covered_layers_counts_whole_chains_only():
    assert covered_layers([A, B, C], [Held("base", [A])]) == 1
    assert covered_layers([A, B, C], [Held("base", [A]), Held("lib", [A, B])]) == 2
    assert covered_layers([A, B, C], [Held("other", [D, B, C])]) == 0  # same layers on another base
    assert covered_layers([A, B], [Held("bigger", [A, B, C])]) == 2
    assert covered_layers([A, B], []) == 0


def rec(name, kind="file", link=None):
    return {"name": name, "type": kind, "link": link}


def test_left_out_legacy_directory_and_podman_symlinks():
    records = [rec("b1/"), rec("b1/VERSION"), rec("b1/json"), rec("b1/layer.tar"),
               rec("a1/"), rec("a1/VERSION"), rec("a1/json"), rec("a1/layer.tar"), rec("cfg.json")]
    assert left_out_members(records, ["b1/layer.tar", "a1/layer.tar"], 1) == \
        {"b1/", "b1/VERSION", "b1/json", "b1/layer.tar"}
    podman = [rec("aaa.tar"), rec("v1/layer.tar", "symlink", "../aaa.tar"), rec("v1/json"), rec("v1/VERSION"),
              rec("bbb.tar"), rec("v2/layer.tar", "symlink", "../bbb.tar"), rec("v2/json")]
    assert left_out_members(podman, ["aaa.tar", "bbb.tar"], 1) == {"aaa.tar", "v1/layer.tar", "v1/json",
                                                                   "v1/VERSION"}


def test_left_out_keeps_a_file_an_uncovered_layer_shares():
    # the same diffID at layers 0 and 2 (Docker links the second layer.tar to the first)
    records = [rec("x/layer.tar"), rec("y/layer.tar"), rec("z/layer.tar", "symlink", "../x/layer.tar")]
    assert left_out_members(records, ["x/layer.tar", "y/layer.tar", "z/layer.tar"], 2) == {"y/layer.tar"}
    assert left_out_members(records, ["x/layer.tar", "y/layer.tar", "z/layer.tar"], 0) == set()


# --- real archives of every producer ------------------------------------------------------------------

@pytest.mark.parametrize("folder", FOLDERS)
def test_thin_join_leaves_out_exactly_the_covered_layers(real_sets, folder):
    s = real_sets[folder]
    doc = json.loads((s["root"] / "full" / "isep-bundle.json").read_text())
    thin = run("join", s["root"] / "full", "--have", s["base"], "--have", s["lib"]).stdout
    full, kept = members(s["full"]), members(thin)
    # base and lib parts hold exactly their layers' members (legacy dirs, podman links, blobs)
    covered = {m["name"].rstrip("/") for p in doc["parts"] if p["role"] != "app" for m in p["members"]}
    assert covered and set(full) - set(kept) == covered
    assert all(kept[name] == full[name] for name in kept)  # everything else verbatim
    assert {"manifest.json", "index.json"} & set(kept)
    # only base covered: only the base part's members go
    base_only = members(run("join", s["root"] / "full", "--have", s["base"]).stdout)
    base_members = {m["name"].rstrip("/") for p in doc["parts"] if p["role"] == "base" for m in p["members"]}
    assert set(full) - set(base_only) == base_members


@pytest.mark.parametrize("folder", FOLDERS)
def test_thin_join_is_the_same_from_an_app_only_store_and_stream(real_sets, folder):
    s = real_sets[folder]
    have = ["--have", s["base"], "--have", s["lib"]]
    from_full = run("join", s["root"] / "full", *have).stdout
    assert run("join", s["root"] / "app-only", *have).stdout == from_full
    pack = " ".join(f"'{a}'" for a in s["pack"])
    piped = pipeline(f"isep-pack {pack} -o - --parts app | isep-join - --have '{s['base']}' --have '{s['lib']}'")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == from_full
    # into a store that holds only app parts
    piped = pipeline(f"isep-pack {pack} -o - --parts app | isep-join '{s['root'] / 'app-only'}' - "
                     f"--have '{s['base']}' --have '{s['lib']}'")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == from_full


@pytest.mark.parametrize("folder", [f for f in WITH_INSPECT if f.startswith("docker")])
def test_docker_inspect_of_several_images_is_a_have_ref(real_sets, folder, tmp_path):
    s = real_sets[folder]
    both = tmp_path / "inspect.json"
    both.write_text(json.dumps(json.loads((REAL / folder / "inspect-base.json").read_text())
                               + json.loads((REAL / folder / "inspect-lib.json").read_text())))
    expected = run("join", s["root"] / "app-only", "--have", s["base"], "--have", s["lib"]).stdout
    assert run("join", s["root"] / "app-only", "--have", both).stdout == expected
    # through a pipe, as `--have <(docker inspect base lib)` gives it
    piped = pipeline(f"isep-join '{s['root'] / 'app-only'}' --have <(cat '{both}')")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == expected
    # a bundle directory as REF: what loading from it gave the engine, app1 itself included
    everything = members(run("join", s["root"] / "app-only", "--have", s["root"] / "full").stdout)
    assert "manifest.json" in everything and set(everything) < set(members(expected))


# --- refusals ------------------------------------------------------------------------------------

def test_missing_layer_refused_before_any_output(real_sets):
    s = real_sets["docker-oci"]
    res = run("join", s["root"] / "app-only", "--have", s["base"], expect=6)
    assert res.stdout == b""
    assert "layer 1 (sha256:" in res.error and "--have" in res.error
    pack = " ".join(f"'{a}'" for a in s["pack"])
    piped = pipeline(f"isep-pack {pack} -o - --parts app | isep-join - --have '{s['base']}'")
    assert piped.returncode == 6 and piped.stdout == b""
    assert b"layer 1 (sha256:" in piped.stderr
    # without --have an app-only store is not enough either (usage: the base part is not there)
    assert run("join", s["root"] / "app-only", expect=2).stdout == b""


def test_a_have_chain_that_differs_is_a_misfit(real_sets, tmp_path):
    s = real_sets["docker-oci"]
    index = json.loads(s["lib"].read_text())
    ids = index["images"][0]["diff_ids"]
    ids[0] = "sha256:" + "0" * 64  # the lib's layers on another base
    other = tmp_path / "other.json"
    other.write_text(json.dumps(index))
    res = run("join", s["root"] / "app-only", "--have", other, expect=6)
    assert res.stdout == b"" and "layer 0 (" in res.error and "0000000000" in res.error


def test_podman_inspect_refused_with_what_to_do(real_sets):
    s = real_sets["podman-docker-archive"]
    res = run("join", s["root"] / "full", "--have", REAL / "podman-docker-archive" / "inspect-base.json", expect=2)
    assert res.stdout == b"" and "podman" in res.error and "leave out --have" in res.error


def test_normalize_with_have_refused(real_sets):
    s = real_sets["docker-oci"]
    res = run("join", s["root"] / "full", "--have", s["base"], "--normalize", expect=2)
    assert res.stdout == b""


def test_a_manifest_naming_other_diff_ids_than_the_config_fails(real_sets, tmp_path):
    """--have is matched against the bundle manifest's diffIDs; the config the loader reads must agree."""
    s = real_sets["docker-oci"]
    store = tmp_path / "store"
    shutil.copytree(s["root"] / "app-only", store)
    doc = json.loads((store / "isep-bundle.json").read_text())
    doc["images"][0]["diff_ids"][0] = "sha256:" + "1" * 64
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    have = tmp_path / "have.json"
    have.write_text(json.dumps({"rootfs": {"diff_ids": doc["images"][0]["diff_ids"][:3]}}))
    res = run("join", store, "--have", have, expect=5)
    assert b"manifest.json" not in res.stdout  # the final metadata is never written


def test_base_and_lib_part_files_deleted_from_a_store(real_sets, tmp_path):
    """The store's manifest still lists the base and lib parts, their files are gone to save room."""
    s = real_sets["docker-legacy"]
    store = tmp_path / "store"
    shutil.copytree(s["root"] / "full", store)
    for part in json.loads((store / "isep-bundle.json").read_text())["parts"]:
        if part["role"] != "app":
            (store / part["file"]).unlink()
    have = ["--have", s["base"], "--have", s["lib"]]
    assert run("join", store, *have).stdout == run("join", s["root"] / "app-only", *have).stdout
    assert run("join", store, "--have", s["base"], expect=6).stdout == b""


@pytest.mark.parametrize("content,status", [
    (b"{not json", 4),                                              # malformed
    (b'{"hello": "world"}', 2),                                     # JSON, but no REF
    (b'[{"RootFS": {"Layers": ["sha256:12"]}}]', 4),                # not a diffID
    (b'{"rootfs": {"diff_ids": []}}', 4),                           # no layers at all
])
def test_bad_have_refs(real_sets, tmp_path, content, status):
    ref = tmp_path / "ref.json"
    ref.write_bytes(content)
    assert run("join", real_sets["docker-oci"]["root"] / "app-only", "--have", ref, expect=status).stdout == b""


def test_have_ref_that_is_not_there(real_sets, tmp_path):
    res = run("join", real_sets["docker-oci"]["root"] / "app-only", "--have", tmp_path / "nothing.json", expect=2)
    assert "--have" in res.error
