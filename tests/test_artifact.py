"""Bundles as OCI artifacts without a registry: the manifest isep-push writes, read back as untrusted
input, and the plan of a pull (which blobs a device fetches), through an in-memory registry
(tests/fake_registry.py) and the release chain of tests/release_chain.py."""
from __future__ import annotations

import hashlib
import io
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from isep.artifact import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    DELTA_BUNDLE,
    MANIFEST_LIMIT,
    PART_TYPES,
    TITLE,
    Descriptor,
    Fetch,
    artifact_manifest,
    parse_artifact,
    plan_pull,
)
from isep.bundle import Bundle, open_bundle, open_local_store
from isep.cli import join as join_cli
from isep.deltajoin import StoreLayers, part_needs
from isep.errors import BadInput, IntegrityError, UsageError
from isep.names import check_file_name
from isep.pull import BLOB_DIR, fetch_parts, open_release, plan_fetches
from isep.push import push_release
from isep.registry import RegistryRef
from tests.fake_registry import FakeRegistry
from tests.harness import isep
from tests.release_chain import build_chain

HEX = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
TITLES = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=40).filter(
    lambda t: check_file_name(t, "title") is None)


def _ref(repo: str, tag: str) -> RegistryRef:
    return RegistryRef("fake", repo, tag, None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(HEX, st.integers(0, 1 << 40), TITLES, st.sampled_from(sorted(PART_TYPES.values()))),
                max_size=20, unique_by=lambda t: t[0]))
def test_manifest_round_trips_every_part(layers):
    config = Descriptor(CONFIG_TYPE, "sha256:" + "0" * 64, 123)
    descriptors = [Descriptor(media, digest, size, {TITLE: title}) for digest, size, title, media in layers]
    parsed = parse_artifact(artifact_manifest(config, descriptors), "test")
    assert parsed.config == config
    assert [(d.digest, d.size, d.title, d.media_type) for d in parsed.parts.values()] == \
        [(d.digest, d.size, d.title, d.media_type) for d in descriptors]


def _manifest(**changes) -> dict:
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "artifactType": ARTIFACT_TYPE,
           "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + "1" * 64, "size": 10},
           "layers": [{"mediaType": PART_TYPES["zstd"], "digest": "sha256:" + "2" * 64, "size": 5,
                       "annotations": {TITLE: "app.tar.zst"}}]}
    doc.update(changes)
    return doc


def _layer(**changes) -> dict:
    return {**_manifest()["layers"][0], **changes}


@pytest.mark.parametrize("doc, message", [
    (_manifest(schemaVersion=1), "schemaVersion 2"),
    (_manifest(artifactType="application/vnd.other"), "not an isep release"),
    (_manifest(mediaType="application/vnd.docker.distribution.manifest.v2+json"), "is not an OCI image manifest"),
    (_manifest(config={"mediaType": "application/json", "digest": "sha256:" + "1" * 64, "size": 1}),
     "config media type"),
    (_manifest(config={"mediaType": CONFIG_TYPE, "digest": "sha256:" + "1" * 64, "size": 1 << 30}),
     "over the bundle manifest limit"),
    (_manifest(layers=[_layer(digest="sha256:abc")]), "is not sha256:<64 hex digits>"),
    (_manifest(layers=[_layer(digest="md5:" + "2" * 64)]), "is not sha256:<64 hex digits>"),
    (_manifest(layers=[_layer(size=-1)]), "is not a byte count"),
    (_manifest(layers=[_layer(size=True)]), "is not a byte count"),
    (_manifest(layers=[_layer(mediaType="application/vnd.isep.unknown")]), "unknown media type"),
    (_manifest(layers=[_layer(annotations={TITLE: "../../etc/passwd"})]), "not a plain file name"),
    (_manifest(layers=[_layer(annotations={TITLE: ".isep-tmp-x"})]), "not allowed as a file name"),
    (_manifest(layers=[_layer(annotations={TITLE: "isep-bundle.json"})]), "reserved bundle file name"),
    (_manifest(layers=[_layer(annotations={})]), "empty file name"),
    (_manifest(layers=[_layer(annotations={TITLE: 7})]), "annotations are not string pairs"),
    (_manifest(layers={"x": 1}), "layers is not a list"),
    (_manifest(layers=["x"]), "not a descriptor object"),
])
def test_a_malformed_artifact_manifest_is_one_clear_error(doc, message):
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_artifact(json.dumps(doc).encode(), "oci://h/r:1")


