"""Shared by the atheris harnesses: the checkout on sys.path, instrumented imports of isep, and
the rule every harness enforces: the only exception isep may raise on any input is IsepError."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atheris  # noqa: E402

with atheris.instrument_imports(include=["isep"]):
    import isep.archive  # noqa: E402,F401
    import isep.bundle  # noqa: E402,F401
    import isep.join  # noqa: E402,F401
    import isep.parts  # noqa: E402,F401
    import isep.stream  # noqa: E402,F401
    import isep.tarstream  # noqa: E402,F401
    from isep.errors import IsepError  # noqa: E402


def main(test_one_input) -> None:
    sys.setrecursionlimit(1000)  # the interpreter's default: a deep input must not need more

    def guarded(data: bytes) -> None:
        try:
            test_one_input(data)
        except IsepError:
            pass  # a clean refusal: what hostile input should get

    atheris.Setup(sys.argv, guarded)
    atheris.Fuzz()
