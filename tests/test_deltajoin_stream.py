"""isep-join rebuilds delta parts while it streams (isep/deltajoin.py DeltaRebuild): a failure in the
middle of a rebuilt layer leaves an archive without its final metadata, and --keep commits the
rebuilt plain part only after a successful join, as isep-pack would have written it."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from types import SimpleNamespace

import pytest
import zstandard

from isep.deltajoin import SKIP_WORTH, member_chunks
from isep.errors import IntegrityError, IsepError
from isep.parts import PartWriter
from isep.partspan import NotFramed, load_span, member_span, span_pieces
from isep.tarstream import Source, TarReader
from isep.tarwrite import build_header
from tests.harness import copy_store, is_complete_archive, isep

APP1 = "app_1_app_image.tar.zst"


def _stream(rel, release: str) -> bytes:
    return isep("pack", rel[release], "--base", rel["base1"], "-o", "-", "--parts", "app", "--delta-from",
                rel["build"], check=0).stdout


def _env(tmp_path) -> dict:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def _names_until_damage(data: bytes) -> list[str]:
    """The members a reader gets from an output before it ends or breaks off."""
    names: list[str] = []
    try:
        for member in TarReader(Source(io.BytesIO(data), prefetch=False)):
            names.append(member.name)
            member.skip()
    except IsepError:
        pass
    return names


def _raw_part(path) -> bytes:
    with open(path, "rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()


def _flip_in_member(path, pick) -> None:
    """Rewrite a zstd part with one byte changed in the middle of the member `pick` chooses."""
    raw = bytearray(_raw_part(path))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        member = pick(tar.getmembers())
    raw[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(bytes(raw)))


def _largest(members):
    return max(members, key=lambda m: m.size)


def _snapshot(store) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.iterdir() if p.is_file()}


def test_damaged_reference_fails_mid_stream_without_final_metadata(rel, tmp_path):
    """Release 2 references release 1's dependency layer: the device's copy of it differs in one byte,
    so its bytes reach the output before its sha256 can fail: exit 5, and no manifest.json follows."""
    device = copy_store(rel["build"], tmp_path / "device")
    _flip_in_member(device / APP1, _largest)
    before = _snapshot(device)
    res = isep("join", device, "-", "--keep", stdin=_stream(rel, "r2"), env=_env(tmp_path), check=5)
    assert "sha256" in res.error and len(res.error_lines) == 1
    names = _names_until_damage(res.stdout)
    assert len(res.stdout) > 500_000 and names  # the base and the referenced layer were streamed
    assert "manifest.json" not in names and not is_complete_archive(res.stdout)
    assert _snapshot(device) == before  # --keep commits nothing after a failed join
    assert not [n for n in device.iterdir() if n.name.startswith(".isep-tmp-")]
    assert not os.listdir(tmp_path / "tmpdir")


def test_damaged_delta_fails_mid_stream_without_final_metadata(rel, tmp_path):
    """A delta whose bytes are damaged but whose part and manifest agree (an unsigned store rewritten):
    decoding fails in the middle of the join, exit 5, and the output has no final metadata."""
    store = copy_store(rel["build"], tmp_path / "store")
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", store, "--parts", "app", "--delta-from", store, check=0)
    part = store / "app_3_app_image.tar.zst"
    _flip_in_member(part, lambda members: _largest([m for m in members if m.name.startswith("isep-delta/")]))
    doc = json.loads((store / "isep-bundle.json").read_text())
    entry = next(p for p in doc["parts"] if p["file"] == part.name)
    data = part.read_bytes()
    entry.update(size=len(data), sha256="sha256:" + hashlib.sha256(data).hexdigest())
    entry.pop("xxh3", None)
    (store / "isep-bundle.json").write_text(json.dumps(doc))
    res = isep("join", store, "isep-delta/app:3", env=_env(tmp_path), check=5)
    assert len(res.error_lines) == 1
    names = _names_until_damage(res.stdout)
    assert names and "manifest.json" not in names and not is_complete_archive(res.stdout)
    assert not [n for n in store.iterdir() if n.name.startswith(".isep-tmp-")]
    assert not os.listdir(tmp_path / "tmpdir")
    failed = isep("verify", "--deep", store, env=_env(tmp_path), check=5).failed_checks()
    assert any(c["check"] == "needs" for c in failed)
    assert not os.listdir(tmp_path / "tmpdir")


def test_keep_commits_the_part_isep_pack_would_have_written(rel, tmp_path):
    """--keep after a successful join: the store gains release 3's app part as a plain part, with the
    very tar stream (members, headers, bytes) that isep-pack writes for it; nothing temporary stays."""
    device = copy_store(rel["build"], tmp_path / "device")
    res = isep("join", device, "-", "--keep", stdin=_stream(rel, "r3"), env=_env(tmp_path), check=0)
    assert res.stdout == rel["r3"].read_bytes()
    plain = tmp_path / "plain"
    isep("pack", rel["r3"], "--base", rel["base1"], "-o", plain, check=0)
    name = "app_3_app_image.tar.zst"
    assert _raw_part(device / name) == _raw_part(plain / name)
    kept = next(p for p in json.loads((device / "isep-bundle.json").read_text())["parts"] if p["file"] == name)
    packed = next(p for p in json.loads((plain / "isep-bundle.json").read_text())["parts"] if p["file"] == name)
    fields = ("seq", "name", "type", "size", "sha256")
    assert [{k: r.get(k) for k in fields} for r in kept["members"]] == \
        [{k: r.get(k) for k in fields} for r in packed["members"]]
    assert not any("from" in r for r in kept["members"]) and "needs" not in kept
    data = (device / name).read_bytes()
    assert kept["size"] == len(data) and kept["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert not [n for n in device.iterdir() if n.name.startswith(".isep-tmp-")]
    assert not os.listdir(tmp_path / "tmpdir")
    assert isep("join", device, "isep-delta/app:3", check=0).stdout == rel["r3"].read_bytes()


def test_without_keep_no_part_is_written(rel, tmp_path):
    device = copy_store(rel["build"], tmp_path / "device")
    before = _snapshot(device)
    res = isep("join", device, "-", stdin=_stream(rel, "r3"), env=_env(tmp_path), check=0)
    assert res.stdout == rel["r3"].read_bytes()
    assert _snapshot(device) == before and not os.listdir(tmp_path / "tmpdir")


def test_damaged_delta_reference_is_refused_before_its_layer(rel, tmp_path):
    """Release 3's dependency delta reads release 1's layer, damaged on the device: the reference is
    checked whole before the delta is decoded, so the layer never starts; exit 5 naming the reference."""
    device = copy_store(rel["build"], tmp_path / "device")
    _flip_in_member(device / APP1, _largest)
    res = isep("join", device, "-", stdin=_stream(rel, "r3"), env=_env(tmp_path), check=5)
    assert "is not the layer the delta was made against" in res.error and len(res.error_lines) == 1
    names = _names_until_damage(res.stdout)
    assert "manifest.json" not in names and not is_complete_archive(res.stdout)
    assert not os.listdir(tmp_path / "tmpdir")


def _framed_part(members: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    """A zstd part as PartWriter writes it (4 MiB frames) and its manifest entry's members."""
    out = io.BytesIO()
    out.close = lambda: None  # type: ignore[method-assign]
    writer = PartWriter("p.tar.zst", out, "zstd", 1)
    records = []
    for seq, (name, data) in enumerate(members):
        header = build_header(name, len(data), mode=0o644)
        padding = bytes(-len(data) % 512)
        for piece in (header, data, padding):
            writer.write(piece)
        records.append({"seq": seq, "name": name, "type": "file", "size": len(data),
                        "raw_size": len(header) + len(data) + len(padding)})
    writer.finish()
    return out.getvalue(), {"compression": "zstd", "members": records}