def test_a_manifest_over_4_mib_is_refused_before_parsing():
    body = json.dumps(_manifest(padding="x" * MANIFEST_LIMIT)).encode()
    with pytest.raises(BadInput, match="over the 4,194,304-byte limit"):
        parse_artifact(body, "oci://h/r:1")
    with pytest.raises(BadInput, match="registries refuse more than"):
        many = [Descriptor(PART_TYPES["zstd"], f"sha256:{n:064x}", n, {TITLE: f"p{n}" * 20}) for n in range(20000)]
        artifact_manifest(Descriptor(CONFIG_TYPE, "sha256:" + "0" * 64, 1), many)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def pushed(chain):
    """The chain pushed into one fake registry: app2 mounts what app1's repository holds."""
    registry = FakeRegistry()
    outcomes: dict[str, list[tuple[str, str]]] = {}
    for app, mount in (("app1", []), ("app2", ["fleet/app1"])):
        for n in (1, 2, 3):
            deltas = [open_bundle(str(chain[f"{app}/d{n - 1}{n}"]))] if n > 1 else []
            got = outcomes.setdefault(f"{app}:{n}", [])
            push_release(registry.client(), _ref(f"fleet/{app}", str(n)), open_bundle(str(chain[f"{app}/r{n}"])),
                         deltas, mount, lambda u, outcome, got=got: got.append((u.descriptor.title or "", outcome)))
    return registry, outcomes


def test_push_uploads_once_and_mounts_the_shared_base(pushed):
    registry, outcomes = pushed
    base = "base_1_base_image.tar.zst"
    assert (base, "uploaded") in outcomes["app1:1"] and (base, "present") in outcomes["app1:2"]
    assert (base, "mounted") in outcomes["app2:1"]
    assert ("app1_2_app_image.tar.zst", "uploaded") in outcomes["app1:2"]
    assert registry.manifest_puts == 6 and set(registry.tags["fleet/app1"]) == {"1", "2", "3"}


def test_the_manifest_is_pushed_last(chain):
    registry = FakeRegistry()
    client = registry.client()
    order = []
    client.put_manifest = lambda *a, **k: order.append("manifest") or "sha256:" + "0" * 64  # type: ignore
    push_release(client, _ref("fleet/app1", "1"), open_bundle(str(chain["app1/r1"])), [], [],
                 lambda u, outcome: order.append(u.descriptor.media_type))
    assert order[-1] == "manifest" and order[-2] == CONFIG_TYPE and len(order) == 4


def _plan(registry, app, n, store):
    release = open_release(registry.client(), _ref(f"fleet/{app}", str(n)), None, pytest.fail)
    image = release.bundle.doc["images"][0]
    local = open_local_store(str(store)) if store else None
    return [(f.entry["file"], f.delta) for f in plan_fetches(registry.client(), release, image, local, pytest.fail)]


@pytest.mark.parametrize("app", ["app1", "app2"])
def test_a_device_plans_only_what_its_store_lacks(pushed, chain, app):
    registry, _ = pushed
    base, app_part = "base_1_base_image.tar.zst", f"{app}_{{}}_app_image.tar.zst"
    assert _plan(registry, app, 1, None) == [(base, False), (app_part.format(1), False)]
    assert _plan(registry, app, 2, chain[f"{app}/r1"]) == [(app_part.format(2), True)]  # the delta part
    assert _plan(registry, app, 3, chain[f"{app}/r2"]) == [(app_part.format(3), True)]
    assert _plan(registry, app, 3, chain[f"{app}/r1"]) == [(app_part.format(3), False)]  # d23 needs release 2
    assert _plan(registry, app, 2, chain[f"{app}/r2"]) == []


