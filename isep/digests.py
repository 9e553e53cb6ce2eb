"""Digests of member data: sha256 and xxh3-128 of the stored bytes, and the diffID of compressed layers."""
from __future__ import annotations

import hashlib
import zlib
from typing import Any, Iterator, cast

import xxhash
import zstandard
from isal import isal_zlib

from .errors import BadInput

# isal's stub declares its error an instance; it is the exception class ISA-L's inflate raises
ISAL_ERROR = cast("type[Exception]", isal_zlib.error)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_ZSTD_WINDOW = 1 << 27  # frames asking for a larger window are refused (zstd bombs)
OUT_PIECE = 1 << 20         # gzip: decompressed bytes produced per step
ZSTD_SLICE = 1024            # zstd: compressed bytes per step (at most 32 MiB out: 4-byte RLE blocks)


def digest_hex(digest: str) -> str:
    """The hex part of "sha256:<hex>" (a digest is always written with its algorithm)."""
    return digest.partition(":")[2]


def sniff_compression(head: bytes | memoryview) -> str | None:
    head = bytes(head[:4])
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class Decompressor:
    """Incremental gzip (multi-member) or zstd (multi-frame) decompression."""

    def __init__(self, kind: str, what: str):
        self.kind = kind
        self.what = what
        self._new()

    def _new(self) -> None:
        self._obj: Any  # zlib's or zstandard's object: which one, self.kind says (feed, finish)
        if self.kind == "gzip":
            # ISA-L inflates gzip several times faster than zlib, with the same bounded-output API
            self._obj = isal_zlib.decompressobj(16 + zlib.MAX_WBITS)
        else:
            self._obj = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).decompressobj(
                read_across_frames=True)

    def feed(self, chunk) -> Iterator[bytes]:
        """The decompressed bytes of chunk, as pieces of at most OUT_PIECE bytes (zstd: at most
        ZSTD_SLICE * 32768): memory stays bounded whatever the compression ratio (bombs)."""
        try:
            if self.kind == "zstd":
                view = memoryview(chunk)
                for start in range(0, len(view), ZSTD_SLICE):
                    out = self._obj.decompress(view[start:start + ZSTD_SLICE])
                    if out:
                        yield out
                return
            data = chunk
            while True:
                out = self._obj.decompress(data, OUT_PIECE)
                if out:
                    yield out
                if self._obj.eof and self._obj.unused_data:
                    data = self._obj.unused_data
                    self._new()
                    continue
                data = self._obj.unconsumed_tail
                if not data and len(out) < OUT_PIECE:
                    return
        except (zlib.error, ISAL_ERROR, zstandard.ZstdError) as exc:
            raise BadInput(f"{self.what}: corrupt {self.kind} data ({exc})") from None

    def finish(self) -> None:
        if self.kind == "gzip" and not self._obj.eof:
            raise BadInput(f"{self.what}: truncated gzip data")
        if self.kind == "zstd":
            try:
                self._obj.flush()
            except zstandard.ZstdError as exc:
                raise BadInput(f"{self.what}: corrupt zstd data ({exc})") from None


class BlobHasher:
    """Hashes a member's stored bytes; when they start like gzip or zstd, also the decompressed bytes."""

    def __init__(self, what: str, *, want_diff_id: bool = True, want_sha256: bool = True,
                 want_xxh3: bool = True):
        self.what = what
        self.sha = hashlib.sha256() if want_sha256 else None
        self.xxh = xxhash.xxh3_128() if want_xxh3 else None
        self.want_diff_id = want_diff_id
        self.compression: str | None = None
        self._decomp: Decompressor | None = None
        self._diff = hashlib.sha256()  # of the decompressed bytes, fed only when there is a _decomp
        self._first = True
        self.uncompressed_size = 0

    def update(self, chunk) -> None:
        if self._first:
            self._first = False
            self.compression = sniff_compression(chunk)
            if self.compression and self.want_diff_id:
                self._decomp = Decompressor(self.compression, self.what)
        if self.sha is not None:
            self.sha.update(chunk)
        if self.xxh is not None:
            self.xxh.update(chunk)
        if self._decomp is not None:
            for out in self._decomp.feed(chunk):
                self.uncompressed_size += len(out)
                self._diff.update(out)

    def result(self) -> dict:
        out: dict = {"xxh3": self.xxh.hexdigest()} if self.xxh is not None else {}
        if self.sha is not None:
            out["sha256"] = "sha256:" + self.sha.hexdigest()
        if self._decomp is not None:
            self._decomp.finish()
            out["compression"] = self.compression
            out["diff_id"] = "sha256:" + self._diff.hexdigest()
            out["uncompressed_size"] = self.uncompressed_size
        return out
