"""One exception hierarchy; the CLI maps each class to one exit code (see ExitStatus)."""
from __future__ import annotations

import signal
from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    INTERNAL = 1      # a bug in isep
    USAGE = 2         # bad options or arguments
    ENVIRONMENT = 3   # I/O, permissions, disk full, missing file, busy lock
    BAD_INPUT = 4     # malformed or unsupported input (not a tar, truncated, bad JSON)
    INTEGRITY = 5     # a digest, diffID, size or signature does not match
    MISFIT = 6        # the images do not fit the base/lib (not an ordered diffID prefix)
    INTERRUPTED = 130  # SIGINT
    BROKEN_PIPE = 141  # stdout's reader went away (128 + SIGPIPE), reported without a message
    TERMINATED = 143   # SIGTERM


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


class Misfit(IsepError):
    status = ExitStatus.MISFIT


class Interrupted(IsepError):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.status = ExitStatus.INTERRUPTED if signum == signal.SIGINT else ExitStatus.TERMINATED

