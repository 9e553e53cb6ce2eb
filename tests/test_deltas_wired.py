"""isep-pack --delta-from, and delta parts joined and verified: synthetic release series
(tests/release_samples.py) through the real commands, every join compared byte for byte."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest

from isep.limits import parse_delta_memory
from isep.errors import UsageError
from isep.tarstream import Source, TarReader
from isep.tarwrite import build_header
from tests.harness import copy_store, is_complete_archive, isep


def _delta_stream(rel, release: str, *extra, base: str = "base1", store: str = "build") -> bytes:
    res = isep("pack", rel[release], "--base", rel[base], "-o", "-", "--delta-from", rel[store], *extra, check=0)
    return res.stdout


def _manifest_of(stream: bytes) -> dict:
    for member in TarReader(Source(io.BytesIO(stream), prefetch=False)):
        if member.name == "isep-bundle.json":
            return json.loads(member.read_all(1 << 24))
        member.skip()
    raise AssertionError("no manifest in the stream")


def _origins(doc: dict) -> dict[str, str]:
    """layer diffID -> how it is shipped (reference, delta; plain when carried)."""
    layers = {d for im in doc["images"] for d in im["diff_ids"]}
    out = {}
    for part in doc["parts"]:
        for rec in part["members"]:
            if rec.get("sha256") in layers and rec["type"] == "file":
                out[rec["sha256"]] = (rec.get("from") or {}).get("kind", "plain")
    return out


def test_code_only_change_ships_a_small_delta_and_joins_byte_exact(rel, tmp_path):
    thin = _delta_stream(rel, "r2", "--parts", "app")
    plain = isep("pack", rel["r2"], "--base", rel["base1"], "-o", "-", "--parts", "app", check=0).stdout
    assert len(thin) * 10 < len(plain), (len(thin), len(plain))
    doc = _manifest_of(thin)
    assert doc["schema"] == "isep-bundle/2"
    assert sorted(_origins(doc).values()) == ["delta", "reference"]  # deps referenced, code a delta
    device = copy_store(rel["build"], tmp_path / "device")
    res = isep("join", device, "-", stdin=thin, check=0)
    assert res.stdout == rel["r2"].read_bytes()


def test_stream_announces_needs_before_the_delta_part(rel):
    names = [m.name for m in TarReader(Source(io.BytesIO(_delta_stream(rel, "r3", "--parts", "app")),
                                              prefetch=False))]
    assert names[0] == "isep-stream.json" and names[1] == "isep-needs.json"
    assert names[2].startswith("parts/") and names[-1] == "isep-bundle.json"


def test_changed_dependency_layer_in_a_store_directory(rel, tmp_path):
    """-o DIR: the delta part sits in the store beside its references; isep-join STORE applies it."""
    store = copy_store(rel["build"], tmp_path / "store")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    doc = json.loads((store / "isep-bundle.json").read_text())
    assert doc["schema"] == "isep-bundle/2"
    thin = next(p for p in doc["parts"] if p["file"] == "app_3_app_image.tar.zst")
    assert sorted(_origins({"parts": [thin], "images": doc["images"]}).values()) == ["delta", "delta"]
    assert thin["needs"] and all(n["part"] == "app_1_app_image.tar.zst" for n in thin["needs"])
    assert isep("join", store, "isep-delta/app:3", check=0).stdout == rel["r3"].read_bytes()
    assert isep("join", store, "isep-delta/app:1", check=0).stdout == rel["r1"].read_bytes()
    report = isep("verify", store, check=0).json
    assert any(c["check"] == "needs" and c["status"] == "ok" for c in report["checks"])
    assert not [n for n in store.iterdir() if n.name.startswith(".isep-tmp-")]


def test_base_update_under_an_unchanged_app(rel, tmp_path):
    """Release 4 changes only the base: the app's layers are referenced, the base is a delta."""
    build = copy_store(rel["build"], tmp_path / "build")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", build, check=0)
    device = copy_store(build, tmp_path / "device")
    stream = _delta_stream({**rel, "build": build}, "r4", base="base2")
    kinds = _origins(_manifest_of(stream))
    assert sorted(kinds.values()) == ["delta", "reference", "reference"], kinds
    assert len(stream) < 100_000
    assert isep("join", device, "-", stdin=stream, check=0).stdout == rel["r4"].read_bytes()


def test_multi_image_save(rel, tmp_path):
    """Two app images in one save: each joins as it does from the plain bundle."""
    thin = _delta_stream(rel, "r2+r3", "--parts", "app")
    plain = isep("pack", rel["r2+r3"], "--base", rel["base1"], "-o", "-", "--parts", "app", check=0).stdout
    assert len(thin) * 5 < len(plain)
    device = copy_store(rel["build"], tmp_path / "device")
    for image in ("isep-delta/app:2", "isep-delta/app:3"):
        got = isep("join", device, "-", "--image", image, stdin=thin, check=0).stdout
        want = isep("join", device, "-", "--image", image, stdin=plain, check=0).stdout
        assert got == want and is_complete_archive(got)


