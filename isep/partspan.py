"""One member of a plain zstd part, read by its frames: the frames before it are skipped unread
(each frame's header says how much of the tar stream it holds) and the frames holding it are
decompressed on the compression pool's threads. A store part's last layer costs its own frames,
not a decompression of every layer before it."""
from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import Future
from typing import BinaryIO, Generator, Iterator

import zstandard

from .digests import MAX_ZSTD_WINDOW
from .errors import IntegrityError
from .parts import FRAME, pool
from .tarstream import CHUNK, padded

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

AHEAD = 2   # decompressed frames a streamed member keeps ready (4 MiB each)


class NotFramed(Exception):
    """The part is not framed as PartWriter frames it (no content sizes): read it as a stream."""


def member_span(entry: dict, name: str) -> tuple[int, int] | None:
    """Where a member's data lies in a plain part's tar stream (offset, size), from its manifest's
    raw sizes (members are stored in the order listed); None when they do not say."""
    offset = 0
    for rec in entry.get("members") or []:
        raw, size = rec.get("raw_size"), rec.get("size")
        if type(raw) is not int or type(size) is not int or raw < padded(size) or "from" in rec:
            return None
        if rec.get("name") == name and rec.get("type") == "file":
            return offset + raw - padded(size), size
        offset += raw
    return None


def load_span(raw: BinaryIO, start: int, out: memoryview, what: str) -> None:
    """The bytes [start, start + len(out)) of a zstd part's tar stream decompressed into out, its
    frames on the compression pool's threads. Raises NotFramed for a part whose frames do not
    declare their sizes, IntegrityError for damage."""
    end = start + len(out)
    workers = pool()
    pending: list[Future] = []
    try:
        reached = 0
        for frame, pos, content in _frames(raw, what, end):
            reached = pos + content
            if reached > start:
                pending.append(_submit(workers, _frame_into, frame, pos, content, start, out, what))
        if reached < end:
            raise IntegrityError(f"{what}: ends at {reached} bytes of its tar stream, {end} needed")
    finally:
        for future in pending:
            future.exception()  # every frame done before out is read or dropped
    for future in pending:
        future.result()


def span_pieces(raw: BinaryIO, start: int, size: int, what: str) -> Generator[memoryview, None, None]:
    """The bytes [start, start + size) of a zstd part's tar stream, in order, a frame's worth at a
    time, decompressed a few frames ahead. NotFramed only before the first piece; IntegrityError
    for damage."""
    end = start + size
    workers = pool()
    pending: deque[Future] = deque()
    given = False
    try:
        reached = 0
        for frame, pos, content in _frames(raw, what, end):
            reached = pos + content
            if reached <= start:
                continue
            pending.append(_submit(workers, _frame_piece, frame, pos, content, start, end, what))
            while pending and (len(pending) > AHEAD or pending[0].done()):
                given = True
                yield pending.popleft().result()
        if reached < end:
            raise IntegrityError(f"{what}: ends at {reached} bytes of its tar stream, {end} needed")
        while pending:
            yield pending.popleft().result()
    except NotFramed:
        if given:
            raise IntegrityError(f"{what}: a frame without its content size amid sized ones") from None
        raise
    finally:
        for future in pending:
            future.exception()


def _frames(raw: BinaryIO, what: str, end: int) -> Iterator[tuple[memoryview, int, int]]:
    """Each frame up to tar-stream offset `end`, with the offset and size of what it holds."""
    buf, at, pos, eof = b"", 0, 0, False
    while pos < end:
        size = _frame_size(buf, at)
        if size is None:
            if eof:
                return
            more = raw.read(4 * CHUNK)
            eof = not more
            buf, at = buf[at:] + more, 0
            continue
        frame = memoryview(buf)[at:at + size]
        at += size
        content = zstandard.frame_content_size(frame)
        if content < 0 or content > FRAME << 4:
            raise NotFramed(what)
        yield frame, pos, content
        pos += content


def _submit(workers, fn, *args) -> Future:
    workers.slots.acquire()  # frames in flight stay bounded
    try:
        future = workers.executor.submit(fn, *args)
    except BaseException:
        workers.slots.release()
        raise
    future.add_done_callback(lambda _: workers.slots.release())
    return future


def _frame_size(buf: bytes, at: int) -> int | None:
    if len(buf) - at < 18:
        return None
    try:
        return zstd.get_frame_size(memoryview(buf)[at:])
    except zstd.ZstdError:
        if len(buf) > (FRAME << 4):
            raise NotFramed("a frame larger than any PartWriter writes") from None
        return None  # the frame is not whole yet


def _frame_piece(frame: memoryview, pos: int, content: int, start: int, end: int, what: str) -> memoryview:
    whole = bytearray(content)
    _frame_into(frame, pos, content, pos, memoryview(whole), what)
    return memoryview(whole)[max(start, pos) - pos:min(end, pos + content) - pos]


def _frame_into(frame: bytes | memoryview, pos: int, content: int, start: int, out: memoryview, what: str) -> None:
    lo, hi = max(pos, start), min(pos + content, start + len(out))
    whole = lo == pos and hi == pos + content  # decompressed in place, else through a copy
    target = out[lo - start:hi - start] if whole else memoryview(bytearray(content))
    got = 0
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(frame)
        while got < content:
            n = reader.readinto(target[got:])
            if not n:
                break
            got += n
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: corrupt zstd data ({exc})") from None
    if got != content or extra:
        raise IntegrityError(f"{what}: a frame gives other than the {content} bytes its header says")
    if not whole:
        out[lo - start:hi - start] = target[lo - pos:hi - pos]
