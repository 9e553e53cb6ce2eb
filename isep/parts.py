"""Part files: compressed tars of verbatim archive members, hashed while they are written.

A part is compressed as a sequence of independent frames (zstd frames or gzip members) of 4 MiB of
input each, on a pool of threads shared by all parts (hashlib, zstandard, ISA-L, zlib and file writes
all release the GIL). The output is the same whatever the number of threads, memory stays bounded by the
frames in flight, and every decoder reads such a stream as one (zstd frames and gzip members
concatenate).
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import xxhash
import zstandard
from isal import isal_zlib

from .errors import UsageError
from .tarstream import END_OF_ARCHIVE

COMPRESSIONS = ("zstd", "gzip", "none")
DEFAULT_LEVELS = {"zstd": 3, "gzip": 2, "none": 0}
# gzip levels 1-3 deflate with ISA-L (its levels 1-3: zlib -1 to -6's ratio at 5-15x zlib's speed,
# bench/RESULTS.md "gzip levels"); 4-9 with zlib, for whoever wants its last percent of size.
ISAL_MAX_LEVEL = 3
FRAME = 4 << 20

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None
_write_queue: queue.Queue | None = None
_writer_thread: threading.Thread | None = None


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def pool() -> tuple[ThreadPoolExecutor, threading.BoundedSemaphore, queue.Queue]:
    """Compression workers, a bound on frames in flight, and the one thread that hashes and writes
    finished frames in the order they were submitted (so that workers never wait for each other)."""
    global _pool, _slots, _write_queue, _writer_thread
    with _pool_lock:
        if _pool is None:
            n = _workers()
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="isep-compress")
            _slots = threading.BoundedSemaphore(2 * n + 2)
            _write_queue = queue.Queue()
            _writer_thread = threading.Thread(target=_write_loop, args=(_write_queue, _slots),
                                              name="isep-write", daemon=True)
            _writer_thread.start()
    return _pool, _slots, _write_queue


def _write_loop(jobs: queue.Queue, slots: threading.BoundedSemaphore) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        part, future, done = job
        try:
            blob = future.result()
            if part._error is None:
                part._sha.update(blob)
                part._xxh.update(blob)
                part.size += len(blob)
                part._out.write(blob)
        except BaseException as exc:  # surfaced in the writing thread by _raise_failure
            part._error = exc
        finally:
            slots.release()
            done.set()


def drain() -> None:
    """Let frames in flight finish (before temporary files are removed after a failure)."""
    global _pool, _writer_thread
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _write_queue.put(None)
            _writer_thread.join()
            _pool = _writer_thread = None


def check_level(compression: str, level: int | None) -> int:
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    level = DEFAULT_LEVELS[compression] if level is None else level
    if compression == "zstd" and not 1 <= level <= 19:
        raise UsageError("--level for zstd must be between 1 and 19")
    if compression == "gzip" and not 1 <= level <= 9:
        raise UsageError("--level for gzip must be between 1 and 9")
    return level


def compress_frame(compression: str, level: int, data: bytes) -> bytes:
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

    def __init__(self, file_name: str, out, compression: str, level: int | None):
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
        self._buf, self._fill = bytearray(FRAME), 0
        self._last_done: threading.Event | None = None
        self._error: BaseException | None = None
        self._final: dict | None = None

    def write(self, data) -> None:
        self.raw_size += len(data)
        if not self.wanted:
            return
        view = memoryview(data).cast("B")
        while len(view):  # each byte is copied once, into the frame that is handed to a worker
            take = min(FRAME - self._fill, len(view))
            self._buf[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == FRAME:
                self._submit(self._buf)
                self._buf, self._fill = bytearray(FRAME), 0

    def _submit(self, frame: bytes) -> None:
        executor, slots, jobs = pool()
        self._raise_failure()
        slots.acquire()
        done = threading.Event()
        self._last_done = done
        try:
            future = executor.submit(compress_frame, self.compression, self.level, frame)
        except BaseException:
            slots.release()
            done.set()
            raise
        jobs.put((self, future, done))

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> dict:
        if self._final is not None:
            return self._final
        self.write(END_OF_ARCHIVE)
        if self.wanted:
            if self._fill or self._last_done is None:
                self._submit(bytes(self._buf[:self._fill]))
                self._buf, self._fill = bytearray(), 0
            self._last_done.wait()
            self._raise_failure()
        self._final = {"file": self.file_name, "compression": self.compression, "size": self.size,
                       "sha256": "sha256:" + self._sha.hexdigest(), "xxh3": self._xxh.hexdigest(),
                       "raw_size": self.raw_size}
        return self._final
