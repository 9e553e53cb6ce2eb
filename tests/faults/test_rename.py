"""isula-build's weak spot (isula-separated.md B4): rename files and bundle manifests that name
`../x`, `/etc/x`, `manifest`, an empty or a duplicate target. isep refuses every one of them before
writing anything; nothing lands outside the store."""
from __future__ import annotations

import json

import pytest

from . import craft
from tests.harness import copy_store, run

DEFAULT = "app1_1_app_image.tar.zst"
BASE = "base_1_base_image.tar.zst"

BAD_TARGETS = {
    "dotdot": "../x", "dotdot-deep": "../../sibling/x", "absolute": "/etc/x", "subdir": "a/b.tar.zst",
    "backslash": "a\\b", "manifest": "manifest", "bundle-manifest": "isep-bundle.json",
    "signature": "isep-bundle.json.sig", "lock": "isep-bundle.lock", "empty": "", "dot": ".", "dotdot-only": "..",
    "temp-name": ".isep-tmp-x", "control": "a\nb", "escape": "x\x1b[2J", "too-long": "n" * 256,
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_pack_rename_refuses_unsafe_targets(case, samples, sb):
    s = samples["docker-oci"]
    rename = sb.put("rename.json", json.dumps([{"name": DEFAULT, "rename": BAD_TARGETS[case]}]).encode())
    res = run("pack", s["app1"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "--rename", rename,
              "-o", sb.out, expect=2, sandbox=sb)
    assert "\x1b" not in res.stderr and not sb.out.exists()


@pytest.mark.parametrize("case", ["dotdot-deep", "absolute", "manifest", "empty"])
def test_partition_rename_refuses_unsafe_targets(case, samples, sb):
    s = samples["docker-oci"]
    index = sb.put("app1.json", run("index", s["app1"]).stdout)
    rename = sb.put("rename.json", json.dumps([{"name": DEFAULT, "rename": BAD_TARGETS[case]}]).encode())
    res = run("partition", index, "--base", s["inspect-base"], "--rename", rename, expect=2, sandbox=sb)
    assert res.stdout == b""


@pytest.mark.parametrize("entries", [
    [{"name": DEFAULT, "rename": "same.tar.zst"}, {"name": BASE, "rename": "same.tar.zst"}],
    [{"name": DEFAULT, "rename": BASE}],
    [{"name": DEFAULT, "rename": "lib_1_lib_image.tar.zst"}],
], ids=["two-to-one", "app-onto-base", "app-onto-lib"])
def test_rename_collisions_are_refused(entries, samples, sb):
    s = samples["docker-oci"]
    rename = sb.put("rename.json", json.dumps(entries).encode())
    run("pack", s["app1"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "--rename", rename,
        "-o", sb.out, expect=2, sandbox=sb)


@pytest.mark.parametrize("content,status", [(b"not json", 4), (b'{"name": "a"}', 2), (b'[{"name": 1}]', 2),
                                            (b"[" * 200 + b"]" * 200, 4), (None, 3)],
                         ids=["not-json", "not-a-list", "bad-entry", "deep", "missing"])
def test_malformed_rename_files(content, status, samples, sb):
    s = samples["docker-oci"]
    rename = sb.work / "rename.json"
    if content is not None:
        rename.write_bytes(content)
    run("pack", s["app1"], "--base", s["inspect-base"], "--rename", rename, "-o", sb.out, expect=status, sandbox=sb)


def test_renamed_pack_stays_inside_the_store(samples, sb):
    """A good rename works and the store holds exactly the renamed file."""
    s = samples["docker-oci"]
    rename = sb.put("rename.json", json.dumps([{"name": DEFAULT, "rename": "release-1.tar.zst"}]).encode())
    run("pack", s["app1"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "--rename", rename,
        "-o", sb.out, sandbox=sb)
    assert (sb.out / "release-1.tar.zst").is_file()
    run("verify", sb.out, sandbox=sb)


MANIFEST_TARGETS = ["../x", "../../sibling/x", "/etc/x", "manifest", "isep-bundle.json", "", ".", "a/b"]


@pytest.mark.parametrize("target", MANIFEST_TARGETS)
def test_bundle_manifest_naming_unsafe_files(target, stores, sb):
    """A bundle manifest whose part is `../x` (etc.): verify fails the manifest check, join refuses
    it, and neither opens anything outside the store."""
    store = copy_store(stores["docker-oci"], sb.work / "store")
    craft.edit_manifest(store, lambda doc: doc["parts"][0].update(file=target))
    res = run("verify", store, expect=5, report=True, sandbox=sb)
    assert res.failed_checks()[0]["check"] == "manifest"
    run("join", store, expect=4, sandbox=sb)


def test_bundle_manifest_with_duplicate_parts(stores, sb):
    """The same file listed twice with different hashes: verify fails one entry, join uses the one
    whose hash matches or refuses."""
    store = copy_store(stores["docker-oci"], sb.work / "store")

    def dup(doc):
        bad = dict(doc["parts"][0], sha256="sha256:" + "0" * 64)
        doc["parts"].insert(0, bad)
    craft.edit_manifest(store, dup)
    res = run("verify", store, expect=5, report=True, sandbox=sb)
    assert any(c.get("part") == BASE for c in res.failed_checks())
    run("join", store, expect=5, sandbox=sb)


def test_image_entry_naming_parts_outside(stores, sb):
    """An image entry whose part list names `../x`: join finds no such part in the manifest and
    never opens the path."""
    store = copy_store(stores["docker-oci"], sb.work / "store")
    craft.edit_manifest(store, lambda doc: doc["images"][0]["parts"].__setitem__(0, "../../sibling/x"))
    run("join", store, expect=(0, 2, 5), sandbox=sb)
