"""A delta frame decoded by the system's libzstd (ctypes) where the Python bindings cost a copy.

The bindings (backports.zstd, compression.zstd, python-zstandard) copy every prefix they are
given and decode into a window buffer of their own, then copy out of it: for a 185 MB layer two
fresh 185 MB allocations and two copies. Here the reference slice is the prefix in place
(ZSTD_DCtx_refPrefix) and the frame is decoded straight into one buffer of the segment's size
(ZSTD_d_stableOutBuffer), handed out in views as it fills: bench/RESULTS.md, "the delta join
without the bindings' copies", for what it gains.

libzstd.so.1 is on every Debian system (dpkg depends on it). Where it cannot be loaded, or is
older than 1.5.0 (the stable output buffer came in 1.4.4 as an experimental parameter; 1.5 is the
series measured here, Debian 12's 1.5.4), or ISEP_ZSTD_CTYPES=0, `available()` is False and
delta.py decodes through the binding as before (Debian 11's 1.4.8 does).
"""
from __future__ import annotations

import ctypes
import mmap
import os
from typing import Iterator

from .errors import IntegrityError

LIBRARY = "libzstd.so.1"
MIN_VERSION = 10500           # see the module's note
WINDOW_LOG_MAX = 100          # ZSTD_d_windowLogMax
STABLE_OUT_BUFFER = 1001      # ZSTD_d_experimentalParam2
FIRST_STEP = 8 << 10          # input bytes per call at first; adapted so each call yields ~1-8 MiB
PIECE = 4 << 20               # the largest view handed out


class _Buffer(ctypes.Structure):  # ZSTD_inBuffer and ZSTD_outBuffer have the same layout
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_lib: ctypes.CDLL | None = None
_loaded = False


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBRARY)
        lib.ZSTD_versionNumber.restype = ctypes.c_uint
        if lib.ZSTD_versionNumber() < MIN_VERSION:
            return None
    except (OSError, AttributeError):
        return None
    size_t, ptr = ctypes.c_size_t, ctypes.c_void_p
    for name, restype, argtypes in (
            ("ZSTD_createDCtx", ptr, []),
            ("ZSTD_freeDCtx", size_t, [ptr]),
            ("ZSTD_DCtx_setParameter", size_t, [ptr, ctypes.c_int, ctypes.c_int]),
            ("ZSTD_DCtx_refPrefix", size_t, [ptr, ptr, size_t]),
            ("ZSTD_decompressStream", size_t, [ptr, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer)]),
            ("ZSTD_isError", ctypes.c_uint, [size_t]),
            ("ZSTD_getErrorName", ctypes.c_char_p, [size_t])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    global _lib, _loaded
    if os.environ.get("ISEP_ZSTD_CTYPES", "1") == "0":
        return False
    if not _loaded:
        _lib, _loaded = _load(), True
    return _lib is not None


def _address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0


class FrameDecoder:
    """One zstd frame of exactly `size` bytes decoded against `prefix` (a writable buffer the
    caller keeps unchanged and alive until the frame has ended), or against nothing.

    feed() returns views of the output as it fills; the buffer behind them is written once, front
    to back, so a view never changes. The views keep the buffer alive: memory is the prefix plus
    `size`. A frame that is corrupt, larger than `size`, or needs a window above window_log_max
    raises IntegrityError."""

    def __init__(self, prefix, size: int, window_log_max: int, what: str):
        assert available() and _lib is not None
        lib = self._lib = _lib
        self.what = what
        self.ended = False
        self.unused = b""    # input after the frame's end
        self._out = mmap.mmap(-1, max(1, size))
        self._view = memoryview(self._out)[:size]
        self._out_buf = _Buffer(_address(self._out), size, 0)
        self._in = bytearray(FIRST_STEP)
        self._step = FIRST_STEP
        self._prefix = prefix  # referenced, not copied: held here as long as the context uses it
        self._dctx = lib.ZSTD_createDCtx()
        if not self._dctx:
            raise MemoryError("libzstd: cannot create a decompression context")
        try:
            self._check(lib.ZSTD_DCtx_setParameter(self._dctx, WINDOW_LOG_MAX, window_log_max))
            self._check(lib.ZSTD_DCtx_setParameter(self._dctx, STABLE_OUT_BUFFER, 1))
            if prefix is not None:
                self._check(lib.ZSTD_DCtx_refPrefix(self._dctx, _address(prefix), len(prefix)))
        except BaseException:
            self.close()
            raise

    @property
    def produced(self) -> int:
        return self._out_buf.pos

    def feed(self, data) -> Iterator[memoryview]:
        """Decodes `data` (or what of it precedes the frame's end), a few KiB per call so that the
        output comes in pieces a reader can take while the rest decodes."""
        if len(self._in) < len(data):
            self._in = bytearray(len(data))
        self._in[:len(data)] = data
        in_buf = _Buffer(_address(self._in), 0, 0)
        while in_buf.pos < len(data) and not self.ended:
            in_buf.size = min(len(data), in_buf.pos + self._step)
            before_in, before_out = in_buf.pos, self._out_buf.pos
            hint = self._check(self._lib.ZSTD_decompressStream(self._dctx, ctypes.byref(self._out_buf),
                                                              ctypes.byref(in_buf)))
            made = self._out_buf.pos - before_out
            if hint == 0:
                self.ended = True
                self.unused = bytes(self._in[in_buf.pos:len(data)])
            elif made == 0 and in_buf.pos == before_in and in_buf.size == len(data):
                raise IntegrityError(f"{self.what}: a delta frame expands beyond its {len(self._view)} bytes")
            if made > 2 * PIECE:
                self._step = max(1 << 10, self._step // 2)
            elif made < PIECE // 4:
                self._step = min(1 << 20, self._step * 2)
            for start in range(before_out, self._out_buf.pos, PIECE):
                yield self._view[start:min(start + PIECE, self._out_buf.pos)]

    def close(self) -> None:
        if self._dctx:
            self._lib.ZSTD_freeDCtx(self._dctx)
            self._dctx = None
        self._prefix = None

    def _check(self, code: int) -> int:
        if self._lib.ZSTD_isError(code):
            reason = self._lib.ZSTD_getErrorName(code).decode("ascii", "replace")
            if "too small" in reason.lower():
                reason = f"it expands beyond its {len(self._view)} bytes"
            raise IntegrityError(f"{self.what}: delta does not decode against its reference ({reason})")
        return code
