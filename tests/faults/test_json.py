"""Hostile metadata: manifest.json, index.json and configs that are huge, deeply nested, not UTF-8,
of the wrong shape or inconsistent with the blobs. index and pack refuse them with one line (4 for
malformed, 5 for inconsistent); verify reports them (5); nothing is written."""
from __future__ import annotations

import hashlib
import json

import pytest

from . import craft
from tests.harness import bundle_doc, copy_store, run

ZERO = "0" * 64


def _manifest_cases(app: bytes) -> dict[str, tuple[bytes, int]]:
    manifest = json.loads(craft.get(app, "manifest.json"))
    with_manifest = lambda doc: craft.replace(app, "manifest.json", doc if isinstance(doc, bytes) else json.dumps(doc).encode())  # noqa: E731

    def edited(fn):
        doc = json.loads(json.dumps(manifest))
        fn(doc[0])
        return with_manifest(doc)

    return {
        "manifest-huge": (with_manifest(json.dumps(manifest).encode() + b" " * (5 << 20)), 4),
        "manifest-deep": (with_manifest(b"[" * 100000 + b"]" * 100000), 4),
        "manifest-entry-without-config": (with_manifest(json.dumps(manifest + [{"x": "[" * 1000}]).encode()), 4),
        "manifest-invalid-utf8": (with_manifest(b'[{"Config": "\xff\xfe", "Layers": []}]'), 4),
        "manifest-not-json": (with_manifest(b"[{]"), 4),
        "manifest-not-list": (with_manifest({"Config": "x"}), 4),
        "manifest-empty-list": (with_manifest([]), 4),
        "manifest-entry-not-object": (with_manifest([1]), 4),
        "manifest-repotags-not-list": (edited(lambda e: e.update(RepoTags="a:1")), 4),
        "manifest-layers-not-list": (edited(lambda e: e.update(Layers="a")), 4),
        "manifest-config-missing": (edited(lambda e: e.update(Config=f"blobs/sha256/{ZERO}")), 4),
        "manifest-layer-missing": (edited(lambda e: e["Layers"].__setitem__(0, f"blobs/sha256/{ZERO}")), 4),
        "manifest-layer-is-config": (edited(lambda e: e["Layers"].__setitem__(0, e["Config"])), 5),
        "manifest-layers-swapped": (edited(lambda e: e["Layers"].__setitem__(slice(0, 2), e["Layers"][1::-1])), 5),
        "diffids-wrong-length": (edited(lambda e: e["Layers"].pop()), 5),
        "manifest-layer-path-dotdot": (edited(lambda e: e["Layers"].__setitem__(0, "../../sibling/x")), 4),
    }


def _config_cases(app: bytes) -> dict[str, tuple[bytes, int]]:
    """podman archives: the config is <hex>.json, so it can be changed without renaming it."""
    manifest = json.loads(craft.get(app, "manifest.json"))
    name = manifest[0]["Config"]
    config = json.loads(craft.get(app, name))

    def edited(fn):
        doc = json.loads(json.dumps(config))
        fn(doc)
        return craft.replace(app, name, json.dumps(doc).encode())

    return {
        "config-extra-diffid": (edited(lambda c: c["rootfs"]["diff_ids"].append("sha256:" + ZERO)), 5),
        "config-wrong-diffid": (edited(lambda c: c["rootfs"]["diff_ids"].__setitem__(0, "sha256:" + ZERO)), 5),
        "config-diffid-not-string": (edited(lambda c: c["rootfs"]["diff_ids"].__setitem__(0, 7)), 4),
        "config-no-rootfs": (edited(lambda c: c.pop("rootfs")), 4),
        "config-not-object": (craft.replace(app, name, b"[1, 2]"), 4),
        "config-deep": (craft.replace(app, name, b'{"a":' * 5000 + b"1" + b"}" * 5000), 4),
        "config-invalid-utf8": (craft.replace(app, name, b'{"rootfs": "\xc3\x28"}'), 4),
        "config-huge": (craft.replace(app, name, json.dumps(config).encode() + b" " * (5 << 20)), 4),
    }


