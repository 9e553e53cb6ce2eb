"""A minimal tar header writer: the headers isep makes itself (renamed layers, synthesised metadata,
the bundle stream's chunks), in the ustar form every loader reads, with PAX records where a name or
size does not fit."""
from __future__ import annotations

import os

from .tarstream import BLOCK, padded


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