def test_multi_image_stream_kept_one_image_at_a_time(rel, tmp_path):
    """--keep keeps the delta parts its join rebuilt, plain; another image's stays out (with its
    image) until that image is joined with --keep from the same stream."""
    thin = _delta_stream(rel, "r2+r3", "--parts", "app")
    device = copy_store(rel["build"], tmp_path / "device")
    joined = {}
    for image, kept, left in (("isep-delta/app:2", "app_2", "app_3"), ("isep-delta/app:3", "app_3", None)):
        res = isep("join", device, "-", "--image", image, "--keep", stdin=thin, check=0)
        joined[image] = res.stdout
        doc = json.loads((device / "isep-bundle.json").read_text())
        files = {p["file"] for p in doc["parts"]}
        assert f"{kept}_app_image.tar.zst" in files and not any("needs" in p for p in doc["parts"])
        if left:
            assert f"not kept: {left}_app_image.tar.zst" in res.stderr
            assert f"{left}_app_image.tar.zst" not in files and not (device / f"{left}_app_image.tar.zst").exists()
            assert {t for im in doc["images"] for t in im["tags"]} == {"isep-delta/app:1", "isep-delta/app:2"}
    for image, stream_join in joined.items():
        assert isep("join", device, image, check=0).stdout == stream_join
    isep("verify", "--deep", device, check=0)
    assert not [n for n in device.iterdir() if n.name.startswith(".isep-tmp-")]


def test_keep_with_have_still_keeps_the_rebuilt_part(rel, tmp_path):
    """--keep --have: the archive leaves out the layers the engine holds, but the delta part is
    rebuilt whole and kept plain, so the store can join the release in full and take the next delta."""
    stream = _delta_stream(rel, "r2", "--parts", "app")
    device = copy_store(rel["build"], tmp_path / "device")
    have = f"{rel['build'] / 'isep-bundle.json'}:isep-delta/app:1"
    res = isep("join", device, "-", "--keep", "--have", have, stdin=stream, check=0)
    assert "left out (--have)" in res.stderr and "not kept" not in res.stderr
    assert len(res.stdout) < len(rel["r2"].read_bytes()) // 4
    kept = json.loads((device / "isep-bundle.json").read_text())
    assert "app_2_app_image.tar.zst" in {p["file"] for p in kept["parts"]}
    assert not any("needs" in p for p in kept["parts"])
    assert isep("join", device, "isep-delta/app:2", check=0).stdout == rel["r2"].read_bytes()


def test_missing_reference_is_refused_before_any_output(rel, tmp_path):
    other = tmp_path / "other"
    isep("pack", rel["r4"], "--base", rel["base2"], "-o", other, check=0)  # none of release 1's layers
    stream = _delta_stream(rel, "r3", "--parts", "app")
    res = isep("join", other, "-", stdin=stream, check=5)
    assert "needs layer" in res.error and "app_1_app_image.tar.zst" in res.error
    assert res.stdout == b""
    assert not [n for n in other.iterdir() if n.name.startswith(".isep-tmp-")]


def test_different_reference_is_refused(rel, tmp_path):
    """The store's part under the reference's name holds other bytes: exit 5, nothing that loads."""
    device = copy_store(rel["build"], tmp_path / "device")
    other = tmp_path / "other"
    isep("pack", rel["r4"], "--base", rel["base2"], "-o", other, check=0)
    shutil.copy(other / "app_4_app_image.tar.zst", device / "app_1_app_image.tar.zst")
    res = isep("join", device, "-", stdin=_delta_stream(rel, "r3", "--parts", "app"), check=5)
    assert not is_complete_archive(res.stdout)


