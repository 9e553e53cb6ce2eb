"""isep.delta: prefix deltas of one layer against another, segmentation, refusals, ranking. Every
test runs with both decoders: libzstd through ctypes (isep.prefixdecode, the default) and the
zstd binding (its fallback)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isep import delta, prefixdecode
from isep.delta import DeltaRecord, Reference, decode_layer, encode_layer, plan_segments, zstd
from isep.deltarank import LayerInfo, rank_references
from isep.errors import BadInput, EnvironmentFailure, IntegrityError, Truncated


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks_of(data: bytes, size: int = 65536):
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def reference(data: bytes, chunk: int = 65536) -> Reference:
    return Reference(len(data), diff_id(data), lambda: iter(chunks_of(data, chunk)), "ref.tar")


def layer_tar(files: dict[str, bytes], mtime: int = 1_700_000_000) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(files[name]), mtime
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def text_files(seed: int, count: int = 60, size: int = 20000) -> dict[str, bytes]:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    return {f"app/mod{i:03d}.py": b" ".join(rng.choice(words) for _ in range(size // 6)) for i in range(count)}


def encode(target: bytes, ref: bytes, **kw) -> tuple[DeltaRecord, bytes]:
    out = bytearray()
    record = encode_layer(chunks_of(target), len(target), reference(ref), out.extend, **kw)
    return record, bytes(out)


def decode(record: DeltaRecord, blob: bytes, ref: bytes | Reference | None, **kw) -> bytes:
    if isinstance(ref, bytes):
        ref = reference(ref)
    return b"".join(bytes(p) for p in decode_layer(record, chunks_of(blob, 7777), ref, **kw))


@pytest.fixture(autouse=True, params=["libzstd", "binding"])
def decoder(request, monkeypatch):
    if request.param == "libzstd":
        monkeypatch.delenv("ISEP_ZSTD_CTYPES", raising=False)
        assert prefixdecode.available(), "libzstd.so.1 is on every Debian system: the in-place decoder must load"
    else:
        monkeypatch.setenv("ISEP_ZSTD_CTYPES", "0")
    return request.param


@pytest.fixture(scope="module")
def release_pair():
    old = text_files(1)
    new = dict(old)
    for name in list(new)[::12]:   # 5 of 60 modules edited
        new[name] = new[name][:5000] + b"# fixed\n" + new[name][5000:]
    return layer_tar(old), layer_tar(new, mtime=1_700_086_400)


def test_round_trip_is_byte_exact_and_small(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    assert decode(record, blob, old) == new
    assert record.method == "prefix" and record.target_diff_id == diff_id(new)
    assert record.size == len(blob) and record.sha256 == diff_id(blob)
    plain = len(zstd.compress(new, 3))
    assert record.size * 20 < plain, (record.size, plain)


def test_one_segment_delta_is_a_standard_prefix_frame(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    assert len(record.segments) == 1
    back = zstd.decompress(blob, zstd_dict=zstd.ZstdDict(old, is_raw=True).as_prefix,
                           options={zstd.DecompressionParameter.window_log_max: 31})
    assert back == new


@pytest.mark.skipif(shutil.which("zstd") is None and not os.environ.get("CI"),
                    reason="the zstd CLI is not installed (tests/run.sh installs it)")
def test_one_segment_delta_is_what_the_zstd_cli_decodes(release_pair, tmp_path):
    old, new = release_pair
    record, blob = encode(new, old)
    (tmp_path / "ref").write_bytes(old)
    (tmp_path / "delta.zst").write_bytes(blob)
    out = subprocess.run(["zstd", "-q", "-d", "--long=31", f"--patch-from={tmp_path / 'ref'}",
                          str(tmp_path / "delta.zst"), "-c"], check=True, capture_output=True).stdout
    assert out == new


def test_record_survives_json(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    again = DeltaRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    assert decode(again, blob, old) == new


def test_wrong_reference_is_refused_before_any_output(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    other = old.replace(b"mod000", b"modXXX", 1)
    with pytest.raises(IntegrityError, match="made against"):
        next(iter(decode_layer(record, [blob], reference(other))))
    lying = Reference(len(other), record.reference_diff_id, lambda: iter([other]), "lying.tar")
    produced = []
    with pytest.raises(IntegrityError, match="not the layer the delta was made against"):
        for piece in decode_layer(record, [blob], lying):
            produced.append(piece)
    assert produced == []


def test_reference_checked_by_xxh3_when_known(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    fast = Reference(len(old), diff_id(old), lambda: iter([old]), "ref", xxh3=xxhash.xxh3_128(old).hexdigest())
    assert decode(record, blob, fast) == new
    other = old[:1000] + b"X" + old[1001:]
    lying = Reference(len(old), diff_id(old), lambda: iter([other]), "ref", xxh3=xxhash.xxh3_128(old).hexdigest())
    with pytest.raises(IntegrityError, match="not the layer"):
        decode(record, blob, lying)


def test_reference_read_through_a_reused_buffer(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)

    def reused():  # as a readinto-based reader hands out one buffer, refilled
        buf = bytearray(4096)
        for i in range(0, len(old), 4096):
            piece = old[i:i + 4096]
            buf[:len(piece)] = piece
            yield memoryview(buf)[:len(piece)]

    ref = Reference(len(old), diff_id(old), reused, "ref")
    assert b"".join(bytes(p) for p in decode_layer(record, [blob], ref)) == new


def test_target_read_through_a_reused_buffer(release_pair):
    """The diffID and the plain estimate run beside the compression: each piece must be seen whole by
    both before the reader refills its buffer."""
    old, new = release_pair

    def reused():
        buf = bytearray(65536)
        for i in range(0, len(new), 65536):
            piece = new[i:i + 65536]
            buf[:len(piece)] = piece
            yield memoryview(buf)[:len(piece)]
            buf[:] = bytes(len(buf))  # what a refill would leave there

    out = bytearray()
    record = encode_layer(reused(), len(new), reference(old), out.extend)
    assert record.target_diff_id == diff_id(new)
    assert record.plain_estimate == encode(new, old)[0].plain_estimate
    assert b"".join(bytes(p) for p in decode_layer(record, [bytes(out)], reference(old))) == new


def test_missing_reference_is_refused(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    with pytest.raises(IntegrityError, match="needs the reference layer sha256:"):
        decode(record, blob, None)


def test_damaged_delta_never_passes(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    for pos in (20, len(blob) // 2, len(blob) - 6):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises((IntegrityError, Truncated)):
            decode(record, bytes(bad), old)
    with pytest.raises(Truncated):
        decode(record, blob[:-3], old)
    with pytest.raises(IntegrityError, match="after the delta's last frame"):
        decode(record, blob + b"\0", old)


def test_target_diff_id_is_checked(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    record.target_diff_id = diff_id(b"something else")
    with pytest.raises(IntegrityError, match="rebuilt from its delta with diffID"):
        decode(record, blob, old)


def test_bomb_is_cut_at_the_declared_size():
    ref = b"x" * 100000
    bomb = zstd.compress(b"\0" * (64 << 20), 19)
    record = DeltaRecord(diff_id(b""), 1 << 20, diff_id(ref), len(ref),
                         [delta.Segment(0, 1 << 20, 0, 0, "plain", size=len(bomb))], size=len(bomb))
    produced = 0
    with pytest.raises(IntegrityError, match="expands beyond"):
        for piece in decode_layer(record, [bomb], None):
            produced += len(piece)
    assert produced <= 1 << 20


def test_a_prefix_frame_larger_than_its_segment_is_cut(release_pair):
    """The in-place decoder's buffer is the segment's size: a frame that says more is refused."""
    old, new = release_pair
    record, blob = encode(new, old)
    record.segments[0].target_size = record.target_size = len(new) - 1000
    produced = 0
    with pytest.raises(IntegrityError, match="expands beyond|decode against"):
        for piece in decode_layer(record, chunks_of(blob), reference(old)):
            produced += len(piece)
    assert produced <= len(new) - 1000


def test_pieces_stay_valid_while_later_ones_decode(release_pair):
    """Views into one output buffer: each written once, never again, so a reader may hold them."""
    old, new = release_pair
    record, blob = encode(new, old)
    pieces = list(decode_layer(record, chunks_of(blob, 100), reference(old)))
    assert len(pieces) > 1 or len(new) <= delta.PIECE
    assert b"".join(bytes(p) for p in pieces) == new


def test_memory_cap_refuses_a_record_that_needs_more(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    with pytest.raises(EnvironmentFailure, match="--delta-memory"):
        decode(record, blob, old, memory=len(old))


def test_hostile_record_fields_are_bad_input(release_pair):
    old, new = release_pair
    doc = encode(new, old)[0].to_json()
    for change in ({"target_size": -1}, {"segments": []}, {"reference_diff_id": "md5:x"},
                   {"segments": [{**doc["segments"][0], "window_log": 31}]},
                   {"segments": [{**doc["segments"][0], "ref_size": len(old) + 1}]},
                   {"size": doc["size"] + 1}):
        with pytest.raises(BadInput):
            DeltaRecord.from_json({**doc, **change})


def test_segmentation_round_trip_with_a_small_cap(monkeypatch):
    monkeypatch.setattr(delta, "MIN_SEGMENT", 64 << 10)
    monkeypatch.setattr(delta, "TABLES", 0)
    old = layer_tar(text_files(2, count=80))
    new = layer_tar({**text_files(2, count=80), "app/mod040.py": b"changed\n" * 100}, mtime=1_700_000_100)
    cap = len(old) // 2
    record, blob = encode(new, old, memory=cap)
    assert record.method == "segmented" and len(record.segments) >= 3
    assert record.memory() <= cap and "segmented" in record.note
    assert decode(record, blob, old, memory=cap) == new
    assert record.size * 5 < len(zstd.compress(new, 3))


def test_segmented_decode_checks_the_whole_reference_at_the_end(monkeypatch):
    monkeypatch.setattr(delta, "MIN_SEGMENT", 64 << 10)
    monkeypatch.setattr(delta, "TABLES", 0)
    old = layer_tar(text_files(3, count=80))
    new = layer_tar(text_files(3, count=80), mtime=5)
    record, blob = encode(new, old, memory=len(old) // 2)
    tail_changed = old[:-2048] + b"\1" + old[-2047:]
    lying = Reference(len(old), record.reference_diff_id, lambda: iter(chunks_of(tail_changed)), "lying")
    with pytest.raises(IntegrityError):
        decode(record, blob, lying, memory=len(old) // 2)


def test_plain_when_no_segmentation_fits(monkeypatch):
    monkeypatch.setattr(delta, "MIN_SEGMENT", 1 << 20)
    segments, note = plan_segments(4 << 20, 4 << 20, memory=2 << 20)
    assert [s.method for s in segments] == ["plain"] and note.startswith("plain:")
    old, new = layer_tar(text_files(4)), layer_tar(text_files(5))
    record, blob = encode(new, old, memory=64 << 10)
    assert record.method == "plain"
    assert decode(record, blob, None, memory=64 << 10) == new


def test_plan_segments_stay_in_bounds_and_monotonic():
    for target, ref, cap in [(3 << 30, 2 << 30, 1 << 30), (1 << 30, 1 << 30, 1 << 30), (5 << 30, 1, 1 << 30)]:
        segments, _ = plan_segments(target, ref, cap)
        assert sum(s.target_size for s in segments) == target
        assert all(s.memory() <= cap for s in segments)
        starts = [s.ref_offset for s in segments]
        assert starts == sorted(starts)
        assert all(s.ref_offset + s.ref_size <= ref for s in segments)


def test_plain_estimate_and_to_plain(release_pair):
    old, new = release_pair
    record, blob = encode(new, old)
    plain = len(zstd.compress(new, 3))
    assert 0.5 * plain < record.plain_estimate < 2 * plain
    unrelated = bytes(random.Random(9).randbytes(300000))
    record, blob = encode(unrelated, old)
    assert record.size >= record.plain_estimate * 0.9  # nothing gained: the caller ships plain
    out = bytearray()
    size = delta.to_plain(record, [blob], reference(old), out.extend)
    assert size == len(out) and zstd.decompress(bytes(out)) == unrelated


def test_declared_size_must_match():
    data = b"abc" * 1000
    with pytest.raises(Truncated):
        encode_layer([data], len(data) + 1, reference(b"x" * 100), bytearray().extend)
    with pytest.raises(BadInput, match="larger than"):
        encode_layer([data], len(data) - 1, reference(b"x" * 100), bytearray().extend)


def test_rank_references_prefers_same_repository_and_position():
    target = LayerInfo("sha256:" + "1" * 64, 100 << 20, "apps/web", 3, "app", "RUN pip install -r req.txt")
    same_spot = LayerInfo("sha256:" + "2" * 64, 90 << 20, "apps/web", 3, "app", "RUN pip install -r req.txt")
    other_repo = LayerInfo("sha256:" + "3" * 64, 100 << 20, "apps/api", 3, "app", "RUN pip install -r req.txt")
    base = LayerInfo("sha256:" + "4" * 64, 100 << 20, "os/base", 0, "base", "ADD rootfs /")
    itself = LayerInfo(target.diff_id, target.size, "apps/web", 3)
    assert rank_references(target, [base, other_repo, itself, same_spot]) == [same_spot, other_repo, base]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=20000), st.lists(st.tuples(st.integers(0, 20000), st.binary(max_size=300)),
                                           max_size=6), st.integers(1, 5000))
def test_round_trip_property(old, edits, chunk):
    new = bytearray(old)
    for pos, data in edits:
        pos = min(pos, len(new))
        new[pos:pos + len(data) // 2] = data
    new = bytes(new)
    out = bytearray()
    record = encode_layer(chunks_of(new, chunk), len(new), reference(old, chunk), out.extend)
    ref = reference(old, chunk) if old else None
    assert b"".join(bytes(p) for p in decode_layer(record, chunks_of(bytes(out), chunk), ref)) == new


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 40), st.integers(2, 40), st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(max_size=200)),
                                                      max_size=8), st.integers(3, 12))
def test_segmented_round_trip_property(old_kib, new_kib, edits, cap_kib):
    """Any sizes, edits and cap: the plan tiles the layer within the cap and decodes byte-exact."""
    saved = delta.MIN_SEGMENT, delta.TABLES
    delta.MIN_SEGMENT, delta.TABLES = 1024, 0
    try:
        rng = random.Random(old_kib * 1000 + new_kib)
        words = [bytes(rng.choice(b"abcdefgh") for _ in range(6)) for _ in range(64)]
        old = b" ".join(rng.choice(words) for _ in range(old_kib * 150))
        new = bytearray(old[:new_kib << 10])
        for pos, data in edits:
            pos = pos % (len(new) + 1)
            new[pos:pos] = data
        new = bytes(new)
        cap = cap_kib << 10
        out = bytearray()
        record = encode_layer(chunks_of(new, 3000), len(new), reference(old, 5000), out.extend, memory=cap)
        assert record.method == "plain" or record.memory() <= cap
        back = decode_layer(record, chunks_of(bytes(out), 999), reference(old, 777), memory=cap)
        assert b"".join(bytes(p) for p in back) == new
    finally:
        delta.MIN_SEGMENT, delta.TABLES = saved


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, 64), st.integers(1, 9000))
def test_damaged_delta_bytes_fail_cleanly_or_rebuild_exactly(release_pair, flips, cut, chunk):
    """Any flipped bytes and any cut: a refusal (IntegrityError, Truncated) or the exact layer, never
    a crash or a wrong layer, whichever decoder (libzstd in place, or the binding) runs."""
    old, new = release_pair
    record, blob = encode(new, old)
    bad = bytearray(blob[:len(blob) - cut] if cut else blob)
    for pos, xor in flips:
        bad[pos % len(bad)] ^= xor
    try:
        out = b"".join(bytes(p) for p in decode_layer(record, chunks_of(bytes(bad), chunk), reference(old)))
    except (IntegrityError, Truncated):
        return
    assert out == new