def test_member_loaded_from_frames_in_parallel_equals_the_stream():
    """load_span: a member starting inside one frame and ending inside another, with whole frames
    between, decompressed straight into a buffer; damage and frames without sizes are refused."""
    rng = random.Random(7)
    data = [rng.randbytes(n) for n in (3_000_001, 9_500_000, 700)]
    part, entry = _framed_part([(f"blobs/{i}", d) for i, d in enumerate(data)])
    for i, want in enumerate(data):
        start, size = member_span(entry, f"blobs/{i}")
        out = bytearray(size)
        load_span(io.BytesIO(part), start, memoryview(out), "p")
        assert out == want
    start, size = member_span(entry, "blobs/1")
    with pytest.raises(IntegrityError):
        load_span(io.BytesIO(part[:len(part) // 2]), start, memoryview(bytearray(size)), "p")
    plain = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    whole = b"".join(data)
    unsized = plain.compress(whole) + plain.flush()
    with pytest.raises(NotFramed):
        load_span(io.BytesIO(unsized), 0, memoryview(bytearray(len(whole))), "p")
    assert member_span({"members": [{"name": "a", "type": "file", "size": 5}]}, "a") is None


def test_member_streamed_by_its_frames_skips_what_lies_before_it():
    """span_pieces: the frames before a member are skipped unread (one damaged there does not
    matter), the member's own come in order, whole; a cut part is refused; a part whose frames do
    not say their sizes raises NotFramed before any piece (the caller then reads it as a stream)."""
    rng = random.Random(8)
    data = [rng.randbytes(n) for n in (9_000_000, 5_000_000, 300)]
    part, entry = _framed_part([(f"blobs/{i}", d) for i, d in enumerate(data)])
    for i, want in enumerate(data):
        start, size = member_span(entry, f"blobs/{i}")
        assert b"".join(span_pieces(io.BytesIO(part), start, size, "p")) == want
    start, size = member_span(entry, "blobs/2")
    damaged = bytearray(part)
    damaged[len(part) // 4] ^= 0xFF  # inside the first member's frames
    assert b"".join(span_pieces(io.BytesIO(bytes(damaged)), start, size, "p")) == data[2]
    with pytest.raises(IsepError):
        b"".join(span_pieces(io.BytesIO(bytes(damaged)), 0, len(data[0]), "p"))
    with pytest.raises(IntegrityError, match="ends at"):
        b"".join(span_pieces(io.BytesIO(part[:len(part) * 2 // 3]), *member_span(entry, "blobs/1"), "p"))
    plain = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    unsized = plain.compress(b"".join(data)) + plain.flush()
    with pytest.raises(NotFramed):
        next(span_pieces(io.BytesIO(unsized), start, size, "p"))


def test_member_chunks_takes_the_frames_when_others_lie_before_it():
    """deltajoin.member_chunks: a member 14 MB into its part read by its frames (a damaged frame
    before it is never decompressed), and from a part without frame sizes as a stream."""
    rng = random.Random(9)
    data = [rng.randbytes(n) for n in (9_000_000, 5_000_000, 300)]
    part, entry = _framed_part([(f"blobs/{i}", d) for i, d in enumerate(data)])
    entry["file"] = "p.tar.zst"
    assert member_span(entry, "blobs/2")[0] >= SKIP_WORTH
    damaged = bytearray(part)
    damaged[len(part) // 4] ^= 0xFF
    framed = SimpleNamespace(files={"p.tar.zst": lambda: io.BytesIO(bytes(damaged))}, path="/nonexistent")
    assert b"".join(member_chunks(framed, entry, "blobs/2")) == data[2]
    plain = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    unsized = plain.compress(_raw_tar(part)) + plain.flush()
    streamed = SimpleNamespace(files={"p.tar.zst": lambda: io.BytesIO(unsized)}, path="/nonexistent")
    assert b"".join(member_chunks(streamed, entry, "blobs/2")) == data[2]


def _raw_tar(part: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(part), read_across_frames=True).read()
