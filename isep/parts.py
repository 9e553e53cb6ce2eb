"""Part files: compressed tars of verbatim archive members, hashed while they are written, and read
back hashed and decompressed.

Writing: PartWriter; a part is compressed as a sequence of independent frames (zstd frames or gzip
members) of 4 MiB of input each, on a pool of threads shared by all parts (hashlib, zstandard, ISA-L,
zlib and file writes all release the GIL). The output is the same whatever the number of threads,
memory stays bounded by the frames in flight, and every decoder reads such a stream as one (zstd
frames and gzip members concatenate).

Reading: PartInput says where a part comes from and what its manifest promises; HashingFile reads
the stored bytes ahead on a thread, counting and hashing them; DecompressingReader turns them back
into the tar stream, refusing to expand beyond the declared size.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import tempfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, BinaryIO, Callable, Iterator, Protocol, cast

import xxhash
import zstandard
from isal import isal_zlib

from .digests import MAX_ZSTD_WINDOW, Decompressor, sniff_compression
from .errors import BadInput, EnvironmentFailure, IntegrityError, UsageError, os_error
from .files import open_for_reading
from .tarstream import CHUNK, Member
from .tarwrite import END_OF_ARCHIVE

Opener = Callable[[], BinaryIO]   # opens a part file for binary reading, once per read


class Sink(Protocol):
    """Where a PartWriter's compressed bytes go: a file in a store, or chunks of a bundle stream."""

    def write(self, data: bytes) -> object: ...

    def close(self) -> None: ...


class Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...

COMPRESSIONS = ("zstd", "gzip", "none")
DEFAULT_LEVELS = {"zstd": 3, "gzip": 2, "none": 0}
# gzip levels 1-3 deflate with ISA-L (its levels 1-3: zlib -1 to -6's ratio at 5-15x zlib's speed,
# bench/RESULTS.md "gzip levels"); 4-9 with zlib, for whoever wants its last percent of size.
ISAL_MAX_LEVEL = 3
# 4 MiB of input per frame. 1 MiB frames cost pack 0.15 CPU-s less per 256 MiB, but every frame starts
# with an empty window: the real release pairs' app parts grew 5 % (47.7 -> 50.2 MB), and bytes on
# the link come before CPU seconds here (bench/RESULTS.md, issue #12)
FRAME = 4 << 20

_local = threading.local()
_pool_lock = threading.Lock()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _keep_freed_memory() -> None:
    """Every frame's compressed output is a fresh buffer of up to a frame, freed on the writing thread; by
    default glibc returns such memory to the kernel at once and the next frame faults it in again
    (a page fault per 4 KiB: ~0.07 CPU-s per 256 MiB packed). Keep it in the process instead."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc: its allocator decides
        return
    mallopt(M_MMAP_THRESHOLD, 16 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


class _Pool:
    """Compression workers, a bound on frames in flight, and the one thread that hashes and writes
    finished frames in the order they were submitted (so that workers never wait for each other)."""

    def __init__(self, workers: int):
        _keep_freed_memory()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isep-compress")
        self.slots = threading.BoundedSemaphore(2 * workers + 2)
        # frames handed back once written: a fresh buffer costs its zeroing and a page fault per 4 KiB
        self.spare_frames: list[bytearray] = []
        self.spare_limit = 2 * workers + 2
        self.jobs: queue.Queue = queue.Queue()
        self.writer = threading.Thread(target=_write_loop, args=(self,), name="isep-write", daemon=True)
        self.writer.start()

    def new_frame(self) -> bytearray:
        while self.spare_frames:
            frame = self.spare_frames.pop()
            if len(frame) == FRAME:  # (FRAME is patched only by experiments)
                return frame
        return bytearray(FRAME)

    def recycle(self, frame: bytes | bytearray) -> None:
        """Keep a frame whose bytes were compressed and written (every sink copies or writes them)."""
        if isinstance(frame, bytearray) and len(frame) == FRAME and len(self.spare_frames) < self.spare_limit:
            self.spare_frames.append(frame)


_pool: _Pool | None = None


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def pool() -> _Pool:
    """The process's compression pool, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _Pool(_workers())
        return _pool


