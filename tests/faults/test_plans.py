"""Edited plans and damaged stores that pack used to accept and then verify/join refused: a plan is
untrusted input (pack --plan exits 4 naming the field, writes nothing), and a part the store's
manifest lists for reuse must be there as recorded (gone: written again; not as recorded: exit 5)."""
from __future__ import annotations

import json

import pytest

from tests.harness import bundle_doc, copy_store, part_files, run


@pytest.fixture(scope="module")
def plans(samples, tmp_path_factory):
    """Plans of app1 (base + lib) and of app1+app2 (two app parts, base only), as isep-partition makes them."""
    s = samples["docker-oci"]
    root = tmp_path_factory.mktemp("plans")
    out = {}
    for key, archive, lib in (("app1", "app1", True), ("two", "app1+app2", False)):
        index = run("index", s[archive]).stdout
        refs = ["--base", str(s["inspect-base"])] + (["--lib", str(s["inspect-lib"])] if lib else [])
        out[key] = json.loads(run("partition", *refs, stdin=index).stdout)
        (root / f"{key}.json").write_text(json.dumps(out[key]))
    return out


def _part(plan: dict, role: str) -> dict:
    return next(p for p in plan["parts"] if p["role"] == role)


def _layer_seq(plan: dict, diff_id: str) -> int:
    return next(m["seq"] for m in plan["members"] if m.get("layer_diff_id") == diff_id)


def _app_layer_into_base(plan: dict) -> None:
    """The last app part's last layer (private to its image) moved into the base part: the case where
    another app later packed into the same store would ship it."""
    app = [p for p in plan["parts"] if p["role"] == "app"][-1]
    seq = _layer_seq(plan, app["layers"][-1])
    for part in plan["parts"]:
        if seq in part["members"]:
            part["members"].remove(seq)
    _part(plan, "base")["members"] = sorted(_part(plan, "base")["members"] + [seq])


def _base_layer_into_app(plan: dict) -> None:
    seq = _layer_seq(plan, _part(plan, "base")["layers"][0])
    _part(plan, "base")["members"].remove(seq)
    _part(plan, "app")["members"] = sorted(_part(plan, "app")["members"] + [seq])


def _config_out_of_app(plan: dict) -> None:
    config = plan["images"][0]["config"]["member"]
    seq = next(m["seq"] for m in plan["members"] if m["name"] == config)
    _part(plan, "app")["members"].remove(seq)
    _part(plan, "lib")["members"] = sorted(_part(plan, "lib")["members"] + [seq])


