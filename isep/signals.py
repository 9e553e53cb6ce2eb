"""Signal deferral: SIGINT/SIGTERM raise Interrupted, except inside a signals_deferred block, where
the signal is held until the block ends (a temporary file is created and recorded for removal as one
step)."""
from __future__ import annotations

from contextlib import contextmanager
from types import FrameType
from typing import Iterator

from .errors import Interrupted

_deferring = 0
_pending: list[int] = []


def raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    """The SIGINT/SIGTERM handler the commands install: raises Interrupted, or holds the signal
    while a signals_deferred block runs."""
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Interrupted is raised only when the block is left. (Python runs signal handlers on the main
    thread, so this holds whichever thread the kernel delivered the signal to.)"""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)
