"""Part files: compressed tars of verbatim archive members, hashed while they are written."""
from __future__ import annotations

import hashlib
import zlib

import xxhash
import zstandard

from .errors import UsageError
from .tarstream import END_OF_ARCHIVE

COMPRESSIONS = ("zstd", "gzip", "none")
DEFAULT_LEVELS = {"zstd": 3, "gzip": 6, "none": 0}


class _Identity:
    def compress(self, data):
        return data

    def flush(self):
        return b""


def make_compressor(compression: str, level: int | None):
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    level = DEFAULT_LEVELS[compression] if level is None else level
    if compression == "zstd":
        if not 1 <= level <= 19:
            raise UsageError("--level for zstd must be between 1 and 19")
        return zstandard.ZstdCompressor(level=level, threads=-1, write_content_size=False).compressobj()
    if compression == "gzip":
        if not 1 <= level <= 9:
            raise UsageError("--level for gzip must be between 1 and 9")
        return zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip header with mtime 0
    return _Identity()


class PartWriter:
    """Receives raw member bytes, compresses them to `out` and hashes what is written."""

    def __init__(self, file_name: str, out, compression: str, level: int | None):
        self.file_name = file_name
        self.compression = compression
        self._out = out            # None: count and hash nothing, write nothing (a part not wanted)
        self._comp = make_compressor(compression, level) if out is not None else None
        self._sha = hashlib.sha256()
        self._xxh = xxhash.xxh3_128()
        self.size = 0
        self.raw_size = 0
        self.members: list[dict] = []
        self.wanted = out is not None
        self._final: dict | None = None

    def write(self, data) -> None:
        self.raw_size += len(data)
        if self._comp is not None:
            self._emit(self._comp.compress(data))

    def _emit(self, blob: bytes) -> None:
        if blob:
            self._sha.update(blob)
            self._xxh.update(blob)
            self.size += len(blob)
            self._out.write(blob)

    def finish(self) -> dict:
        if self._final is not None:
            return self._final
        self.write(END_OF_ARCHIVE)
        if self._comp is not None:
            self._emit(self._comp.flush())
        self._final = {"file": self.file_name, "compression": self.compression, "size": self.size,
                "sha256": "sha256:" + self._sha.hexdigest(), "xxh3": self._xxh.hexdigest(),
                "raw_size": self.raw_size}
        return self._final