def _oci_cases(app: bytes) -> dict[str, tuple[bytes, int]]:
    """docker-oci: index.json and content-addressed blobs."""
    index = json.loads(craft.get(app, "index.json"))
    manifest = json.loads(craft.get(app, "manifest.json"))
    config_name = manifest[0]["Config"]
    config = craft.get(app, config_name)
    loop_doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
    return {
        "blob-not-its-digest": (craft.replace(app, config_name, config.replace(b'"amd64"', b'"arm64"')), 5),
        "index-not-json": (craft.replace(app, "index.json", b"{\xff"), 4),
        "index-manifests-not-list": (craft.replace(app, "index.json", json.dumps({**index, "manifests": 3}).encode()), 4),
        "index-self-loop": _index_loop(app, index, loop_doc),
    }


def _index_loop(app: bytes, index: dict, doc: dict) -> tuple[bytes, int]:
    """An image index blob that lists itself would never end without a seen-set."""
    body = json.dumps(doc).encode()
    digest = hashlib.sha256(body).hexdigest()
    desc = {"mediaType": doc["mediaType"], "digest": f"sha256:{digest}", "size": len(body)}
    # it cannot name its own digest; it names an index that names it back: two blobs
    a_doc = {**doc, "manifests": [desc]}
    a_body = json.dumps(a_doc).encode()
    a_desc = {"mediaType": doc["mediaType"], "digest": "sha256:" + hashlib.sha256(a_body).hexdigest(), "size": len(a_body)}
    new_index = {**index, "manifests": index["manifests"] + [a_desc]}
    out = craft.replace(app, "index.json", json.dumps(new_index).encode())
    return craft.with_members(out, [craft.member(f"blobs/sha256/{digest}", body),
                                    craft.member("blobs/sha256/" + a_desc["digest"][7:], a_body)], at="start"), 0


@pytest.fixture(scope="module")
def cases(samples):
    out = {}
    out.update(_manifest_cases(samples["docker-oci"]["app1"].read_bytes()))
    out.update(_config_cases(samples["podman"]["app1"].read_bytes()))
    out.update(_oci_cases(samples["docker-oci"]["app1"].read_bytes()))
    return out


NAMES = ["manifest-huge", "manifest-deep", "manifest-entry-without-config", "manifest-invalid-utf8",
         "manifest-not-json", "manifest-not-list", "manifest-empty-list", "manifest-entry-not-object",
         "manifest-repotags-not-list", "manifest-layers-not-list", "manifest-config-missing",
         "manifest-layer-missing", "manifest-layer-is-config", "manifest-layers-swapped",
         "diffids-wrong-length", "manifest-layer-path-dotdot", "config-extra-diffid", "config-wrong-diffid",
         "config-diffid-not-string", "config-no-rootfs", "config-not-object", "config-deep",
         "config-invalid-utf8", "config-huge", "blob-not-its-digest", "index-not-json",
         "index-manifests-not-list", "index-self-loop"]


# pack and verify read metadata with the same code as index: they run on a spread of the cases
ALL_COMMANDS = {"manifest-huge", "manifest-deep", "manifest-invalid-utf8", "manifest-layer-missing",
                "diffids-wrong-length", "config-extra-diffid", "config-deep", "blob-not-its-digest",
                "index-self-loop"}


@pytest.mark.parametrize("case", NAMES)
def test_hostile_metadata(case, cases, samples, sb):
    archive, status = cases[case]
    path = sb.put("in.tar", archive)
    fmt = "podman" if case.startswith("config-") else "docker-oci"
    s = samples[fmt]
    res = run("index", path, expect=status, sandbox=sb)
    if case not in ALL_COMMANDS:
        return
    if status:
        assert res.stdout == b""
        run("pack", "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", sb.out, stdin=path,
            expect=status, sandbox=sb)
        res = run("verify", path, expect=5, report=True, sandbox=sb)
        assert res.failed_checks()[0]["check"] == "archive"
    else:
        run("verify", path, sandbox=sb)


