"""Hostile member names and links in raw tars: pack and join never extract, so nothing is written
outside DIR whatever the names; what is accepted goes through byte for byte (the archive's final
metadata members last, where join writes them after its checks), and what cannot be interpreted
safely is refused. Names a loader reads otherwise than isep (not clean, repeated, links out of the
archive: see tests/faults/test_ambiguous.py) are refused since issue #11."""
from __future__ import annotations

import json

import pytest

from . import craft
from tests.harness import copy_store, is_complete_archive, run

BLOB = "blobs/sha256/"


def _hostile(samples) -> dict[str, tuple[bytes, int]]:
    """name -> (archive, status of index/pack)."""
    app = samples["docker-oci"]["app1"].read_bytes()
    members, _ = craft.split(app)
    first_layer = json.loads(craft.get(app, "manifest.json"))[0]["Layers"][0]
    add = lambda ms, at="start": craft.with_members(app, ms, at=at)  # noqa: E731
    cases = {
        "absolute": (add([craft.member("/etc/isep-evil", b"evil\n")]), 4),  # docker reads etc/isep-evil
        "dotdot": (add([craft.member("../../../sibling/x", b"evil\n")]), 4),  # docker: breakout
        "dotdot-inside": (add([craft.member("blobs/../../sibling/x", b"evil\n")], "end"), 4),
        "nul-in-pax-path": (add([craft.member("a\x00b/../../sibling/x", b"evil\n")]), 0),  # every reader: "a"
        "control-bytes": (add([craft.member("ctrl-\x1b[31mred\x07\r\n", b"x")]), 0),
        "very-long-name": (add([craft.member("d/" + "n" * 20000, b"x")]), 0),
        "pax-over-1MiB": (add([craft.member("d/" + "n" * (1 << 20), b"x")]), 4),
        "symlink-outside": (add([craft.member("blobs/evil", typeflag=b"2", linkname="../../../../sibling/x")]), 4),
        "hardlink-outside": (add([craft.member("blobs/evil2", typeflag=b"1", linkname="/etc/shadow")]), 4),
        "case-collision": (add([craft.member("Manifest.json", b"[]")], "end"), 0),
        "duplicate-manifest-first": (add([craft.member("manifest.json", b"[]")]), 4),  # loaders: last copy
        "duplicate-layer-first": (add([craft.member(first_layer, b"not the layer")]), 4),
        "duplicate-layer-last": (add([craft.member(first_layer, b"not the layer")], "end"), 4),
        "duplicate-manifest-last": (add([craft.member("manifest.json", b"[]")], "end"), 4),
        "layer-is-symlink-outside": (craft.build(
            [craft.member(m.name, typeflag=b"2", linkname="/etc/passwd") if m.name == first_layer else m
             for m in members]), 4),
        "layer-is-hardlink-loop": (craft.build(
            [craft.member(m.name, typeflag=b"1", linkname=m.name) if m.name == first_layer else m
             for m in members]), 4),
        "dir-with-data": (add([craft.member("weird-dir/", b"", typeflag=b"5")]), 0),
    }
    assert len({a for a, _ in cases.values()}) == len(cases)
    return cases


@pytest.fixture(scope="module")
def hostile(samples):
    return _hostile(samples)


NAMES = ["absolute", "dotdot", "dotdot-inside", "nul-in-pax-path", "control-bytes", "very-long-name",
         "pax-over-1MiB", "symlink-outside", "hardlink-outside", "case-collision",
         "duplicate-manifest-first", "duplicate-layer-first", "duplicate-layer-last",
         "duplicate-manifest-last", "layer-is-symlink-outside", "layer-is-hardlink-loop", "dir-with-data"]


@pytest.mark.parametrize("case", NAMES)
def test_hostile_archive(case, hostile, samples, sb):
    archive, status = hostile[case]
    s = samples["docker-oci"]
    path = sb.put("in.tar", archive)
    refs = ["--base", s["inspect-base"], "--lib", s["inspect-lib"]]
    sb.out.mkdir()
    run("pack", path, *refs, "-o", sb.out / "file", expect=status, sandbox=sb)
    res = run("pack", *refs, "-o", sb.out / "piped", stdin=archive, expect=status, sandbox=sb)
    if status:
        assert "\x1b" not in res.stderr and "\r" not in res.stderr
        assert sorted(sb.out.iterdir()) == []  # not even the empty directories it made
        return
    for store in (sb.out / "file", sb.out / "piped"):  # join checks every hash and diffID
        joined = run("join", store, sandbox=sb).stdout
        assert joined == craft.metadata_last(archive), f"{store}: not byte for byte"


def test_error_messages_escape_control_bytes(samples, sb):
    """A layer path with a newline, CR and escape sequences in manifest.json shows up escaped in
    the one error line (it can neither add a line nor drive the terminal)."""
    app = samples["docker-oci"]["app1"].read_bytes()
    manifest = json.loads(craft.get(app, "manifest.json"))
    manifest[0]["Layers"][0] = "evil\n\risep-index: error: forged\x1b[2J"
    path = sb.put("in.tar", craft.replace(app, "manifest.json", json.dumps(manifest).encode()))
    res = run("index", path, expect=4, sandbox=sb)
    assert "\x1b" not in res.stderr and "\r" not in res.stderr and len(res.lines) == 1
    assert "\\x1b" in res.stderr


def _stream(members: list) -> bytes:
    head = craft.member("isep-stream.json", b'{"schema": "isep-stream/1"}')
    return craft.build([head] + members)


@pytest.mark.parametrize("chunk_name", ["parts/../../sibling/x/000000", "parts/..%2f/000000",
                                        "parts/isep-bundle.json/000000", "parts/manifest/000000",
                                        "parts/.isep-tmp-x/000000", "parts//000000", "parts/a/b/000000",
                                        "parts/a/000001", "../../sibling/x"])
def test_bundle_stream_with_hostile_chunk_names(chunk_name, stores, sb):
    """A forged bundle stream: nothing lands outside the receiving temporary directory, which is
    removed; the store the stream is joined with is not touched."""
    stream = _stream([craft.member(chunk_name, b"\x28\xb5\x2f\xfdevil")])
    path = sb.put("stream", stream)
    run("join", "-", stdin=path, expect=4, sandbox=sb)
    store = sb.out
    copy_store(stores["docker-oci"], store)
    run("join", store, "-", stdin=path, expect=4, sandbox=sb)
    run("verify", "-", stdin=path, expect=(4, 5), report=True, sandbox=sb)


def test_bundle_stream_manifest_naming_outside(stores, samples, sb):
    """A stream whose manifest lists `../x` as a part file is refused before anything is joined."""
    s = samples["docker-oci"]
    stream = run("pack", s["app1"], "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", "-").stdout
    members, trailer = craft.split(stream)
    doc = json.loads(members[-1].data)
    doc["parts"][0]["file"] = "../../sibling/x"
    members[-1] = craft.member(members[-1].name, json.dumps(doc).encode())
    path = sb.put("stream", craft.build(members, trailer))
    out = run("join", "-", stdin=path, expect=4, sandbox=sb)
    assert not is_complete_archive(out.stdout)