def _write_loop(workers: _Pool) -> None:
    while True:
        job = workers.jobs.get()
        if job is None:
            return
        part, future, frame, done = job
        try:
            part.store_frame(future)
            workers.recycle(frame)
        finally:
            workers.slots.release()
            done.set()


def drain() -> None:
    """Let frames in flight finish (before temporary files are removed after a failure)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.executor.shutdown(wait=True)
            _pool.jobs.put(None)
            _pool.writer.join()
            _pool = None


def check_level(compression: str, level: int | None) -> int:
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    level = DEFAULT_LEVELS[compression] if level is None else level
    if compression == "zstd" and not 1 <= level <= 19:
        raise UsageError("--level for zstd must be between 1 and 19")
    if compression == "gzip" and not 1 <= level <= 9:
        raise UsageError("--level for gzip must be between 1 and 9")
    return level


def compress_frame(compression: str, level: int, data: bytes | bytearray) -> bytes | bytearray:
    if compression == "zstd":
        key = ("zstd", level)
        comp = getattr(_local, "comp", {}).get(key)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
            _local.comp = {**getattr(_local, "comp", {}), key: comp}
        return comp.compress(data)
    if compression == "gzip":
        module = isal_zlib if level <= ISAL_MAX_LEVEL else zlib
        obj = module.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # one gzip member, mtime 0
        return obj.compress(data) + obj.flush()
    return data


class PartWriter:
    """Receives raw member bytes in order; writes the compressed part to `out` and hashes it."""

    def __init__(self, file_name: str, out: Sink | None, compression: str, level: int | None):
        self.file_name = file_name
        self.compression = compression
        self.level = check_level(compression, level)
        self.wanted = out is not None   # False: the part is reused or not asked for: only counted
        self._out = out
        self._sha = hashlib.sha256()
        self._xxh = xxhash.xxh3_128()
        self.size = 0
        self.raw_size = 0
        self.members: list[dict] = []
        self._buf, self._fill = bytearray(), 0  # the frame being filled, taken from the pool when wanted
        self._last_done: threading.Event | None = None
        self._error: BaseException | None = None
        self._final: dict | None = None

    def write(self, data) -> None:
        self.raw_size += len(data)
        if not self.wanted:
            return
        view = memoryview(data).cast("B")
        while len(view):  # each byte is copied once, into the frame that is handed to a worker
            if not self._buf:
                self._buf = pool().new_frame()
            take = min(FRAME - self._fill, len(view))
            self._buf[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == FRAME:
                self._submit(self._buf)
                self._buf, self._fill = bytearray(), 0

    def _submit(self, frame: bytes | bytearray) -> threading.Event:
        """Hand one frame to the pool; the event is set once it is written."""
        workers = pool()
        self._raise_failure()
        workers.slots.acquire()
        done = threading.Event()
        self._last_done = done
        try:
            future = workers.executor.submit(compress_frame, self.compression, self.level, frame)
        except BaseException:
            workers.slots.release()
            done.set()
            raise
        workers.jobs.put((self, future, frame, done))
        return done

    def store_frame(self, future: Future) -> None:
        """On the writing thread: hash and write one compressed frame, in submission order; a
        failure is kept and raised in the thread that writes the part (_raise_failure)."""
        try:
            blob = future.result()
            if self._error is None and self._out is not None:
                self._sha.update(blob)
                self._xxh.update(blob)
                self.size += len(blob)
                self._out.write(blob)
        except BaseException as exc:
            self._error = exc

    def adopt_as(self, file_name: str, *, wanted: bool) -> PartWriter:
        """This writer, finished, as the part file_name (the app section of a one-shot pack becomes
        the app part); wanted False: the part is not asked for, and is only counted."""
        self._final = {**self.finish(), "file": file_name}
        self.file_name = file_name
        self.wanted = wanted
        return self

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> dict:
        if self._final is not None:
            return self._final
        self.write(END_OF_ARCHIVE)
        if self.wanted:
            done = self._last_done
            if self._fill or done is None:
                done = self._submit(self._buf[:self._fill])
                self._buf, self._fill = bytearray(), 0
            done.wait()
            self._raise_failure()
        self._final = {"file": self.file_name, "compression": self.compression, "size": self.size,
                       "sha256": "sha256:" + self._sha.hexdigest(), "xxh3": self._xxh.hexdigest(),
                       "raw_size": self.raw_size}
        return self._final


# --- reading parts back -----------------------------------------------------------------------------

@dataclass
class PartInput:
    """One part to read: where from, and what its manifest entry promises (None for isula parts)."""

    label: str                      # how messages name it
    opener: Opener
    entry: dict | None = None
    expected_sha256: str | None = None
    expected_size: int | None = None
    order: int = 0
    # the archive's members from the part's own (a delta part: its layers decoded or read from a store)
    rebuild: Callable[[Iterator[Member]], Iterator[Member]] | None = None


def part_opener(path: str, *, named_by_user: bool = False) -> Opener:
    """Opens a part file without following a symlink in its last component; "-" is stdin. A part
    found in a bundle must be a regular file; one the user named (-a/-b/-l) may also be a pipe."""
    if path == "-":  # a part on stdin (isep-join STORE -a -)
        return lambda: os.fdopen(os.dup(0), "rb", buffering=0)
    return lambda: open_for_reading(path, f"part {path}", allow_pipe=named_by_user)


class HashingFile:
    """A part file read through: a thread reads ahead and counts and hashes the stored (compressed)
    bytes, so that hashing overlaps decompression and the work of the caller."""

    def __init__(self, raw: Readable, what: str, *, sha256: bool = True, depth: int = 4):
        self.raw = raw
        self.what = what
        # one digest, the one checked: sha256, or xxh3 for a fast verify
        self._hash = hashlib.sha256() if sha256 else xxhash.xxh3_128()
        self.algorithm = "sha256" if sha256 else "xxh3"
        self.size = 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._left = memoryview(b"")
        self._eof = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def digest(self) -> str:
        """The stored bytes' digest as manifests write it: "sha256:<hex>", or the bare xxh3 hex."""
        hexdigest = self._hash.hexdigest()
        return "sha256:" + hexdigest if self.algorithm == "sha256" else hexdigest

    def _run(self) -> None:
        try:
            while not self._stop:
                data = self.raw.read(CHUNK)
                if not data:
                    break
                self.size += len(data)
                self._hash.update(data)
                self._queue.put(data)
            self._queue.put(b"")
        except BaseException as exc:
            self._queue.put(exc)

    def read(self, n: int = -1) -> bytes:
        if not len(self._left):
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise EnvironmentFailure(f"cannot read {self.what}: {item}")
            if not item:
                self._eof = True
                return b""
            if n is None or n < 0 or n >= len(item):
                return item  # the common case: a whole chunk, handed on without a copy
            self._left = memoryview(item)
        if n is None or n < 0 or n >= len(self._left):
            out, self._left = self._left, memoryview(b"")
        else:
            out, self._left = self._left[:n], self._left[n:]
        return bytes(out)

    def drain(self) -> None:
        while self.read(CHUNK):
            pass
        self._thread.join()

    def close(self) -> None:
        self._stop = True
        while self._thread.is_alive():  # unblock a reader thread waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.01)