def test_the_delta_part_chosen_is_smaller_than_the_plain_part(pushed, chain):
    registry, _ = pushed
    release = open_release(registry.client(), _ref("fleet/app1", "2"), None, pytest.fail)
    plan = plan_pull(release.bundle.doc, release.bundle.doc["images"][0], [d.doc for d in release.deltas],
                     open_local_store(str(chain["app1/r1"])))
    plain = next(p for p in release.bundle.doc["parts"] if p["file"] == plan[0].entry["file"])
    assert plan[0].delta and plan[0].size * 10 < plain["size"]


def test_a_garbage_collected_delta_falls_back_to_the_plain_part(pushed, chain):
    registry, _ = pushed
    release = open_release(registry.client(), _ref("fleet/app1", "2"), None, pytest.fail)
    delta_part = next(d for d in release.artifact.parts.values() if d.annotations.get(DELTA_BUNDLE))
    saved = registry.blobs["fleet/app1"].pop(delta_part.digest)
    warnings: list[str] = []
    try:
        release = open_release(registry.client(), _ref("fleet/app1", "2"), None, warnings.append)
        image = release.bundle.doc["images"][0]
        plan = plan_fetches(registry.client(), release, image, open_local_store(str(chain["app1/r1"])), warnings.append)
    finally:
        registry.blobs["fleet/app1"][delta_part.digest] = saved
    assert [(f.entry["file"], f.delta) for f in plan] == [("app1_2_app_image.tar.zst", False)]
    assert len(warnings) == 1 and "is gone from the registry" in warnings[0]


def test_a_release_whose_config_does_not_list_its_parts_is_refused(pushed):
    registry, _ = pushed
    body, _ = registry.client().get_manifest("fleet/app1", "1")
    doc = json.loads(body)
    doc["layers"] = doc["layers"][1:]
    registry.client().put_manifest("fleet/app1", "broken", json.dumps(doc).encode())
    with pytest.raises(BadInput, match="is not a layer of the artifact as listed"):
        open_release(registry.client(), _ref("fleet/app1", "broken"), None, pytest.fail)


def test_trust_is_checked_before_any_part(pushed, tmp_path):
    registry, _ = pushed
    signers = tmp_path / "allowed_signers"
    signers.write_text("")
    registry.fetched.clear()
    with pytest.raises(IntegrityError):
        open_release(registry.client(), _ref("fleet/app1", "1"), str(signers), pytest.fail)
    body, _ = registry.client().get_manifest("fleet/app1", "1")
    parts = {d["digest"] for d in json.loads(body)["layers"] if d["mediaType"] in PART_TYPES.values()}
    assert registry.fetched and not parts & {d for d, _ in registry.fetched}


def _join_in_process(monkeypatch, registry, *args) -> tuple[int, bytes, str]:
    """isep-join run in this process with the fake registry in place of the network client."""
    monkeypatch.setattr(join_cli, "registry_client", registry.client)
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    result = CliRunner().invoke(join_cli.app, list(map(str, args)))
    return result.exit_code, out.getvalue(), result.output


def _part_digests(bundle) -> set[str]:
    return {p["sha256"] for p in json.loads((bundle / "isep-bundle.json").read_text())["parts"]}