def test_many_entries_naming_one_big_config_stay_linear(samples, sb):
    """5000 manifest entries naming one 1 MiB config: each is parsed once (it was 5 GB of parsing)."""
    app = samples["podman"]["app1"].read_bytes()
    manifest = json.loads(craft.get(app, "manifest.json"))
    name = manifest[0]["Config"]
    config = craft.get(app, name)
    big = craft.replace(app, name, config[:-1] + b" " * (1 << 20) + config[-1:])
    big = craft.replace(big, "manifest.json", json.dumps(manifest * 5000).encode())
    res = run("index", sb.put("in.tar", big), "--compact", sandbox=sb, timeout=60)
    assert res.seconds < 30 and len(res.json["images"]) == 5000


@pytest.mark.parametrize("nesting,status", [(16, 0), (40, 4)])
def test_nested_image_indexes(nesting, status, samples, sb):
    app = samples["oci-archive"]["app1"].read_bytes()
    index = json.loads(craft.get(app, "index.json"))
    child, extra = index["manifests"][0], []
    for _ in range(nesting):
        body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": [child]}).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        extra.append(craft.member("blobs/sha256/" + digest[7:], body))
        child = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": len(body)}
    archive = craft.replace(craft.with_members(app, extra, at="start"), "index.json",
                            json.dumps({**index, "manifests": [child]}).encode())
    run("index", sb.put("in.tar", archive), expect=status, sandbox=sb)


@pytest.mark.parametrize("bad", [b"[1,", b"\xff", b'{"a": ' * 100 + b"1" + b"}" * 100, b"{}"])
def test_hostile_ref_and_plan_files(bad, samples, sb):
    """--base, --plan and index input files get the same treatment as archive metadata."""
    s = samples["docker-oci"]
    ref = sb.put("ref.json", bad)
    status = 2 if bad == b"{}" else 4
    run("partition", "--base", ref, stdin=b"{}", expect=4, sandbox=sb)
    run("pack", s["app1"], "--base", ref, "-o", sb.out, expect=(status, 4), sandbox=sb)
    run("pack", s["app1"], "--plan", ref, "-o", sb.out, expect=4, sandbox=sb)
    run("partition", ref, "--base", s["inspect-base"], expect=4, sandbox=sb)


# Edits of a `docker inspect` REF (--base, --have) a mutation run found crashing pack (exit 1)
HOSTILE_INSPECT = {
    "layers-an-integer": lambda e: e["RootFS"].update({"Layers": 7}),
    "tags-an-integer": lambda e: e.update({"RepoTags": 7}),
    "tag-a-list": lambda e: e["RepoTags"].__setitem__(0, ["x"]),
    "layer-an-object": lambda e: e["RootFS"]["Layers"].__setitem__(0, {}),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_INSPECT))
def test_hostile_inspect_refs_are_refused(edit, samples, stores, sb):
    """pack --base and join --have refuse a REF whose tags or diffIDs are not lists of strings (exit 4)."""
    s = samples["docker-oci"]
    doc = json.loads(s["inspect-base"].read_text())
    HOSTILE_INSPECT[edit](doc[0])
    ref = sb.put("ref.json", json.dumps(doc).encode())
    assert "ref.json" in run("pack", s["app1"], "--base", ref, "-o", sb.out, expect=4, sandbox=sb).error
    name = bundle_doc(stores["docker-oci"])["images"][0]["tags"][0]
    run("join", stores["docker-oci"], name, "--have", ref, expect=4, sandbox=sb)


def test_hostile_bundle_manifest_as_ref_is_refused(stores, samples, sb):
    """A bundle directory given as --base is read as join reads it: its manifest checked whole."""
    store = copy_store(stores["docker-oci"], sb.work / "store")
    doc = bundle_doc(store)
    doc["parts"][0]["diff_ids"] = [7]
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    res = run("pack", samples["docker-oci"]["app1"], "--base", store, "-o", sb.out, expect=4, sandbox=sb)
    assert "parts[0].diff_ids[0] is not a string" in res.error