EDITS = {  # name -> (plan key, edit, words the error must contain)
    "empty-app-part": ("app1", lambda p: _part(p, "app").update(members=[]), "parts[2].members is empty"),
    "member-numbers-as-strings": ("app1", lambda p: _part(p, "app").update(
        members=[str(s) for s in _part(p, "app")["members"]]), "parts[2].members[0]"),
    "member-number-bool": ("app1", lambda p: _part(p, "app")["members"].__setitem__(0, True), "members[0]"),
    "member-number-out-of-range": ("app1", lambda p: _part(p, "app")["members"].append(10 ** 6), "member number"),
    "member-number-repeated": ("app1", lambda p: _part(p, "app")["members"].append(_part(p, "app")["members"][-1]),
                               "repeats"),
    "member-in-no-part": ("app1", lambda p: _part(p, "app")["members"].pop(), "in no part"),
    "member-in-base-and-app": ("app1", lambda p: _part(p, "app").update(
        members=sorted(set(_part(p, "app")["members"]) | {_part(p, "base")["members"][0]})), "base or lib part"),
    "app-layer-in-base-part": ("app1", _app_layer_into_base, "carries a app layer but is routed to the base"),
    "base-layer-in-app-part": ("app1", _base_layer_into_app, "carries a base layer but is routed to the app"),
    "config-not-in-app-part": ("app1", _config_out_of_app, "config.member"),
    "schema": ("app1", lambda p: p.update(schema="isep-plan/9"), "not an isep plan"),
    "compression": ("app1", lambda p: p.update(compression="lzma"), "plan.compression"),
    "members-not-list": ("app1", lambda p: p.update(members={}), "plan.members is not a list"),
    "member-seq-wrong": ("app1", lambda p: p["members"][3].update(seq=7), "plan.members[3].seq"),
    "member-size-string": ("app1", lambda p: p["members"][0].update(size="1"), "plan.members[0].size"),
    "member-sha256-not-digest": ("app1", lambda p: p["members"][0].update(sha256="md5:x"), "plan.members[0].sha256"),
    "trailer-size-odd": ("app1", lambda p: p.update(trailer_size=1500), "trailer_size"),
    "part-file-traversal": ("app1", lambda p: _part(p, "app").update(file="../evil.tar.zst"), "parts[2].file"),
    "part-role-unknown": ("app1", lambda p: _part(p, "lib").update(role="root"), "parts[1].role"),
    "part-file-twice": ("app1", lambda p: _part(p, "lib").update(file=_part(p, "base")["file"]), "one file twice"),
    "lib-part-without-lib": ("app1", lambda p: p.update(lib=None), "one base part"),
    "base-part-other-layers": ("app1", lambda p: _part(p, "base")["diff_ids"].pop(), "base"),
    "app-part-other-layers": ("app1", lambda p: _part(p, "app")["layers"].pop(), "app_part"),
    "image-parts-wrong": ("app1", lambda p: p["images"][0]["parts"].reverse(), "images[0].parts"),
    "image-app-part-unknown": ("app1", lambda p: p["images"][0].update(app_part="x.tar.zst"), "app_part"),
    "image-diff-ids-not-on-base": ("app1", lambda p: p["images"][0]["diff_ids"].__setitem__(0, "sha256:" + "0" * 64),
                                   "diff_ids"),
    "legacy-layers-not-pairs": ("app1", lambda p: p["images"][0].update(legacy_layers=[1]), "legacy_layers[0]"),
    "source-format-an-object": ("app1", lambda p: p["source"].update(format={}), "plan.source.format"),
    "compression-a-list": ("app1", lambda p: p.update(compression=["zstd"]), "plan.compression"),
    "second-app-part-empty": ("two", lambda p: [q for q in p["parts"] if q["role"] == "app"][1].update(members=[], rewrite=[]),
                              "is empty"),
    "app-layer-of-app2-in-base": ("two", _app_layer_into_base, "routed to the base"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_plan_is_refused(case, plans, samples, sb):
    key, edit, words = EDITS[case]
    plan = json.loads(json.dumps(plans[key]))
    edit(plan)
    path = sb.put("plan.json", json.dumps(plan).encode())
    archive = samples["docker-oci"]["app1" if key == "app1" else "app1+app2"]
    r = run("pack", archive, "--plan", path, "-o", sb.out, expect=4, sandbox=sb)
    assert words in r.error, r.error
    assert not sb.out.exists() or not (sb.out / "isep-bundle.json").exists()


ISULA_EDITS = {  # name -> (edit, words, whether the plain layout packs it); once KeyError/TypeError (exit 1)
    "no-legacy-layers": (lambda p: p["images"][0].pop("legacy_layers"), "images[0].legacy_layers", True),
    "no-config-digest": (lambda p: p["images"][0]["config"].pop("digest"), "images[0].config.digest", False),
    "config-digest-not-a-digest": (lambda p: p["images"][0]["config"].update(digest="sha256:x"),
                                   "images[0].config.digest", False),
}


@pytest.mark.parametrize("case", sorted(ISULA_EDITS))
def test_edited_plan_is_refused_in_isula_layout(case, plans, samples, sb):
    """isula-build's layout needs each image's legacy layer IDs, which the plain layout does without;
    both need the config digest."""
    edit, words, plain_packs = ISULA_EDITS[case]
    plan = json.loads(json.dumps(plans["app1"]))
    edit(plan)
    path = sb.put("plan.json", json.dumps(plan).encode())
    archive = samples["docker-oci"]["app1"]
    r = run("pack", archive, "--plan", path, "-o", sb.out, "--format", "isula", expect=4, sandbox=sb)
    assert words in r.error, r.error
    plain = run("pack", archive, "--plan", path, "-o", sb.work / "plain", expect=0 if plain_packs else 4,
                sandbox=sb, out=sb.work / "plain")
    assert plain_packs or words in plain.error


def test_plan_without_a_lib_key_is_one_without_a_lib(plans, samples, sb):
    """A plan whose "lib" is left out (not null) packs as isep-partition's null: once a KeyError."""
    plan = json.loads(json.dumps(plans["two"]))
    assert plan["lib"] is None
    del plan["lib"]
    path = sb.put("plan.json", json.dumps(plan).encode())
    run("pack", samples["docker-oci"]["app1+app2"], "--plan", path, "-o", sb.out, "--format", "isula", sandbox=sb)


@pytest.mark.parametrize("key", ["app1", "two"])
def test_unedited_plan_packs_and_joins(key, plans, samples, sb):
    """The control: the plans the edits start from are accepted, and their bundles verify."""
    path = sb.put("plan.json", json.dumps(plans[key]).encode())
    archive = samples["docker-oci"]["app1" if key == "app1" else "app1+app2"]
    run("pack", archive, "--plan", path, "-o", sb.out, sandbox=sb)
    run("verify", sb.out)


# --- reused parts ----------------------------------------------------------------------------------

def test_reused_part_gone_is_written_again(stores, samples, tmp_path):
    store = copy_store(stores["docker-oci"], tmp_path / "st")
    base = part_files(store)["base"]
    (store / base).unlink()
    s = samples["docker-oci"]
    run("pack", s["app2"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", store)
    assert (store / base).is_file()
    run("verify", store)
    run("join", store, "isep-sample/app2:1", "-o", tmp_path / "app2.tar")


def test_reused_part_gone_with_parts_app_is_refused(stores, samples, tmp_path):
    store = copy_store(stores["docker-oci"], tmp_path / "st")
    (store / part_files(store)["lib"]).unlink()
    before = (store / "isep-bundle.json").read_bytes()
    s = samples["docker-oci"]
    r = run("pack", s["app2"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "--parts", "app",
            "-o", store, expect=5)
    assert "gone" in r.error
    assert (store / "isep-bundle.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "extended", "directory", "symlink"])
def test_reused_part_not_as_recorded_is_refused(damage, stores, samples, tmp_path):
    store = copy_store(stores["docker-oci"], tmp_path / "st")
    base = store / part_files(store)["base"]
    if damage == "truncated":
        base.write_bytes(base.read_bytes()[:-1])
    elif damage == "extended":
        base.write_bytes(base.read_bytes() + b"\0")
    elif damage == "directory":
        base.unlink()
        base.mkdir()
    else:
        base.rename(tmp_path / "elsewhere")
        base.symlink_to(tmp_path / "elsewhere")
    before = bundle_doc(store)
    s = samples["docker-oci"]
    r = run("pack", s["app2"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", store, expect=5)
    assert base.name in r.error
    assert bundle_doc(store) == before
    assert not (store / part_files(stores["docker-oci"])["app"].replace("app1", "app2")).exists()


# --- indexes given to isep-partition ---------------------------------------------------------------

INDEX_EDITS = {  # name -> (edit, words the error must contain)
    "no-source": (lambda d: d.pop("source"), "index.source"),
    "images-not-list": (lambda d: d.update(images="x"), "index.images"),
    "members-not-list": (lambda d: d.update(members={}), "index.members"),
    "member-seq-string": (lambda d: d["members"][0].update(seq="0"), "index.members[0].seq"),
    "member-without-name": (lambda d: d["members"][1].pop("name"), "index.members[1].name"),
    "layer-member-missing": (lambda d: d["images"][0]["layers"][0].update(member="nowhere"),
                             "index.images[0].layers[0].member"),
    "layer-diff-id-other": (lambda d: d["images"][0]["layers"][0].update(diff_id="sha256:" + "0" * 64),
                            "layers[0].diff_id"),
    "config-member-missing": (lambda d: d["images"][0]["config"].update(member="nowhere"), "config.member"),
    "diff-ids-not-digests": (lambda d: d["images"][0]["diff_ids"].__setitem__(0, 7), "diff_ids[0]"),
    "format-unknown": (lambda d: d.update(format="zip"), "index.format"),
    "format-an-object": (lambda d: d.update(format={}), "index.format"),  # once a TypeError (exit 1)
}


@pytest.mark.parametrize("case", sorted(INDEX_EDITS))
def test_edited_index_is_refused_by_partition(case, samples, sb):
    s = samples["docker-oci"]
    doc = json.loads(run("index", s["app1"]).stdout)
    edit, words = INDEX_EDITS[case]
    edit(doc)
    r = run("partition", "--base", s["inspect-base"], stdin=json.dumps(doc).encode(), expect=4, sandbox=sb)
    assert words in r.error, r.error
    assert r.stdout == b""
