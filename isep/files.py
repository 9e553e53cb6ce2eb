"""How isep opens the files it reads and decides what it may write.

Reading: a file found inside a bundle directory (a part, isep-bundle.json, its signature, isula-build's
`manifest`) must be a regular file; a FIFO would block the reader forever and a device never ends.
Such files are opened without blocking and without following a final symbolic link, and checked
with fstat before a byte is read. A file the user names on the command line (an archive, a part given
with -a/-b/-l) may also be a pipe, as `<(docker save ...)` is.

Writing (`isep-join -o FILE`): output_file says where and how, as cp would: a new path or an existing
regular file is replaced atomically (a temporary file renamed over it); a character device or a FIFO
(/dev/null, /dev/stdout, a named pipe) is written in place, never replaced; a symbolic link is
followed to its target.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Callable, Protocol, cast

from .errors import EnvironmentFailure, UsageError, os_error

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"))


def file_kind(mode: int) -> str:
    """What a file is, in words, from its st_mode."""
    return next((word for test, word in _KINDS if test(mode)), "regular file")


def open_for_reading(path: str, what: str | None = None, *, dir_fd: int | None = None, follow: bool = False,
                     allow_pipe: bool = False) -> BinaryIO:
    """PATH opened for unbuffered binary reading, refused (EnvironmentFailure) unless it is a
    regular file, or a FIFO when ALLOW_PIPE. The open never blocks (O_NONBLOCK) and does not follow a
    final symbolic link unless FOLLOW; DIR_FD makes PATH relative to a directory descriptor. WHAT
    names the file in messages (default: PATH)."""
    what = what or path
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:  # O_NOFOLLOW met a symbolic link
            raise EnvironmentFailure(f"cannot open {what}: it is a symbolic link") from None
        raise EnvironmentFailure(f"cannot open {what}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (allow_pipe and stat.S_ISFIFO(mode))):
            raise EnvironmentFailure(f"refusing to read {what}: it is a {file_kind(mode)}, "
                                     f"not a regular file")
        # blocking again: a pipe named by the user is read like stdin
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=0)


def read_up_to(fh: BinaryIO, limit: int) -> bytes:
    """At most LIMIT bytes, reading on until the end (one read of a pipe returns what is there)."""
    chunks = []
    while limit > 0:
        chunk = fh.read(min(limit, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


@dataclass
class OutputFile:
    """Where `-o FILE` writes, and how."""

    path: str        # the file written: FILE, or the target of the symbolic link FILE
    in_place: bool   # a character device or FIFO: opened and written directly, never replaced
    mode: int        # the permission bits of a new or replaced regular file


def output_file(path: str) -> OutputFile:
    """How to write PATH: replace a new path or a regular file atomically (keeping an existing
    file's permissions, 0666 & ~umask for a new one), write into a character device or FIFO in place,
    follow a symbolic link to its target (refused when it dangles); refuse anything else."""
    try:
        st = os.stat(path)  # through links, /proc's included (/dev/stdout -> /proc/self/fd/1 -> pipe:[N])
    except FileNotFoundError:
        if os.path.islink(path):
            raise EnvironmentFailure(f"refusing to write {path}: a symbolic link to "
                                     f"{os.readlink(path)}, which does not exist") from None
        return OutputFile(path, False, 0o666 & ~_umask())
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {path}: {exc.strerror}") from None
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return OutputFile(path, True, 0)
    if stat.S_ISREG(st.st_mode):
        target = os.path.realpath(path) if os.path.islink(path) else path
        return OutputFile(target, False, stat.S_IMODE(st.st_mode) & 0o777)
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory; name the archive file to write")
    raise EnvironmentFailure(f"refusing to write {path}: it is a {file_kind(st.st_mode)}")


def open_in_place(out: OutputFile) -> BinaryIO:
    """A character device or FIFO opened for writing (a FIFO waits for its reader, as with cp)."""
    try:
        fd = os.open(out.path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {out.path}: {exc.strerror}") from None
    return os.fdopen(fd, "wb", buffering=0)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


SYNC_FILE_RANGE_WRITE = 2


def _find_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux/glibc: the final fsync writes everything
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _find_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range out now, without waiting: a part's fsync at the end
    then finds little left to write, instead of the whole part (best effort)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class Writable(Protocol):
    """An unbuffered binary file or pipe: write() may take fewer bytes than offered."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


def write_all(fh: Writable, data: bytes | bytearray | memoryview) -> None:
    """Write every byte to an unbuffered file: its write() may write less (a disk filling up) and
    only the next call reports the error."""
    view = memoryview(data)
    while len(view):
        written = fh.write(view)
        if written is None:  # a sink that reports nothing took it all
            return
        view = view[written:]


SINK_BATCH = 1 << 20


class FileSink:
    """A file being written under a temporary name, a part (parts.Sink) or a joined archive (-o):
    small writes gathered into 1 MiB ones, the kernel asked to start writing each out at once, synced
    on close; a failure is one line naming WHAT (a full disk said plainly)."""

    def __init__(self, raw: BinaryIO, temp_name: str, what: str):
        self.raw = raw
        self.temp_name = temp_name
        self.what = what
        self.buf = bytearray()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.buf and len(data) >= SINK_BATCH:  # a whole frame: written as it is, not copied
            self._write(data)
            return
        self.buf += data
        if len(self.buf) >= SINK_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self._write(self.buf)
            self.buf.clear()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            write_all(self.raw, data)
        except OSError as exc:
            raise os_error(exc, f"cannot write {self.what}") from None
        start_writeback(self.raw.fileno(), self.written, len(data))
        self.written += len(data)

    def close(self) -> None:
        self.flush()
        try:
            os.fsync(self.raw.fileno())
        except OSError as exc:
            raise os_error(exc, f"cannot write {self.what}") from None
        self.raw.close()
