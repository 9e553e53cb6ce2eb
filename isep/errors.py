"""One exception hierarchy; the CLI maps each class to one exit code (see ExitStatus)."""
from __future__ import annotations

import errno
import signal
from enum import IntEnum


class ExitStatus(IntEnum):
    """The exit status of every command. Each member's `meaning` is the one text that --help, the
    man pages and the README's table show (isep.cli.common and isep.cli.manpage generate them)."""

    meaning: str

    def __new__(cls, code: int, meaning: str) -> ExitStatus:
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    OK = 0, "success"
    INTERNAL = 1, "internal error (a bug; --debug shows the traceback)"
    USAGE = 2, ("usage error: bad options or arguments, an unknown REF, a name that is not in the input, "
                "a bad rename target")
    ENVIRONMENT = 3, ("environment: a file cannot be read or written, disk full, permissions, a busy lock, "
                      "the output directory is a symlink")
    BAD_INPUT = 4, "bad input: not a tar, truncated, malformed JSON, not an image archive, unsupported format"
    INTEGRITY = 5, "integrity: a size, sha256, diffID or signature does not match; isep-verify found a failed check"
    MISFIT = 6, "misfit: an image is not built on the base (or lib); the message names the layer position"
    INTERRUPTED = 130, "interrupted by SIGINT (temporary files removed)"
    BROKEN_PIPE = 141, "stdout was closed by its reader (as by head): no message (128 + SIGPIPE)"
    TERMINATED = 143, "terminated by SIGTERM (temporary files removed)"


class IsepError(Exception):
    """Base of every error isep reports to the user as one line."""

    status = ExitStatus.INTERNAL


class UsageError(IsepError):
    status = ExitStatus.USAGE


class EnvironmentFailure(IsepError):
    status = ExitStatus.ENVIRONMENT


class BadInput(IsepError):
    status = ExitStatus.BAD_INPUT


class Truncated(BadInput):
    pass


class IntegrityError(IsepError):
    status = ExitStatus.INTEGRITY


class BlobUnknown(IntegrityError):
    """A blob that a registry manifest names is missing from the registry (a GC removed it)."""


class Misfit(IsepError):
    status = ExitStatus.MISFIT


class Interrupted(IsepError):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.status = ExitStatus.INTERRUPTED if signum == signal.SIGINT else ExitStatus.TERMINATED


def os_error(exc: OSError, what: str) -> EnvironmentFailure:
    """An OSError as one line: what isep was doing and why it failed (a full disk said plainly)."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    return EnvironmentFailure(f"{what}: {reason}")