class DecompressingReader:
    """readinto() over a compressed file; refuses to expand beyond the declared size (bombs)."""

    def __init__(self, src: Readable, compression: str | None, limit: int | None, what: str):
        self.src = src
        self.what = what
        self.limit = limit
        self.produced = 0
        self.compression = compression
        self._reader: zstandard.ZstdDecompressionReader | None = None
        self._gzip: Decompressor | None = None
        self._pending = memoryview(b"")
        self._pieces: Iterator[bytes] = iter(())  # decompressed gzip output not yet handed out
        self._started = False

    def _start(self) -> None:
        self._started = True
        kind = self.compression
        if kind in (None, "auto"):
            head = self.src.read(CHUNK)
            self._pending = memoryview(head)
            kind = sniff_compression(head)
        if kind == "zstd":
            reader = _Prepend(bytes(self._pending), self.src) if len(self._pending) else self.src
            self._pending = memoryview(b"")
            # stream_reader calls only read(); its stubs ask for a whole IO[bytes]
            self._reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(
                cast(IO[bytes], reader), read_size=CHUNK, read_across_frames=True)
        elif kind == "gzip":
            self._gzip = Decompressor("gzip", self.what)
            if len(self._pending):
                self._pieces = self._gzip.feed(bytes(self._pending))
                self._pending = memoryview(b"")

    def readinto(self, buf: bytearray | memoryview) -> int:
        if not self._started:
            self._start()
        try:
            n = self._readinto(buf)
        except zstandard.ZstdError as exc:
            raise BadInput(f"{self.what}: corrupt zstd data ({exc})") from None
        self.produced += n
        if self.limit is not None and self.produced > self.limit:
            raise IntegrityError(f"{self.what} expands beyond the {self.limit} bytes its manifest declares")
        return n

    def _readinto(self, buf: bytearray | memoryview) -> int:
        if self._reader is not None:
            return self._reader.readinto(buf)
        if self.compression == "none" and not len(self._pending) and hasattr(self.src, "readinto"):
            return self.src.readinto(buf)  # a plain spool (--delta-from): no copy through bytes
        while not len(self._pending):
            piece = next(self._pieces, None)
            if piece is not None:
                self._pending = memoryview(piece)
                continue
            data = self.src.read(CHUNK)
            if not data:
                if self._gzip is not None:
                    self._gzip.finish()
                return 0
            if self._gzip is not None:
                self._pieces = self._gzip.feed(data)
            else:
                self._pending = memoryview(data)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class TemporaryPart:
    """A part written into an unnamed temporary file (removed when closed) and read back later: the
    app section of a one-shot pack on a stream, a part spooled to be delta-encoded."""

    def __init__(self, directory: str | None, prefix: str):
        self.where = directory or tempfile.gettempdir()  # named in errors: where the room ran out
        try:
            self.raw: BinaryIO = cast(BinaryIO, tempfile.TemporaryFile(dir=directory, prefix=prefix))
        except OSError as exc:
            raise os_error(exc, f"cannot create a temporary file in {self.where}") from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.raw.write(data)
        except OSError as exc:
            raise os_error(exc, f"cannot write a temporary file in {self.where}") from None

    def close(self) -> None:
        """The part writer is done with it; the file stays open until it has been read back."""

    def rewound(self) -> BinaryIO:
        try:
            self.raw.seek(0)  # writes out what is still buffered
        except OSError as exc:
            raise os_error(exc, f"cannot write a temporary file in {self.where}") from None
        return self.raw

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        return rewound_chunks(self.rewound(), size)


def rewound_chunks(fh: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """A spooled temporary file's bytes from its start, size bytes at a time."""
    try:
        fh.seek(0)  # writes out what is still buffered: a full disk may show only now
    except OSError as exc:
        raise os_error(exc, "cannot write a temporary file") from None
    while True:
        data = fh.read(size)
        if not data:
            return
        yield data


class _Prepend:
    """The bytes read to sniff the compression, handed out again before the rest of the file."""

    def __init__(self, head: bytes, src: Readable):
        self.head = head
        self.src = src

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.src.read(n)