def test_damaged_delta_is_refused(rel, tmp_path):
    store = copy_store(rel["build"], tmp_path / "store")
    isep("pack", rel["r2"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    doc = json.loads((store / "isep-bundle.json").read_text())
    thin = next(p for p in doc["parts"] if p["file"] == "app_2_app_image.tar.zst")
    delta = next(r for r in thin["members"] if (r.get("from") or {}).get("kind") == "delta")
    delta["from"]["record"]["target_diff_id"] = "sha256:" + "0" * 64
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    res = isep("join", store, "isep-delta/app:2", check=5)
    assert not is_complete_archive(res.stdout)


def test_verify_names_missing_references(rel, tmp_path):
    """A delta part copied without its store: isep-verify fails naming the part it needs."""
    upd = tmp_path / "upd"
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", upd, "--parts", "app", "--delta-from", rel["build"],
         check=0)
    res = isep("verify", upd, check=5)
    needs = [c for c in res.failed_checks() if c["check"] == "needs"]
    assert needs and "app_1_app_image.tar.zst" in needs[0]["detail"]
    stream = isep("verify", "-", stdin=_delta_stream(rel, "r3", "--parts", "app"), check=0).json
    assert any(c["check"] == "needs" and "receiver's store" in c["detail"] for c in stream["checks"])


def test_plain_when_the_delta_does_not_win_keeps_schema_1(rel, tmp_path):
    """A store holding only an unrelated base: no reference helps, the parts ship as without --delta-from."""
    base_only = tmp_path / "base-only"
    isep("pack", rel["r4"], "--base", rel["base2"], "-o", base_only, "--parts", "base", check=0)
    stream = _delta_stream({**rel, "build": base_only}, "r2", "--parts", "app")
    doc = _manifest_of(stream)
    assert doc["schema"] == "isep-bundle/1" and set(_origins(doc).values()) == {"plain"}
    device = copy_store(rel["build"], tmp_path / "device")
    assert isep("join", device, "-", stdin=stream, check=0).stdout == rel["r2"].read_bytes()


def test_delta_pack_without_deltas_writes_what_a_plain_pack_writes(rel, tmp_path):
    """Parts reach --delta-from's target plain and are compressed as they ship: with nothing to take a
    delta against, the store gets the very part files and isula-build manifest that a pack without
    --delta-from writes, the base part the receiver holds named with the receiver's hash."""
    held = tmp_path / "held"
    isep("pack", rel["r1"], "--base", rel["base1"], "-o", held, "--parts", "base", check=0)
    plain, delta = tmp_path / "plain", tmp_path / "delta"
    isep("pack", rel["r2"], "--base", rel["base1"], "-o", plain, check=0)
    isep("pack", rel["r2"], "--base", rel["base1"], "-o", delta, "--delta-from", held, check=0)
    doc = json.loads((delta / "isep-bundle.json").read_text())
    assert doc["schema"] == "isep-bundle/1" and [p["role"] for p in doc["parts"]] == ["app"]
    app = doc["parts"][0]["file"]
    assert (delta / app).read_bytes() == (plain / app).read_bytes()
    assert (delta / "manifest").read_bytes() == (plain / "manifest").read_bytes()
    isula = json.loads((delta / "manifest").read_text())
    base = json.loads((held / "isep-bundle.json").read_text())["parts"][0]
    assert {e["baseHash"] for e in isula.values()} == {base["sha256"].split(":")[1]}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (OpenSSH) is not installed")
def test_signed_delta_stream(rel, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f", str(tmp_path / "key")],
                   check=True)
    pub = " ".join((tmp_path / "key.pub").read_text().split()[:2])
    (tmp_path / "allowed").write_text(f"ci@example.org {pub}\n")
    build = tmp_path / "build"
    isep("pack", rel["r1"], "--base", rel["base1"], "-o", build, "--sign", tmp_path / "key", check=0)
    device = copy_store(build, tmp_path / "device")
    stream = _delta_stream({**rel, "build": build}, "r2", "--parts", "app", "--sign", tmp_path / "key")
    res = isep("join", device, "-", "--trust", tmp_path / "allowed", stdin=stream, check=0)
    assert res.stdout == rel["r2"].read_bytes()
    forged = re.sub(rb'("level": ?)3', rb"\g<1>4", stream)  # well formed, same length: the signature says no
    assert forged != stream
    assert not is_complete_archive(isep("join", device, "-", "--trust", tmp_path / "allowed", stdin=forged,
                                        check=5).stdout)
    malformed = re.sub(rb'"kind": ?"delta"', b'"kind":"delt4"', stream)  # refused before its signature is read
    assert not is_complete_archive(isep("join", device, "-", "--trust", tmp_path / "allowed", stdin=malformed,
                                        check=4).stdout)


def test_delta_memory_option():
    assert parse_delta_memory("1G") == 1 << 30 and parse_delta_memory("512MiB") == 512 << 20
    with pytest.raises(UsageError):
        parse_delta_memory("lots")
    with pytest.raises(UsageError):
        parse_delta_memory("1M")  # below two minimal segments


def test_bad_delta_options_are_usage_errors(rel, tmp_path):
    res = isep("pack", rel["r2"], "--base", rel["base1"], "-o", tmp_path / "x", "--delta-from", rel["build"],
               "--delta-memory", "huge", check=2)
    assert "--delta-memory" in res.error and not (tmp_path / "x").exists()
    isep("pack", rel["r2"], "--base", rel["base1"], "-o", tmp_path / "y", "--delta-from", tmp_path / "nowhere",
         check=3)
    assert not (tmp_path / "y").exists()


def _mutations():
    def header(rec):
        rec["header"] = "!!not base64!!"

    def header_name(rec):
        rec["header"] = base64.b64encode(build_header("../../evil", rec["size"])).decode()

    def kind(rec):
        rec["from"]["kind"] = "magic"

    def window(rec):
        rec["from"]["record"]["segments"][0]["window_log"] = 31

    def reference_size(rec):
        rec["from"]["reference"]["size"] += 1

    def member(rec):
        rec["from"]["member"] = "isep-delta/999"

    def padding(rec):
        rec["padding"] = "AAAA"

    return {f.__name__: f for f in (header, header_name, kind, window, reference_size, member, padding)}


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_hostile_delta_manifest_is_refused(rel, tmp_path, mutation):
    """A delta part's records changed (an unsigned store): refused with one error line, nothing that loads."""
    store = copy_store(rel["build"], tmp_path / "store")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    doc = json.loads((store / "isep-bundle.json").read_text())
    thin = next(p for p in doc["parts"] if p["file"] == "app_3_app_image.tar.zst")
    _mutations()[mutation](next(r for r in thin["members"] if (r.get("from") or {}).get("kind") == "delta"))
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    res = isep("join", store, "isep-delta/app:3")
    assert res.rc in (4, 5), res
    assert len(res.error_lines) == 1 and not is_complete_archive(res.stdout)
    assert not [n for n in store.iterdir() if n.name.startswith(".isep-tmp-")]


def test_partition_shows_what_pack_ships(rel):
    """isep-partition --delta-from: the plan's `shipping` names what isep-pack --delta-from then does."""
    index = isep("index", rel["r3"], check=0).stdout
    res = isep("partition", "--base", rel["base1"], "--delta-from", rel["build"], "--summary", stdin=index, check=0)
    rows = {r["layer"]: r for r in res.json["shipping"]}
    assert [r["ship"] for r in res.json["shipping"]] == ["reference", "delta", "delta"]
    assert all(r["reference"]["part"] for r in rows.values()) and "ships as" in res.stderr
    doc = _manifest_of(_delta_stream(rel, "r3"))
    for part in doc["parts"]:
        for rec in part["members"]:
            if rec.get("sha256") in rows and rows[rec["sha256"]]["part"] == part["file"]:
                assert (rec.get("from") or {}).get("kind", "plain") == rows[rec["sha256"]]["ship"]


def test_parts_the_receiver_holds_are_not_shipped(rel, tmp_path):
    """Without --parts, a base part whose stack the reference store holds is left out (as --parts app)."""
    stream = _delta_stream(rel, "r2")
    assert [p["role"] for p in _manifest_of(stream)["parts"]] == ["app"]
    device = copy_store(rel["build"], tmp_path / "device")
    assert isep("join", device, "-", stdin=stream, check=0).stdout == rel["r2"].read_bytes()


def test_verify_deep_decodes_every_delta(rel, tmp_path):
    store = copy_store(rel["build"], tmp_path / "store")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    report = isep("verify", "--deep", store, check=0).json
    assert any(c["check"] == "needs" and "2 delta(s) decoded" in c["detail"] for c in report["checks"])
    doc = json.loads((store / "isep-bundle.json").read_text())
    thin = next(p for p in doc["parts"] if p["file"] == "app_3_app_image.tar.zst")
    delta = next(r for r in thin["members"] if (r.get("from") or {}).get("kind") == "delta")
    delta["from"]["record"]["target_diff_id"] = "sha256:" + "1" * 64  # what only decoding reveals
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    isep("verify", store, check=0)
    failed = isep("verify", "--deep", store, check=5).failed_checks()
    assert [c["check"] for c in failed] == ["needs"] and "diffID" in failed[0]["detail"]


def test_keep_stores_the_rebuilt_part_and_the_chain_goes_on(rel, tmp_path):
    """--keep: the device keeps release 2's part plain (rebuilt), and release 3's delta against it joins."""
    build = copy_store(rel["build"], tmp_path / "build")
    device = copy_store(rel["build"], tmp_path / "device")
    for key in ("r2", "r3"):
        stream = _delta_stream({**rel, "build": build}, key, "--parts", "app")
        assert isep("join", device, "-", "--keep", stdin=stream, check=0).stdout == rel[key].read_bytes()
        isep("pack", rel[key], "--base", rel["base1"], "-o", build, check=0)  # the build host's mirror
        kept = json.loads((device / "isep-bundle.json").read_text())
        assert kept["schema"] == "isep-bundle/1" and not any("needs" in p for p in kept["parts"])
        assert isep("join", device, f"isep-delta/app:{key[1]}", check=0).stdout == rel[key].read_bytes()
    assert isep("verify", "--deep", device, check=0)
    assert not [n for n in device.iterdir() if n.name.startswith(".isep-tmp-")]
