"""isep-partition: ordered diffID prefixes, and clear answers when they do not hold."""
from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import REAL, WITH_INSPECT, inspect_layers, isep
from isep.errors import ExitStatus, Misfit, UsageError
from isep.partition import load_renames, make_plan
from isep.refs import Ref


def d(n) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def fake_index(images: dict[str, list[str]]) -> dict:
    """A docker-oci-like index: one blob per distinct diffID, a config per image."""
    members, seen = [], {}

    def add(name):
        members.append({"seq": len(members), "name": name, "type": "file", "size": 10, "raw_size": 1024,
                        "offset": 1024 * len(members)})

    out = []
    for tag, ids in images.items():
        for diff in ids:
            if diff not in seen:
                seen[diff] = f"blobs/sha256/{diff[7:]}"
                add(seen[diff])
        config = f"blobs/sha256/{hashlib.sha256(tag.encode()).hexdigest()}"
        add(config)
        out.append({"tags": [tag], "config": {"member": config, "digest": "sha256:" + config[-64:]},
                    "platform": {}, "diff_ids": ids, "owned": [config],
                    "layers": [{"diff_id": x, "path": seen[x], "member": seen[x]} for x in ids]})
    for name in ("index.json", "manifest.json"):
        add(name)
    return {"schema": "isep-index/1", "format": "docker-oci", "images": out, "members": members,
            "source": {"name": "t", "size": 0, "members": len(members), "trailer_size": 1024}}


def ref(name, ids):
    return Ref(display=name, diff_ids=ids, tags=[name])


@pytest.mark.parametrize("folder", WITH_INSPECT)
@pytest.mark.parametrize("app", ["app1", "app2"])
@pytest.mark.parametrize("ref_kind", ["inspect", "index", "name"])
def test_real_split_is_the_prefix_of_rootfs_layers(tmp_path, folder, app, ref_kind):
    base_ids, lib_ids, app_ids = (inspect_layers(folder, x) for x in ("base", "lib", app))
    if ref_kind == "inspect":
        archive = REAL / folder / f"{app}.tar"
        base, lib = REAL / folder / "inspect-base.json", REAL / folder / "inspect-lib.json"
    elif ref_kind == "index":
        archive = REAL / folder / f"{app}.tar"
        for x in ("base", "lib"):
            (tmp_path / f"{x}.json").write_bytes(isep("index", REAL / folder / f"{x}.tar", check=0).stdout)
        base, lib = tmp_path / "base.json", tmp_path / "lib.json"
    else:  # names of images inside one multi-image save: app1+app2 holds no base, so index base+lib+app
        archive = REAL / folder / "app1+app2.tar"
        base, lib = REAL / folder / "inspect-base.json", REAL / folder / "inspect-lib.json"
    index = isep("index", archive, check=0).stdout
    plan = isep("partition", "--base", base, "--lib", lib, stdin=index, check=0).json
    parts = {p["role"]: p for p in plan["parts"] if p["role"] != "app"}
    assert parts["base"]["layers"] == base_ids
    assert parts["lib"]["layers"] == lib_ids[len(base_ids):]
    image = next(im for im in plan["images"] if any(t.endswith(f"/{app}:1") for t in im["tags"]))
    app_part = next(p for p in plan["parts"] if p["file"] == image["app_part"])
    assert app_part["layers"] == app_ids[len(lib_ids):]
    assert base_ids + app_part["layers"][:0] == app_ids[:len(base_ids)]


@pytest.mark.parametrize("folder", WITH_INSPECT)
def test_multi_image_save_gives_one_base_one_lib_two_apps(folder):
    index = isep("index", REAL / folder / "app1+app2.tar", check=0).stdout
    plan = isep("partition", "--base", REAL / folder / "inspect-base.json",
                "--lib", REAL / folder / "inspect-lib.json", stdin=index, check=0).json
    roles = sorted(p["role"] for p in plan["parts"])
    assert roles == ["app", "app", "base", "lib"]
    assert all(im["byte_exact"] is False for im in plan["images"])


