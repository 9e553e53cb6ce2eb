"""Verbatim streaming tar reader (the writer of headers is isep/tarwrite.py).

The reader never seeks and keeps no list of members: it yields one Member at a time with the exact
header bytes (including PAX and GNU long-name records), lets the caller consume the data as
memoryview chunks of reused buffers, and keeps the padding bytes, so that header + data + padding of
every member, followed by the trailer, reproduces the input byte for byte.
"""
from __future__ import annotations

import io
import mmap
import os
import posixpath
import re
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

REGULAR_TYPES = (b"0", b"\0")
TYPE_NAMES = {b"0": "file", b"\0": "file", b"1": "hardlink", b"2": "symlink",
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


OCTAL_DIGITS = frozenset(b"01234567")
DECIMAL = re.compile(r"[0-9]+\Z")
SIGNED_DECIMAL = re.compile(r"[+-]?[0-9]+\Z")
PAX_TIME = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?\Z")
INT64_MAX = (1 << 63) - 1


def _octal(field_bytes: bytes, what: str, where: str) -> int:
    """A numeric header field, read only where every tar reader reads the same number.

    Go's archive/tar trims leading NULs before parsing while Python's tarfile and GNU tar stop at
    the first NUL, and int() accepts `_`: so a field is octal digits (optionally after spaces),
    then only NULs and spaces, or GNU base-256 with the plain 0x80 marker (positive, < 2**63).
    """
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] != 0x80 or value > INT64_MAX:
            raise BadInput(f"{where}: {what} field {field_bytes!r} is a base-256 value "
                           f"that tar readers read differently (negative or over 2**63)")
        return value
    text = field_bytes.rstrip(b" \0").lstrip(b" ")
    if not text:
        return 0
    if not OCTAL_DIGITS.issuperset(text):
        raise BadInput(f"{where}: bad {what} field {field_bytes!r} (tar readers read it differently)")
    return int(text, 8)


def _cstr(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].rstrip(b" \0").lstrip(b" ")
    if not stored or not OCTAL_DIGITS.issuperset(stored):
        return False
    want = int(stored, 8)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - sum(256 for b in block[:148] + block[156:] if b > 127)
    return want in (unsigned, signed)


PAX_STRING_KEYS = ("path", "linkpath", "uname", "gname")