@pytest.mark.parametrize("app", ["app1", "app2"])
def test_a_device_chain_through_the_fake_registry_is_byte_exact_and_kept(pushed, chain, tmp_path, monkeypatch, app):
    """Release 1 whole into an empty store, then only each release's delta part; the store keeps them."""
    registry, _ = pushed
    store = tmp_path / "store"
    for n in (1, 2, 3):
        registry.fetched.clear()
        rc, _, err = _join_in_process(monkeypatch, registry, f"oci://fake/fleet/{app}:{n}", store,
                                      "-o", tmp_path / "out.tar")
        assert rc == 0, err
        assert (tmp_path / "out.tar").read_bytes() == chain[f"{app}/save{n}"].read_bytes()
        wanted = _part_digests(chain[f"{app}/r1"]) if n == 1 else _part_digests(chain[f"{app}/d{n - 1}{n}"])
        assert {d for d, _ in registry.fetched} - {d for d, _ in registry.fetched if d not in _every_part(chain)} \
            == wanted
    assert sorted(p.name for p in store.iterdir() if p.name.endswith(".zst")) == \
        sorted(["base_1_base_image.tar.zst"] + [f"{app}_{n}_app_image.tar.zst" for n in (1, 2, 3)])


def _every_part(chain) -> set[str]:
    return {d for key, path in chain.items() if "/r" in key or "/d" in key for d in _part_digests(path)}


@pytest.mark.parametrize("args, rc, message", [
    (["join", "oci://127.0.0.1:1/fleet/app:1"], 3, "isep-join: error: registry 127.0.0.1:1: "),
    (["join", "oci://Bad_Host/fleet/app"], 2, "bad registry host"),
    (["join", "oci://127.0.0.1:1/fleet/app:1", "-"], 2, "no stream on stdin"),
    (["join", "oci://127.0.0.1:1/fleet/app:1", "-b", "base.tar.zst"], 2, "no -b/-l/-a"),
    (["verify", "oci://127.0.0.1:1/fleet/app:1"], 3, "isep-verify: error: registry 127.0.0.1:1: "),
    (["verify", "--fast", "oci://127.0.0.1:1/fleet/app:1"], 2, "--fast applies to local parts"),
    (["push", "{r1}", "oci://127.0.0.1:1/fleet/app@sha256:" + "0" * 64], 2, "push to a tag"),
    (["push", "{r1}", "oci://127.0.0.1:1/fleet/app:1"], 3, "isep-push: error: registry 127.0.0.1:1: "),
    (["push", "{missing}", "oci://127.0.0.1:1/fleet/app:1"], 3, "cannot open"),
    (["push", "{missing}", "oci://127.0.0.1:1/fleet/app@sha256:" + "0" * 64], 2, "push to a tag"),
    (["pack", "{save}", "--base", "{base}", "--parts", "app", "-o", "oci://127.0.0.1:1/fleet/app:1"], 2,
     "-o oci:// pushes a whole release"),
    (["pack", "{save}", "--base", "{base}", "-o", "oci://127.0.0.1:1/fleet/app:1"], 3, "registry 127.0.0.1:1: "),
])
def test_registry_commands_fail_in_one_line(chain, tmp_path, args, rc, message):
    cmd, *rest = [a.format(r1=chain["app1/r1"], missing=tmp_path / "missing", save=chain["app1/save1"],
                           base=chain["base"]) for a in args]
    res = isep(cmd, *rest)
    assert res.rc == rc and len(res.error_lines) == 1 and message in res.error and not res.stdout, res


def test_a_thin_join_does_not_fetch_the_base_the_engine_holds(pushed, chain, tmp_path, monkeypatch):
    """--have: the engine holds the base's layers, so its part is neither fetched nor needed."""
    registry, _ = pushed
    registry.fetched.clear()
    rc, _, err = _join_in_process(monkeypatch, registry, "oci://fake/fleet/app1:1", "--have", chain["base"],
                                  "-o", tmp_path / "thin.tar")
    assert rc == 0, err
    fetched = {d for d, _ in registry.fetched}
    assert _part_digests(chain["app1/r1"]) & fetched == {_part_sha(chain["app1/r1"], "app1_1_app_image.tar.zst")}
    assert 0 < (tmp_path / "thin.tar").stat().st_size < chain["app1/save1"].stat().st_size - 500_000


