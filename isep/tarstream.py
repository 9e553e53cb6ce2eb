"""Verbatim streaming tar reader and a minimal tar header writer.

The reader never seeks and keeps no list of members: it yields one Member at a time with the exact
header bytes (including PAX and GNU long-name records), lets the caller consume the data as
memoryview chunks of reused buffers, and keeps the padding bytes, so that header + data + padding of
every member, followed by the trailer, reproduces the input byte for byte.
"""
from __future__ import annotations

import io
import mmap
import os
import queue
import stat
import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from .errors import BadInput, EnvironmentFailure, IsepError, Truncated

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20
MAX_EXTENDED_HEADER = 1 << 20  # PAX / GNU long-name records larger than this are refused
F_SETPIPE_SZ = 1031

REGULAR_TYPES = (b"0", b"\0", b"7")
TYPE_NAMES = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hardlink", b"2": "symlink",
              b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}


def padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def enlarge_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer raises pipe throughput by a quarter (limits.md); best effort."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            import fcntl
            fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass


class RawInput(Protocol):
    """What a Source reads from: a file, a pipe, a decompressing reader. On a regular file (an
    io object with a descriptor) skip() seeks instead of reading."""

    def readinto(self, buf: memoryview, /) -> int | None: ...


class Source:
    """A byte stream read front to back through page-aligned buffers.

    A background thread fills the next buffers while the caller hashes or compresses the current
    one (file reads and hashlib/zstd all release the GIL). A chunk handed out stays valid until the
    caller asks this Source for more bytes.
    """

    def __init__(self, raw: RawInput, *, slots: int = 4, prefetch: bool = True, name: str = "input"):
        self.name = name
        self.offset = 0
        self._raw = raw
        self._cur = memoryview(b"")
        self._cur_slot: mmap.mmap | None = None
        self._pos = 0
        self._eof = False
        self._size: int | None = None  # of a regular file, -1 for anything else: known on first skip
        try:
            if isinstance(raw, io.IOBase):
                enlarge_pipe(raw.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        self._prefetch = prefetch
        if prefetch:
            self._free: queue.Queue = queue.Queue()
            self._filled: queue.Queue = queue.Queue()
            for _ in range(slots):
                self._free.put(mmap.mmap(-1, CHUNK))
            self._thread = threading.Thread(target=self._fill_loop, daemon=True)
            self._thread.start()
        else:
            self._slot = mmap.mmap(-1, CHUNK)

    def _read_into(self, slot: mmap.mmap) -> int:
        view = memoryview(slot)
        got = 0
        while got < CHUNK:
            n = self._raw.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def _fill_loop(self) -> None:
        while True:
            slot = self._free.get()
            if slot is None:
                return
            try:
                n = self._read_into(slot)
            except BaseException as exc:  # handed to the reading thread, which raises it
                self._filled.put((None, exc))
                return
            self._filled.put((slot, n))
            if n == 0:
                return

    def _refill(self) -> bool:
        if self._eof:
            return False
        if self._prefetch:
            if self._cur_slot is not None:
                self._free.put(self._cur_slot)
                self._cur_slot = None
            slot, n = self._filled.get()
            if slot is None:
                self._eof = True
                if isinstance(n, IsepError):
                    raise n
                raise EnvironmentFailure(f"cannot read {self.name}: {n}")
            self._cur_slot = slot
        else:
            slot = self._slot
            try:
                n = self._read_into(slot)
            except OSError as exc:
                raise EnvironmentFailure(f"cannot read {self.name}: {exc}") from exc
        if n == 0:
            self._eof = True
            self._cur = memoryview(b"")
            self._pos = 0
            return False
        self._cur = memoryview(slot)[:n]
        self._pos = 0
        return True

    def close(self) -> None:
        if self._prefetch:
            self._free.put(None)

    def read(self, n: int) -> bytes:
        """Up to n bytes as a new bytes object (short only at end of stream)."""
        parts = []
        want = n
        while want:
            if self._pos >= len(self._cur) and not self._refill():
                break
            take = min(want, len(self._cur) - self._pos)
            parts.append(bytes(self._cur[self._pos:self._pos + take]))
            self._pos += take
            want -= take
        self.offset += n - want
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise Truncated(f"{self.name}: truncated in {what} at byte {self.offset}")
        return data

    def chunks(self, n: int, what: str) -> Iterator[memoryview]:
        """Exactly n bytes as memoryviews of reused buffers."""
        while n:
            if self._pos >= len(self._cur) and not self._refill():
                raise Truncated(f"{self.name}: truncated in {what} at byte {self.offset}")
            take = min(n, len(self._cur) - self._pos)
            view = self._cur[self._pos:self._pos + take]
            self._pos += take
            self.offset += take
            n -= take
            yield view

    def skip(self, n: int, what: str) -> None:
        """Pass over n bytes; on a seekable file without prefetch, by seeking."""
        buffered = len(self._cur) - self._pos
        size = -1 if self._prefetch or n <= buffered else self._file_size()
        if size < 0 or not isinstance(self._raw, io.IOBase):
            for _ in self.chunks(n, what):
                pass
            return
        self._pos = len(self._cur)
        self.offset += buffered
        rest = n - buffered
        end = self._raw.seek(0, os.SEEK_CUR) + rest
        if end > size:
            raise Truncated(f"{self.name}: truncated in {what} at byte {self.offset + size - end + rest}")
        self._raw.seek(rest, os.SEEK_CUR)
        self.offset += rest

    def _file_size(self) -> int:
        """The size of a regular file read without prefetch, which skip() seeks in; -1 otherwise."""
        if self._size is None:
            try:
                if not isinstance(self._raw, io.IOBase):
                    raise AttributeError("fileno")
                st = os.fstat(self._raw.fileno())
                self._size = st.st_size if stat.S_ISREG(st.st_mode) else -1
            except (AttributeError, OSError, ValueError):
                self._size = -1
        return self._size


def _octal(field_bytes: bytes, what: str, name: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field_bytes, "big", signed=False) & ~(0x80 << (8 * (len(field_bytes) - 1)))
        if field_bytes[0] == 0xFF:
            raise BadInput(f"negative {what} in tar header of {name!r}")
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise BadInput(f"bad {what} field {field_bytes!r} in tar header of {name!r}") from None


def _cstr(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156]
    try:
        want = int(stored.split(b"\0", 1)[0].strip(b" ") or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - sum(256 for b in block[:148] + block[156:] if b > 127)
    return want in (unsigned, signed)


def parse_pax(data: bytes, where: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record block with NULs
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise BadInput(f"malformed PAX record in {where}")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise BadInput(f"malformed PAX record length in {where}") from None
        record = data[space + 1:pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise BadInput(f"malformed PAX record in {where}")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


@dataclass
class Member:
    """One archive member: its exact header bytes, parsed fields and (lazily) its data."""

    name: str
    typeflag: bytes
    size: int
    linkname: str
    mode: int
    mtime: int
    header: bytes
    offset: int
    pax: dict = field(default_factory=dict)
    padding: bytes = b""
    _source: Source | None = field(default=None, repr=False)
    _consumed: bool = field(default=False, repr=False)

    @property
    def kind(self) -> str:
        return TYPE_NAMES.get(self.typeflag, "other")

    @property
    def is_file(self) -> bool:
        return self.typeflag in REGULAR_TYPES

    @property
    def raw_size(self) -> int:
        return len(self.header) + padded(self.size)

    def iter_data(self) -> Iterator[memoryview]:
        """The data bytes; the padding that follows is kept in self.padding."""
        if self._consumed:
            raise RuntimeError(f"data of {self.name!r} already consumed")
        self._consumed = True
        src = self._src
        yield from src.chunks(self.size, f"data of {self.name!r}")
        self.padding = src.read_exact(padded(self.size) - self.size, f"padding of {self.name!r}")

    def read_all(self, limit: int) -> bytes:
        if self.size > limit:
            raise BadInput(f"member {self.name!r} is {self.size} bytes, over the {limit}-byte limit")
        return b"".join(bytes(c) for c in self.iter_data())

    def skip(self) -> None:
        if not self._consumed:
            self._consumed = True
            self._src.skip(self.size, f"data of {self.name!r}")
            self.padding = self._src.read_exact(padded(self.size) - self.size, f"padding of {self.name!r}")

    def head_then_skip(self, n: int) -> bytes:
        """The first n bytes of the data; the rest is passed over (by seeking, on a file)."""
        if self._consumed:
            raise RuntimeError(f"data of {self.name!r} already consumed")
        self._consumed = True
        head = self._src.read_exact(min(self.size, n), f"data of {self.name!r}")
        self._src.skip(self.size - len(head), f"data of {self.name!r}")
        self.padding = self._src.read_exact(padded(self.size) - self.size, f"padding of {self.name!r}")
        return head

    @property
    def _src(self) -> Source:
        if self._source is None:
            raise RuntimeError(f"member {self.name!r} was not read from a Source")
        return self._source

    def raw_chunks(self) -> Iterator[bytes | memoryview]:
        """Header, data and padding exactly as read."""
        yield self.header
        yield from self.iter_data()
        if self.padding:
            yield self.padding


class TarReader:
    """Iterates the members of a tar stream; after the loop, `trailer` holds the end-of-archive bytes."""

    def __init__(self, source: Source):
        self.source = source
        self.trailer = b""
        self.count = 0
        self._current: Member | None = None

    def __iter__(self) -> Iterator[Member]:
        src = self.source
        while True:
            if self._current is not None:
                self._current.skip()
                self._current = None
            start = src.offset
            header = bytearray()
            pax: dict[str, str] = {}
            long_name = long_link = None
            while True:
                block = src.read(BLOCK)
                if not block and not header and self.count == 0:
                    raise BadInput(f"{src.name}: empty input, not a tar archive")
                if len(block) != BLOCK:
                    raise Truncated(f"{src.name}: truncated in a tar header at byte {src.offset}")
                if block == ZERO_BLOCK and not header:
                    self._read_trailer(block)
                    return
                name_hint = _cstr(block[0:100])
                if not _checksum_ok(block):
                    if self.count == 0 and not header:
                        raise BadInput(f"{src.name}: not a tar archive (bad header checksum at byte 0)")
                    raise BadInput(f"{src.name}: bad tar header checksum at byte {src.offset - BLOCK}")
                header += block
                typeflag = block[156:157]
                size = _octal(block[124:136], "size", name_hint)
                if typeflag in (b"x", b"g", b"L", b"K"):
                    if size > MAX_EXTENDED_HEADER:
                        raise BadInput(f"{src.name}: extended header of {size} bytes at byte {start}")
                    body = src.read_exact(padded(size), "an extended header")
                    header += body
                    if typeflag == b"x":
                        pax.update(parse_pax(body[:size], f"member at byte {start}"))
                    elif typeflag == b"L":
                        long_name = body[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    elif typeflag == b"K":
                        long_link = body[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    continue
                break
            name = _cstr(block[0:100])
            if block[257:263] == b"ustar\x00" and block[345]:
                name = _cstr(block[345:500]) + "/" + name
            name = pax.get("path", long_name or name)
            linkname = pax.get("linkpath", long_link or _cstr(block[157:257]))
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise BadInput(f"{src.name}: bad PAX size for {name!r}") from None
            if typeflag in (b"1", b"2", b"3", b"4", b"5", b"6"):
                size = 0 if typeflag != b"5" else size
            if size < 0:
                raise BadInput(f"{src.name}: negative size for {name!r}")
            member = Member(name=name, typeflag=typeflag, size=size, linkname=linkname,
                            mode=_octal(block[100:108], "mode", name),
                            mtime=_octal(block[136:148], "mtime", name),
                            header=bytes(header), offset=start, pax=pax, _source=src)
            self.count += 1
            self._current = member
            yield member

    def _read_trailer(self, first: bytes) -> None:
        src = self.source
        second = src.read(BLOCK)
        if second != ZERO_BLOCK:
            raise Truncated(f"{src.name}: truncated end-of-archive marker at byte {src.offset}")
        tail = bytearray(first + second)
        while True:
            more = src.read(CHUNK)
            if not more:
                break
            if more.count(0) != len(more):
                raise BadInput(f"{src.name}: data after the end-of-archive marker at byte "
                               f"{src.offset - len(more)}")
            tail += more
            if len(tail) > 64 * CHUNK:
                raise BadInput(f"{src.name}: over 64 MiB of zeros after the end-of-archive marker")
        if len(tail) % BLOCK:  # tar writers pad to whole blocks; anything else is damage
            raise BadInput(f"{src.name}: {len(tail) % BLOCK} stray bytes after the end-of-archive marker")
        self.trailer = bytes(tail)


# --- writing -------------------------------------------------------------------------------------

def _octal_field(value: int, width: int) -> bytes:
    text = b"%0*o" % (width - 1, value)
    if len(text) > width - 1:
        raise ValueError("value does not fit")
    return text + b"\0"


def build_header(name: str, size: int, *, mode: int = 0o644, mtime: int = 0, typeflag: bytes = b"0",
                 linkname: str = "", uname: str = "", gname: str = "") -> bytes:
    """A ustar header, preceded by a PAX record when the name or size needs one (as Go writes)."""
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_link = linkname.encode("utf-8", "surrogateescape")
    pax: dict[str, bytes] = {}
    if len(raw_name) > 100 or not name.isascii():
        pax["path"] = raw_name
    if len(raw_link) > 100 or not linkname.isascii():
        pax["linkpath"] = raw_link
    if size >= 8 ** 11:
        pax["size"] = str(size).encode()
    out = b""
    if pax:
        body = b"".join(_pax_record(k, v) for k, v in pax.items())
        pax_name = ("PaxHeaders.0/" + os.path.basename(name))[:99]
        out = _ustar(pax_name.encode("utf-8", "surrogateescape"), len(body), 0o644, mtime, b"x", b"", b"", b"")
        out += body + bytes(padded(len(body)) - len(body))
    out += _ustar(raw_name[:100], 0 if "size" in pax else size, mode, mtime, typeflag, raw_link[:100],
                  uname.encode(), gname.encode())
    return out


def _pax_record(key: str, value: bytes) -> bytes:
    payload = b" " + key.encode() + b"=" + value + b"\n"
    length = len(payload) + 1
    while len(str(length)) + len(payload) != length:
        length = len(str(length)) + len(payload)
    return str(length).encode() + payload


def _ustar(name: bytes, size: int, mode: int, mtime: int, typeflag: bytes, linkname: bytes,
           uname: bytes, gname: bytes) -> bytes:
    block = bytearray(BLOCK)
    block[0:len(name)] = name
    block[100:108] = _octal_field(mode & 0o7777, 8)
    block[108:116] = _octal_field(0, 8)
    block[116:124] = _octal_field(0, 8)
    block[124:136] = _octal_field(size, 12)
    block[136:148] = _octal_field(max(mtime, 0), 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[265:265 + len(uname[:31])] = uname[:31]
    block[297:297 + len(gname[:31])] = gname[:31]
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


END_OF_ARCHIVE = bytes(2 * BLOCK)