def test_name_refs_inside_the_archive(tmp_path):
    """docker save app base | isep-index | isep-partition --base base:1 (names as Docker normalises)"""
    idx = fake_index({"docker.io/library/base:1": [d(1)], "app:2": [d(1), d(2)]})
    (tmp_path / "i.json").write_text(json.dumps(idx))
    plan = isep("partition", tmp_path / "i.json", "--base", "base:1", check=0).json
    assert [p["role"] for p in plan["parts"]] == ["base", "app"]
    assert plan["skipped"] and "base image itself" in plan["skipped"][0]["reason"]
    missing = isep("partition", tmp_path / "i.json", "--base", "nothere:1")
    assert missing.rc == 2 and "it holds: docker.io/library/base:1, app:2" in missing.stderr


def test_multi_layer_base_and_no_lib():
    idx = fake_index({"app:1": [d(1), d(2), d(3), d(4)]})
    plan = make_plan(idx, ref("base:1", [d(1), d(2), d(3)]), None)
    assert [p["layers"] for p in plan["parts"]] == [[d(1), d(2), d(3)], [d(4)]]


def test_app_not_on_base_names_the_position():
    idx = fake_index({"app:1": [d(1), d(9), d(3)]})
    with pytest.raises(Misfit, match=r"app:1 is not built on base base:1: layer 1 is sha256:.*, base base:1 has sha256:"):
        make_plan(idx, ref("base:1", [d(1), d(2)]), None)


def test_lib_not_on_base_and_lib_equal_to_base():
    idx = fake_index({"app:1": [d(1), d(2), d(3)]})
    with pytest.raises(Misfit, match="lib lib:1 is not built on base base:1: layer 0"):
        make_plan(idx, ref("base:1", [d(1)]), ref("lib:1", [d(5), d(2)]))
    with pytest.raises(Misfit, match="same layers as base"):
        make_plan(idx, ref("base:1", [d(1)]), ref("lib:1", [d(1)]))


def test_base_equal_to_the_whole_app():
    idx = fake_index({"app:1": [d(1), d(2)]})
    with pytest.raises(Misfit, match="only the base or lib image itself"):
        make_plan(idx, ref("base:1", [d(1), d(2)]), None)


def test_repeated_layers_keep_their_positions():
    empty = d("empty")
    idx = fake_index({"app:1": [d(1), empty, d(2), empty, empty]})
    plan = make_plan(idx, ref("base:1", [d(1), empty]), None)
    assert plan["parts"][1]["layers"] == [d(2), empty, empty]
    # the repeated empty layer is carried once, by the base
    app_members = {idx["members"][s]["name"] for s in plan["parts"][1]["members"]}
    assert f"blobs/sha256/{empty[7:]}" not in app_members


def test_app_built_on_another_app_warns_and_suggests_a_lib():
    idx = fake_index({"app1:1": [d(1), d(2)], "app2:1": [d(1), d(2), d(3)]})
    plan = make_plan(idx, ref("base:1", [d(1)]), None)
    assert any("a lib image holding it" in w for w in plan["warnings"])
    app2 = next(p for p in plan["parts"] if p.get("image") == "app2:1")
    assert app2["layers"] == [d(2), d(3)]


def test_tags_that_collide_on_part_names():
    idx = fake_index({"a/app:1": [d(1), d(2)], "b/app:1": [d(1), d(3)]})
    with pytest.raises(UsageError, match="would both be written to app_1_app_image.tar.zst"):
        make_plan(idx, ref("base:1", [d(1)]), None)
    plan = make_plan(idx, ref("base:1", [d(1)]), None,
                     renames=load_renames([{"name": "b/app:1", "rename": "b-app.tar.zst"}], "zstd"))
    assert sorted(p["file"] for p in plan["parts"]) == ["app_1_app_image.tar.zst", "b-app.tar.zst",
                                                        "base_1_base_image.tar.zst"]