def _part_sha(bundle, file_name: str) -> str:
    return next(p["sha256"] for p in json.loads((bundle / "isep-bundle.json").read_text())["parts"]
                if p["file"] == file_name)


@pytest.fixture(scope="module")
def store_parts(chain, tmp_path_factory):
    """Every part of app1's bundles (full and delta) as files of one directory, for stores made of
    any subset of them."""
    root = tmp_path_factory.mktemp("any-store")
    entries = {}
    for key in ("app1/r1", "app1/r2", "app1/r3", "app1/d12", "app1/d23"):
        for entry in json.loads((chain[key] / "isep-bundle.json").read_text())["parts"]:
            if "needs" not in entry:  # a store holds plain parts only (it keeps the rebuilt ones)
                (root / entry["file"]).write_bytes(b"")
                entries[(entry["file"], entry["sha256"])] = entry
    return root, list(entries.values())


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_store_gets_a_plan_that_completes_it_at_most_at_the_plain_cost(chain, store_parts, data):
    root, entries = store_parts
    chosen = data.draw(st.lists(st.sampled_from(entries), unique_by=lambda e: e["file"]))
    store = Bundle(str(root), "isep", doc={"parts": chosen, "images": []}) if chosen else None
    n = data.draw(st.sampled_from([2, 3]))
    release = json.loads((chain[f"app1/r{n}"] / "isep-bundle.json").read_text())
    delta = json.loads((chain[f"app1/d{n - 1}{n}"] / "isep-bundle.json").read_text())
    image = release["images"][0]
    plan = plan_pull(release, image, [delta], store)
    by_name = {p["file"]: p for p in release["parts"]}
    fetched = {f.entry["file"]: f for f in plan}
    assert len(fetched) == len(plan) and set(fetched) <= set(image["parts"])
    layers = StoreLayers([store] if store else [])
    for name in image["parts"]:
        same = [e for e in chosen if e["file"] == name and e["sha256"] == by_name[name]["sha256"]]
        if same:
            assert name not in fetched  # the store's own copy is never fetched again
        if name in fetched:
            f = fetched[name]
            assert f.size <= by_name[name]["size"]
            assert not f.delta or not layers.missing(part_needs(f.entry))
        else:  # held: a join finds it in the store by name, or (base, lib) by its layers
            assert any(e["file"] == name or e["role"] != "app" and e["diff_ids"] == by_name[name]["diff_ids"]
                       for e in chosen)


def test_push_refuses_a_delta_bundle_of_another_release(chain):
    registry = FakeRegistry()
    with pytest.raises(UsageError, match="none of its parts is a part of"):
        push_release(registry.client(), _ref("fleet/app1", "3"), open_bundle(str(chain["app1/r3"])),
                     [open_bundle(str(chain["app1/d12"]))], [], lambda u, outcome: None)
    assert registry.blobs == {} and registry.manifest_puts == 0


def test_a_kept_blob_changed_since_an_interrupted_pull_is_fetched_again(tmp_path):
    """fetch_parts uses an earlier run's complete blob only when its sha256 still matches."""
    registry = FakeRegistry()
    client = registry.client()
    data = b"part bytes " * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.blobs["r"] = {digest: data}
    fetch = Fetch({"file": "app.tar.zst"}, digest, len(data), False)
    blob = tmp_path / BLOB_DIR / digest[7:]
    blob.parent.mkdir()
    blob.write_bytes(b"X" * len(data))  # same size, other bytes
    files, moved = fetch_parts(client, "r", [fetch], str(tmp_path))
    assert moved == len(data) and blob.read_bytes() == data and files == {"app.tar.zst": str(blob)}
    files, moved = fetch_parts(client, "r", [fetch], str(tmp_path))  # whole now: kept, nothing fetched
    assert moved == 0 and registry.fetched == [(digest, len(data))]
