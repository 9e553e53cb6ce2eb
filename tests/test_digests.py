"""Member digests hashed beside the copy (digests.BackgroundHasher, archive.pass_member): the same
digests as hashing inline, errors raised in the caller, and chunks the reader reuses copied first."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

import pytest
import xxhash

from isep import archive
from isep.digests import BackgroundHasher, BlobHasher
from isep.errors import BadInput
from isep.tarstream import Source, TarReader


def _hash_both(chunks: list[bytes]) -> tuple[dict, dict]:
    inline, background = BlobHasher("m"), BackgroundHasher("m")
    for chunk in chunks:
        inline.update(chunk)
        background.update(chunk)
    return inline.result(), background.result()


def test_background_digests_equal_inline_ones():
    data = os.urandom(3 << 20)
    inline, background = _hash_both([data[i:i + 100_000] for i in range(0, len(data), 100_000)])
    assert background == inline
    assert background["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert background["xxh3"] == xxhash.xxh3_128(data).hexdigest()


def test_background_digests_of_a_gzip_member_include_its_diff_id():
    raw = os.urandom(1 << 20) + bytes(1 << 20)
    packed = gzip.compress(raw)
    inline, background = _hash_both([packed[:1000], packed[1000:]])
    assert background == inline
    assert background["diff_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert background["uncompressed_size"] == len(raw)


def test_background_error_is_raised_by_result():
    hasher = BackgroundHasher("layer.tar.gz")
    hasher.update(b"\x1f\x8b\x08\x00" + b"\xff" * 4096)  # a gzip header, then garbage
    with pytest.raises(BadInput, match="layer.tar.gz: corrupt gzip data"):
        hasher.result()


def test_a_reused_buffer_is_hashed_as_it_was_when_handed_over():
    buf = bytearray(b"a" * (1 << 20))
    hasher = BackgroundHasher("m")
    for _ in range(BackgroundHasher.QUEUED * 2):
        hasher.update(memoryview(buf))
        buf[:] = b"b" * len(buf)  # what a reader does with its slot once the caller asks for more
        buf[:] = b"a" * len(buf)
    hasher.update(memoryview(buf))
    buf[:] = b"z" * len(buf)
    want = hashlib.sha256(b"a" * (1 << 20) * (BackgroundHasher.QUEUED * 2 + 1)).hexdigest()
    assert hasher.result()["sha256"] == "sha256:" + want


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_pass_member_copies_and_hashes_large_members(monkeypatch, threshold):
    """Through a real tar stream (whose 1 MiB buffers are reused), hashed on a thread (threshold 0)
    or inline: the copy and the digests are the member's bytes either way."""
    monkeypatch.setattr(archive, "BACKGROUND_HASH_MIN", threshold)
    started: list[str] = []

    class Counted(BackgroundHasher):
        def __init__(self, what: str, **kw):
            started.append(what)
            super().__init__(what, **kw)

    monkeypatch.setattr(archive, "BackgroundHasher", Counted)
    blobs = {"a": os.urandom(5 << 20), "b": b"x" * ((3 << 20) + 7)}
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_bytes.seek(0)
    seen: dict[str, dict] = {}
    for member in TarReader(Source(tar_bytes, name="t")):
        copy = bytearray()
        seen[member.name] = {**archive.pass_member(member, [copy.extend], None), "copy": bytes(copy)}
    assert len(started) == (2 if threshold == 0 else 0)
    for name, data in blobs.items():
        assert seen[name]["copy"] == data
        assert seen[name]["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert seen[name]["xxh3"] == xxhash.xxh3_128(data).hexdigest()


def test_a_failing_copy_stops_the_hash_thread(monkeypatch):
    monkeypatch.setattr(archive, "BACKGROUND_HASH_MIN", 0)
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("big")
        info.size = 3 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    tar_bytes.seek(0)

    def broken_sink(chunk) -> None:
        raise BrokenPipeError("closed")

    hashers: list[BackgroundHasher] = []

    class Kept(BackgroundHasher):
        def __init__(self, what: str, **kw):
            super().__init__(what, **kw)
            hashers.append(self)

    monkeypatch.setattr(archive, "BackgroundHasher", Kept)
    member = next(iter(TarReader(Source(tar_bytes, name="t"))))
    with pytest.raises(BrokenPipeError):
        archive.pass_member(member, [broken_sink], None)
    assert len(hashers) == 1
    hashers[0]._thread.join(timeout=5)
    assert not hashers[0]._thread.is_alive()