def parse_pax(data: bytes, where: str) -> dict[str, str]:
    """PAX records, refused wherever Go's archive/tar (docker, containerd) would refuse them or
    could read them otherwise: NUL padding, a non-decimal length, a key twice, a NUL in a name."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > 0 else b""
        if not digits.isdigit() or not digits.isascii():
            raise BadInput(f"malformed PAX record length at byte {pos} of {where}")
        length = int(digits)
        record = data[space + 1:pos + length]
        if length < 5 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise BadInput(f"malformed PAX record at byte {pos} of {where}")
        raw_key, raw_value = record[:-1].split(b"=", 1)
        key = raw_key.decode("utf-8", "surrogateescape")
        value = raw_value.decode("utf-8", "surrogateescape")
        if not key or "\0" in key or (key in PAX_STRING_KEYS and "\0" in value):
            raise BadInput(f"PAX record {key!r} with an empty key or a NUL in {where}")
        if key in records:
            raise BadInput(f"PAX record {key!r} twice in {where}")
        records[key] = value
        pos += length
    _check_pax_values(records, where)
    return records


def _check_pax_values(records: dict[str, str], where: str) -> None:
    for key, value in records.items():
        if key.startswith("GNU.sparse."):
            raise BadInput(f"GNU sparse PAX record {key!r} in {where}: sparse files are not supported")
        if key in ("path", "linkpath", "size") and not value:
            raise BadInput(f"empty PAX {key!r} in {where} (readers keep the header's value or not)")
        pattern = {"size": DECIMAL, "uid": SIGNED_DECIMAL, "gid": SIGNED_DECIMAL, "mtime": PAX_TIME,
                   "atime": PAX_TIME, "ctime": PAX_TIME}.get(key)
        if pattern is not None and value and not (pattern.match(value) and value.isascii()
                                                  and abs(int(value.split(".")[0])) <= INT64_MAX):
            raise BadInput(f"bad PAX {key!r} value {value!r} in {where}")


EXTENDED_TYPES = (b"x", b"g", b"L", b"K")
MEMBER_TYPES = (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6")
HEADER_ONLY_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")


def _format_name(block: bytes, name: str, where: str) -> str:
    """The header's name with its ustar prefix; the numeric fields each format adds are checked
    as Go checks them (Go falls back to a prefix when a GNU header's times do not parse)."""
    if block[257:263] == b"ustar\0":
        if block[508:512] == b"tar\0":
            raise BadInput(f"{where}: a star-format header, whose name prefix is shorter")
        for lo, hi, what in ((329, 337, "devmajor"), (337, 345, "devminor")):
            _octal(block[lo:hi], what, where)
        prefix = _cstr(block[345:500])
        return prefix + "/" + name if prefix else name
    if block[257:265] == b"ustar  \0":
        for lo, hi, what in ((329, 337, "devmajor"), (337, 345, "devminor"), (345, 357, "atime"),
                             (357, 369, "ctime")):
            if what in ("devmajor", "devminor") or block[lo]:
                _octal(block[lo:hi], what, where)
    return name


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


def _check_numbers(block: bytes, where: str) -> None:
    for lo, hi, what in ((100, 108, "mode"), (108, 116, "uid"), (116, 124, "gid"), (136, 148, "mtime")):
        _octal(block[lo:hi], what, where)


METADATA_NAMES = ("manifest.json", "repositories", "index.json", "oci-layout")


class NameTable:
    """Member names as loaders see them. Docker extracts the archive (paths cleaned, a later member
    replacing an earlier one, a file replacing a whole directory) while isep reads names verbatim
    and containerd keys blobs by cleaned name: so a name must already be clean and relative, name
    one member only (directories may repeat), and not pass through a non-directory; a hard link
    must name an earlier member, a symbolic link must stay inside the archive's root."""

    def __init__(self, source_name: str):
        self.source_name = source_name
        self.kinds: dict[str, str] = {}

    def add(self, member: Member) -> None:
        where = f"{self.source_name}: member {member.name!r} at byte {member.offset}"
        kind = member.kind
        path = member.name[:-1] if kind == "dir" and member.name.endswith("/") else member.name
        if not _is_clean(path):
            raise BadInput(f"{where}: not a clean relative name (loaders read it as "
                           f"{posixpath.normpath('/' + path).lstrip('/')!r})")
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            have = self.kinds.setdefault(parent, "dir")
            if have != "dir":
                raise BadInput(f"{where}: inside {parent!r}, which is a {have}")
        earlier = self.kinds.get(path)
        if earlier is not None and (earlier != "dir" or kind != "dir"):
            raise BadInput(f"{where}: a second member of that name (a {earlier} before it); loaders keep "
                           f"the last copy")
        self.kinds[path] = kind
        if path in METADATA_NAMES and kind != "file":
            raise BadInput(f"{where}: a {kind}, not a file (containerd reads only regular files)")
        if kind == "hardlink" and self.kinds.get(member.linkname) not in ("file", "hardlink", "symlink"):
            raise BadInput(f"{where}: hard link to {member.linkname!r}, which is not an earlier member")
        if kind == "symlink" and not member.linkname.startswith("/"):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
            if target == ".." or target.startswith("../"):
                raise BadInput(f"{where}: symbolic link to {member.linkname!r}, outside the archive")


def _is_clean(path: str) -> bool:
    return (bool(path) and not path.startswith("/") and posixpath.normpath(path) == path
            and path not in (".", "..") and not path.startswith("../"))


class TarReader:
    """Iterates the members of a tar stream; after the loop, `trailer` holds the end-of-archive bytes."""

    def __init__(self, source: Source):
        self.source = source
        self.trailer = b""
        self.count = 0
        self.names = NameTable(source.name)
        self._current: Member | None = None

    def __iter__(self) -> Iterator[Member]:
        src = self.source
        while True:
            if self._current is not None:
                self._current.skip()
                self._current = None
            start = src.offset
            header = bytearray()
            extended: dict[bytes, object] = {}
            while True:
                block = src.read(BLOCK)
                if not block and not header and self.count == 0:
                    raise BadInput(f"{src.name}: empty input, not a tar archive")
                if len(block) != BLOCK:
                    raise Truncated(f"{src.name}: truncated in a tar header at byte {src.offset}")
                if block == ZERO_BLOCK and not header:
                    self._read_trailer(block)
                    return
                if not _checksum_ok(block):
                    if self.count == 0 and not header:
                        raise BadInput(f"{src.name}: not a tar archive (bad header checksum at byte 0)")
                    raise BadInput(f"{src.name}: bad tar header checksum at byte {src.offset - BLOCK}")
                header += block
                typeflag = block[156:157]
                if typeflag not in EXTENDED_TYPES:
                    break
                extended[typeflag] = self._extended(block, extended, start, header)
            member = self._member(block, bytes(header), extended, start)
            self.names.add(member)
            self.count += 1
            self._current = member
            yield member

    def _extended(self, block: bytes, extended: dict, start: int, header: bytearray):
        """The records of one PAX or GNU long-name header; Go keeps only the last of each kind and
        drops those before a global header, other readers merge them: one of each, global first."""
        src = self.source
        typeflag = block[156:157]
        where = f"{src.name}: member at byte {start}"
        if typeflag in extended or (typeflag == b"g" and extended):
            raise BadInput(f"{where}: a second extended header (type {typeflag.decode()!r}) for one "
                           f"member, which tar readers resolve differently")
        size = _octal(block[124:136], "size", where)
        _check_numbers(block, where)
        _format_name(block, "", where)  # Go parses an extended header's fields as any other's
        if size > MAX_EXTENDED_HEADER:
            raise BadInput(f"{where}: extended header of {size} bytes")
        body = src.read_exact(padded(size), "an extended header")
        header += body
        if typeflag in (b"L", b"K"):
            return body[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        records = parse_pax(body[:size], f"member at byte {start}")
        if typeflag == b"g" and any(k in records for k in ("path", "linkpath", "size")):
            raise BadInput(f"{where}: a global PAX header setting path, linkpath or size, which some "
                           f"readers apply to every member and Go ignores")
        return records

    def _member(self, block: bytes, header: bytes, extended: dict, start: int) -> Member:
        src = self.source
        name = _cstr(block[0:100])
        where = f"{src.name}: member {name!r} at byte {start}"
        name = _format_name(block, name, where)
        pax = extended.get(b"x", {})
        long_name, long_link = extended.get(b"L"), extended.get(b"K")
        if (long_name is not None and "path" in pax) or (long_link is not None and "linkpath" in pax):
            raise BadInput(f"{where}: both a GNU long name and a PAX path: Go takes the "
                           f"GNU one, other readers the PAX one")
        name = pax.get("path") or long_name or name
        where = f"{src.name}: member {name!r} at byte {start}"
        linkname = pax.get("linkpath") or long_link or _cstr(block[157:257])
        typeflag = block[156:157]
        size = _octal(block[124:136], "size", where)
        size = int(pax["size"]) if "size" in pax else size
        _check_numbers(block, where)
        if typeflag not in MEMBER_TYPES:
            raise BadInput(f"{where}: tar type {typeflag!r} (sparse, volume, contiguous "
                           f"or unknown), which loaders read differently or refuse")
        if typeflag in HEADER_ONLY_TYPES and size:
            raise BadInput(f"{where}: a {TYPE_NAMES[typeflag]} that declares {size} data bytes, "
                           f"which Go skips and other readers read")
        if typeflag == b"\0" and name.endswith("/"):
            raise BadInput(f"{where}: an old-style file whose name ends in '/', which Go reads as a directory")
        return Member(name=name, typeflag=typeflag, size=size, linkname=linkname,
                      mode=_octal(block[100:108], "mode", where), mtime=_octal(block[136:148], "mtime", where),
                      header=header, offset=start, pax=pax, _source=src)

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
