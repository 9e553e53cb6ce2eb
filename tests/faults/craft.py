"""Crafting hostile input: raw tar members, archives rebuilt with changed members, and bundles forged
so that every hash in the bundle manifest matches (an attacker who rewrites the manifest too)."""
from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import xxhash
import zstandard

from isep.join import FINAL_METADATA
from isep.samples import tar_header
from isep.tarstream import Source, TarReader

BLOCK = 512


@dataclass
class Raw:
    name: str
    kind: str
    offset: int
    header: bytes
    data: bytes
    padding: bytes

    @property
    def raw(self) -> bytes:
        return self.header + self.data + self.padding

    @property
    def data_offset(self) -> int:
        return self.offset + len(self.header)


def split(archive: bytes) -> tuple[list[Raw], bytes]:
    """The members of a (well-formed) archive, and its trailer."""
    out = []
    reader = TarReader(Source(io.BytesIO(archive), prefetch=False))
    for m in reader:
        data = b"".join(bytes(c) for c in m.iter_data())
        out.append(Raw(m.name, m.kind, m.offset, m.header, data, m.padding))
    return out, reader.trailer


def member(name: str, data: bytes = b"", *, typeflag: bytes = b"0", linkname: str = "",
           mode: int = 0o644) -> Raw:
    """A member as Go's archive/tar writes it (a PAX record for long or non-ASCII names)."""
    size = len(data) if typeflag in (b"0", b"\0", b"7") else 0
    header = tar_header(name, size, mode=mode, typeflag=typeflag, linkname=linkname)
    body = data if size else b""
    return Raw(name, "", 0, header, body, bytes(-len(body) % BLOCK))


def raw_member(header_block: bytes, data: bytes = b"") -> Raw:
    """A member from a hand-made 512-byte header (the checksum is filled in)."""
    block = bytearray(header_block.ljust(BLOCK, b"\0")[:BLOCK])
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return Raw("", "", 0, bytes(block), data, bytes(-len(data) % BLOCK))


def build(members: list[Raw], trailer: bytes = bytes(1024)) -> bytes:
    return b"".join(m.raw for m in members) + trailer


def replace(archive: bytes, name: str, data: bytes) -> bytes:
    """The archive with member `name` holding other data (a fresh header of the right size)."""
    members, trailer = split(archive)
    assert any(m.name == name for m in members), name
    return build([member(name, data) if m.name == name else m for m in members], trailer)


def get(archive: bytes, name: str) -> bytes:
    members, _ = split(archive)
    return next(m.data for m in members if m.name == name)


def with_members(archive: bytes, extra: list[Raw], *, at: str = "end") -> bytes:
    members, trailer = split(archive)
    members = extra + members if at == "start" else members + extra
    return build(members, trailer)


def metadata_last(archive: bytes) -> bytes:
    """The archive as isep-join writes it: every member in its order but the final metadata members
    (held back until every check passed), which follow them in theirs; the same bytes for a save
    that ends with its metadata, as every producer's does."""
    members, trailer = split(archive)
    meta = [m for m in members if m.name in FINAL_METADATA]
    return build([m for m in members if m.name not in FINAL_METADATA] + meta, trailer)


def drop(archive: bytes, name: str) -> bytes:
    members, trailer = split(archive)
    return build([m for m in members if m.name != name], trailer)


def metadata_json(archive: bytes, name: str):
    return json.loads(get(archive, name))


def gzip_bytes(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def gzip_zeros(n: int) -> bytes:
    """A gzip stream of n zero bytes, made in 1 MiB steps (about n / 1000 bytes)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    out = [c.compress(chunk) for _ in range(n >> 20)]
    out.append(c.compress(bytes(n & ((1 << 20) - 1))))
    out.append(c.flush())
    return b"".join(out)


def zstd_zeros(n: int, *, window_log: int = 20, content_size: bool = False) -> bytes:
    """A zstd frame of n zero bytes (RLE blocks: about n / 32768 bytes)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log,
                                                          write_content_size=content_size)
    return _zstd_stream_zeros(zstandard.ZstdCompressor(compression_params=params), n)


def _zstd_stream_zeros(cctx, n: int) -> bytes:
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:
        chunk = bytes(1 << 20)
        for _ in range(n >> 20):
            w.write(chunk)
        w.write(bytes(n & ((1 << 20) - 1)))
    return out.getvalue()


def zstd_frame_with_window(window_log: int, payload: bytes = b"x" * 4096) -> bytes:
    """A valid frame that declares a window of 2**window_log bytes (no content size, so the
    decoder must honour the window)."""
    params = zstandard.ZstdCompressionParameters(window_log=window_log, enable_ldm=True,
                                                 write_content_size=False, write_checksum=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(payload)


# --- bundles ---------------------------------------------------------------------------------------

def decompress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(data)
    if compression == "gzip":
        return zlib.decompress(data, 31)
    return data


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    if compression == "gzip":
        return gzip_bytes(data)
    return data


def member_records(tar: bytes, old: list[dict]) -> list[dict]:
    """Manifest member records for a part's tar; seqs kept by position, new ones after the rest."""
    from isep.archive import member_record
    from isep.digests import BlobHasher
    out = []
    next_seq = max([r["seq"] for r in old] + [0]) + 1000
    for i, m in enumerate(TarReader(Source(io.BytesIO(tar), prefetch=False))):
        seq = old[i]["seq"] if i < len(old) else next_seq + i
        rec = member_record(m, seq)
        if m.is_file:
            h = BlobHasher(m.name)
            for c in m.iter_data():
                h.update(c)
            rec.update(h.result())
        out.append({k: rec[k] for k in ("seq", "name", "type", "size", "raw_size", "mode", "link",
                                        "sha256", "xxh3", "diff_id", "compression") if k in rec})
    return out


def forge_part(store: Path, file_name: str, *, tar: bytes | None = None, stored: bytes | None = None,
               raw_size: int | None = None, members: list[dict] | None = None) -> None:
    """Replace a part's file and rewrite its manifest entry to match (size, sha256, xxh3; raw_size
    and members from the new tar unless given): only a signature would notice."""
    path = store / "isep-bundle.json"
    doc = json.loads(path.read_text())
    entry = next(p for p in doc["parts"] if p["file"] == file_name)
    if stored is None:
        stored = compress(tar, entry["compression"])
    (store / file_name).write_bytes(stored)
    entry.update(size=len(stored), sha256="sha256:" + hashlib.sha256(stored).hexdigest(),
                 xxh3=xxhash.xxh3_128(stored).hexdigest())
    if tar is not None:
        entry["raw_size"] = len(tar)
        entry["members"] = member_records(tar, entry["members"]) if members is None else members
    if raw_size is not None:
        entry["raw_size"] = raw_size
    if members is not None:
        entry["members"] = members
    path.write_text(json.dumps(doc, indent=1) + "\n")


def edit_manifest(store: Path, fn) -> None:
    path = store / "isep-bundle.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def part_tar(store: Path, file_name: str) -> bytes:
    doc = json.loads((store / "isep-bundle.json").read_text())
    entry = next(p for p in doc["parts"] if p["file"] == file_name)
    return decompress((store / file_name).read_bytes(), entry["compression"])
