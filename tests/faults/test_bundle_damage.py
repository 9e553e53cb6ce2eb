"""Damaged bundles: a bit flipped in a part or in the manifest, a part missing, swapped, replaced by
one from another pack, extended or truncated. isep-verify names the part and exits 5; isep-join
exits non-zero and what it wrote is never a complete archive (on stdout no end-of-archive marker or
no metadata; with -o no file at all). The bundle itself is never modified by either."""
from __future__ import annotations

import io
import json
import shutil

import pytest

from . import craft
from tests.harness import bundle_doc, copy_store, is_complete_archive, part_files, run


def flip(path, where: float = 0.5, bit: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= bit
    path.write_bytes(bytes(data))


def _damage(kind: str, store, stores) -> str | None:
    """Apply one kind of damage; the name of the part verify must blame (None: the manifest)."""
    files = part_files(store)
    if kind.startswith("flip-"):
        role = kind[5:]
        flip(store / files[role])
        return files[role]
    if kind == "manifest-part-sha256":
        craft.edit_manifest(store, lambda doc: doc["parts"][1].update(
            sha256=doc["parts"][1]["sha256"][:-1] + ("0" if doc["parts"][1]["sha256"][-1] != "0" else "1")))
        return bundle_doc(store)["parts"][1]["file"]
    if kind == "manifest-bit-flip":
        text = (store / "isep-bundle.json").read_bytes()
        pos = text.index(b'"raw_size"') + 2  # a key: the JSON stays valid, the entry does not
        (store / "isep-bundle.json").write_bytes(text[:pos] + bytes([text[pos] ^ 0x20]) + text[pos + 1:])
        return None
    if kind == "manifest-not-json":
        flip(store / "isep-bundle.json", 0.0, 0x20)  # '{' -> '['
        return None
    if kind == "missing-lib":
        (store / files["lib"]).unlink()
        return files["lib"]
    if kind == "swapped-base-lib":
        a, b = store / files["base"], store / files["lib"]
        tmp = store / "swap"
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
        return files["base"]
    if kind == "older-app":  # the same file name from another pack (other content)
        other = part_files(stores["seed1"])["app"]
        assert other == files["app"]
        shutil.copyfile(stores["seed1"] / other, store / files["app"])
        return files["app"]
    if kind == "extended-zeros":
        with open(store / files["lib"], "ab") as fh:
            fh.write(bytes(512))
        return files["lib"]
    if kind == "extended-frame":  # a valid extra frame: one more member, then the trailer again
        extra = craft.compress(craft.build([craft.member("extra", b"smuggled\n")]), "zstd")
        with open(store / files["app"], "ab") as fh:
            fh.write(extra)
        return files["app"]
    if kind == "truncated-part":
        path = store / files["base"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return files["base"]
    raise AssertionError(kind)


KINDS = ["flip-base", "flip-lib", "flip-app", "manifest-part-sha256", "manifest-bit-flip",
         "manifest-not-json", "missing-lib", "swapped-base-lib", "older-app", "extended-zeros",
         "extended-frame", "truncated-part"]
JOIN_STATUS = {"missing-lib": 3, "manifest-not-json": 4, "manifest-bit-flip": 4}


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_bundle(kind, stores, sb):
    store = copy_store(stores["docker-oci"], sb.work / "store")
    blamed = _damage(kind, store, stores)
    res = run("verify", store, expect=5, report=True, sandbox=sb)
    failed = res.failed_checks()
    if blamed is None:
        assert failed[0]["check"] == "manifest"
    else:
        assert blamed in {c.get("part") for c in failed}, failed
    status = JOIN_STATUS.get(kind, 5)
    out = run("join", store, expect=status, sandbox=sb)
    assert not is_complete_archive(out.stdout)
    sb.out.mkdir()
    run("join", store, "-o", sb.out / "joined.tar", expect=status, sandbox=sb, out=sb.out / "joined.tar")
    assert not (sb.out / "joined.tar").exists()


@pytest.mark.parametrize("kind", ["flip-base", "flip-lib", "flip-app", "truncated-part"])
def test_damaged_gzip_bundle(kind, stores, sb):
    store = copy_store(stores["gzip"], sb.work / "store")
    blamed = _damage(kind, store, stores)
    res = run("verify", store, expect=5, report=True, sandbox=sb)
    assert blamed in {c.get("part") for c in res.failed_checks()}
    out = run("join", store, expect=5, sandbox=sb)
    assert not is_complete_archive(out.stdout)


@pytest.mark.parametrize("kind", ["flip-lib", "flip-app"])
def test_fast_and_deep_verify_catch_a_flip(kind, stores, sb):
    store = copy_store(stores["docker-oci"], sb.work / "store")
    blamed = _damage(kind, store, stores)
    for mode in ("--fast", "--deep"):
        res = run("verify", mode, store, expect=5, report=True, sandbox=sb)
        assert blamed in {c.get("part") for c in res.failed_checks()}


def test_damage_to_an_existing_output_file_never_happens(stores, sb):
    """join -o over an existing file: a failed join leaves the old file as it was."""
    store = copy_store(stores["docker-oci"], sb.work / "store")
    _damage("flip-app", store, stores)
    sb.out.mkdir()
    (sb.out / "joined.tar").write_bytes(b"the previous good archive")
    run("join", store, "-o", sb.out / "joined.tar", expect=5, sandbox=sb, out=sb.out)
    assert (sb.out / "joined.tar").read_bytes() == b"the previous good archive"


@pytest.mark.parametrize("where", ["head", "part", "manifest", "cut"])
def test_damaged_bundle_stream(where, samples, sb):
    """A bundle stream (pack -o -) damaged in its head, a part chunk or its manifest, or cut short."""
    s = samples["docker-oci"]
    stream = bytearray(run("pack", s["app1"], "--base", s["inspect-base"], "--lib", s["inspect-lib"],
                           "-o", "-").stdout)
    members, _ = craft.split(bytes(stream))
    if where == "cut":
        stream = stream[: len(stream) // 2]
    else:
        target = {"head": members[0], "part": members[1], "manifest": members[-1]}[where]
        # the manifest: a part's sha256, which verify and join both check (standard verify compares
        # members by xxh3 only; a member's sha256 is join's and --deep's: docs/security.md)
        middle = target.data.index(b'"sha256": "sha256:') + 30 if where == "manifest" else len(target.data) // 2
        stream[target.data_offset + middle] ^= 0x04
    path = sb.put("stream", bytes(stream))
    out = run("join", "-", stdin=path, expect=(4, 5), sandbox=sb)
    assert not is_complete_archive(out.stdout)
    run("verify", "-", stdin=path, expect=(4, 5), report=True, sandbox=sb)


def test_isula_manifest_damage_does_not_affect_isep_join(stores, sb):
    """isula-build's `manifest` is for isula-build only: isep joins by isep-bundle.json."""
    store = copy_store(stores["docker-oci"], sb.work / "store")
    flip(store / "manifest", 0.5)
    joined = run("join", store, sandbox=sb).stdout
    assert is_complete_archive(joined)
    doc = json.loads((store / "isep-bundle.json").read_text())
    assert doc["images"][0]["byte_exact"]


def test_damaged_reference_part_of_a_delta_pack(rel, sb, tmp_path):
    """isep-pack --delta-from a store whose reference part has one byte flipped: where the byte lies
    in the layer the delta is made against or before it (the first tenth of this part), the pack
    refuses (exit 5, naming the part; a damaged tar header too, not exit 4); where it lies after
    it, the pack reads that layer intact (its digest checked) and the delta joins byte for byte on
    an intact store. Never an internal error: a failed parallel read of the reference once left
    views of its buffer alive, and closing it raised BufferError."""
    outcomes = set()
    size = (rel["build"] / "app_1_app_image.tar.zst").stat().st_size
    for at in (100, size * 2 // 64, size * 4 // 64, size * 16 // 64, size * 32 // 64, size * 56 // 64):
        store = copy_store(rel["build"], tmp_path / f"store{at}")  # byte 100: in a tar header
        part = store / "app_1_app_image.tar.zst"
        data = bytearray(part.read_bytes())
        data[at] ^= 0x55
        part.write_bytes(data)
        res = run("pack", rel["r2"], "--base", rel["base1"], "-o", "-", "--parts", "app", "--delta-from", store,
                  expect=(0, 5), sandbox=sb)
        outcomes.add(res.rc)
        if res.rc == 0:
            device = copy_store(rel["build"], tmp_path / f"device{at}")
            joined = run("join", device, "-", stdin=res.stdout, sandbox=sb, out=device).stdout
            assert joined == rel["r2"].read_bytes()
        else:
            assert "app_1_app_image.tar.zst" in res.error
    assert outcomes == {0, 5}


def _first_delta(doc: dict) -> tuple[dict, dict]:
    part = next(p for p in doc["parts"] if p.get("needs"))
    return part, next(m for m in part["members"] if "from" in m)


# Edits a mutation run over a delta store's manifest found crashing join, verify or prune (exit 1):
# fields other code looks up or compares, in a manifest that may come from anyone.
HOSTILE_DELTA_EDITS = {
    "from-not-an-object": (lambda part, rec: rec.update({"from": True}), "members[5].from is not an object"),
    "reference-digest-an-object": (lambda part, rec: rec["from"]["reference"].update({"diff_id": {}}),
                                   "from.reference.diff_id is not a string"),
    "reference-size-a-float": (lambda part, rec: rec["from"]["reference"].update({"size": 1.5}),
                               "from.reference.size is not an integer"),
    "unknown-kind": (lambda part, rec: rec["from"].update({"kind": "patch"}), "from.kind is 'patch'"),
    "needs-a-string": (lambda part, rec: part.update({"needs": "all"}), ".needs is not a list"),
    "needed-size-negative": (lambda part, rec: part["needs"][0].update({"size": -1}), ".needs[0].size is -1"),
    "part-layer-a-list": (lambda part, rec: part["layers"].__setitem__(0, []), ".layers[0] is not a string"),
    "member-digest-an-object": (lambda part, rec: rec.update({"sha256": {}}), ".sha256 is not a string"),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_DELTA_EDITS))
def test_hostile_delta_records_are_refused_by_name(edit, rel, sb, tmp_path):
    """Join and prune refuse the manifest (exit 4) and verify reports it (exit 5), each naming the
    field, before anything reads it."""
    store = copy_store(rel["build"], tmp_path / "store")
    run("pack", rel["r2"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, sandbox=sb,
        out=store)
    doc = bundle_doc(store)
    change, field = HOSTILE_DELTA_EDITS[edit]
    change(*_first_delta(doc))
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    res = run("join", store, "isep-delta/app:2", expect=4, sandbox=sb, out=store)
    assert field in res.error and not is_complete_archive(res.stdout)
    assert field in run("prune", store, "--keep", "isep-delta/app:1", expect=4, sandbox=sb, out=store).error
    assert field in run("verify", store, expect=5, report=True, sandbox=sb, out=store).stderr


# isep-needs.json as announced -> as forged
HOSTILE_NEEDS = {
    "an-object": lambda needs: {"x": 1},
    "a-string": lambda needs: "all",
    "a-null-entry": lambda needs: [None],
    "a-digest-that-is-a-list": lambda needs: [{**needs[0], "diff_id": ["sha256:0"]}],
    "a-float-size": lambda needs: [{**needs[0], "size": 1.5}],
    "a-part-that-is-a-list": lambda needs: [{**needs[0], "part": []}],
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_NEEDS))
def test_hostile_announced_needs(edit, rel, sb, tmp_path):
    """A bundle stream's isep-needs.json (the store layers its delta parts read, sent ahead of them)
    of another shape than isep writes: join and verify refuse the stream (exit 4) naming it, before
    any part is read. A digest that is a list once crashed join (TypeError, exit 1)."""
    stream = run("pack", rel["r2"], "--base", rel["base1"], "-o", "-", "--parts", "app", "--delta-from",
                 rel["build"], sandbox=sb).stdout
    announced = json.loads(_stream_member(stream, "isep-needs.json"))
    forged = _with_member(stream, "isep-needs.json", json.dumps(HOSTILE_NEEDS[edit](announced)).encode())
    for cmd, args in (("join", [rel["build"], "-"]), ("verify", ["-"])):
        res = run(cmd, *args, stdin=forged, expect=4, sandbox=sb, out=tmp_path)
        assert "isep-needs.json" in res.error and not is_complete_archive(res.stdout)


def _stream_member(stream: bytes, name: str) -> bytes:
    from isep.tarstream import Source, TarReader
    for member in TarReader(Source(io.BytesIO(stream), prefetch=False)):
        if member.name == name:
            return member.read_all(1 << 24)
        member.skip()
    raise AssertionError(f"no {name} in the stream")


def _with_member(stream: bytes, name: str, data: bytes) -> bytes:
    """The stream with member NAME's data replaced (headers rewritten by isep's own tar writer)."""
    from isep.tarstream import Source, TarReader, padded
    from isep.tarwrite import build_header
    out = bytearray()
    for member in TarReader(Source(io.BytesIO(stream), prefetch=False)):
        body = data if member.name == name else member.read_all(1 << 30)
        out += build_header(member.name, len(body), mode=0o644) + body + bytes(padded(len(body)) - len(body))
    return bytes(out + bytes(1024))