@pytest.mark.parametrize("target", ["../x", "/etc/x", "manifest", "", "a/b", "isep-bundle.json", "..", "x\x01y"])
def test_bad_rename_targets_are_refused(tmp_path, target):
    (tmp_path / "r.json").write_text(json.dumps([{"name": "app_1_app_image.tar.zst", "rename": target}]))
    idx = fake_index({"app:1": [d(1), d(2)]})
    (tmp_path / "i.json").write_text(json.dumps(idx))
    (tmp_path / "b.json").write_text(json.dumps({"rootfs": {"diff_ids": [d(1)]}}))
    result = isep("partition", tmp_path / "i.json", "--base", tmp_path / "b.json", "--rename", tmp_path / "r.json")
    assert result.rc == 2 and len(result.error_lines) == 1 and result.stdout == b""


def test_duplicate_rename_targets_are_refused():
    idx = fake_index({"app1:1": [d(1), d(2)], "app2:1": [d(1), d(3)]})
    renames = load_renames([{"name": "app1_1_app_image.tar.zst", "rename": "same.tar.zst"},
                            {"name": "app2_1_app_image.tar.zst", "rename": "same.tar.zst"}], "zstd")
    with pytest.raises(UsageError, match="would both be written to same.tar.zst"):
        make_plan(idx, ref("base:1", [d(1)]), None, renames=renames)


def test_isula_rename_file_names_match_our_extension():
    idx = fake_index({"app:1": [d(1), d(2)]})
    renames = load_renames([{"name": "app_1_app_image.tar.gz", "rename": "app.tar.zst"}], "zstd")
    plan = make_plan(idx, ref("base:1", [d(1)]), None, renames=renames)
    assert plan["parts"][1]["file"] == "app.tar.zst"


def test_unknown_ref_form_is_a_usage_error(tmp_path):
    (tmp_path / "weird.json").write_text('{"hello": 1}')
    idx = fake_index({"app:1": [d(1), d(2)]})
    (tmp_path / "i.json").write_text(json.dumps(idx))
    result = isep("partition", tmp_path / "i.json", "--base", tmp_path / "weird.json")
    assert result.rc == 2 and "none of" in result.stderr


stacks = st.lists(st.integers(0, 6), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(app=stacks, base=stacks, lib_extra=st.lists(st.integers(0, 6), max_size=3), use_lib=st.booleans())
def test_a_split_is_exactly_the_prefix_rule_or_a_documented_failure(app, base, lib_extra, use_lib):
    app_ids, base_ids = [d(x) for x in app], [d(x) for x in base]
    lib_ids = base_ids + [d(x) for x in lib_extra] if use_lib else None
    idx = fake_index({"app:1": app_ids})
    try:
        plan = make_plan(idx, ref("base:1", base_ids), ref("lib:1", lib_ids) if lib_ids else None)
    except (Misfit, UsageError) as exc:
        assert exc.status in (ExitStatus.MISFIT, ExitStatus.USAGE)
        fits = app_ids[:len(base_ids)] == base_ids and (lib_ids is None or (
            app_ids[:len(lib_ids)] == lib_ids and len(lib_ids) > len(base_ids)))
        below = len(lib_ids or base_ids)
        assert not fits or len(app_ids) <= below
        return
    parts = {p["role"]: p for p in plan["parts"]}
    assert app_ids[:len(base_ids)] == base_ids == parts["base"]["layers"]
    below = len(base_ids)
    if lib_ids:
        assert app_ids[:len(lib_ids)] == lib_ids
        assert parts["lib"]["layers"] == lib_ids[len(base_ids):]
        below = len(lib_ids)
    assert parts["app"]["layers"] == app_ids[below:] and below < len(app_ids)
