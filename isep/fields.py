"""Untrusted JSON documents read field by field: a refusal (BadInput) names the field's path."""
from __future__ import annotations

import re

from .errors import BadInput

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # matched whole (fullmatch): no trailing newline slips by


class Fields:
    """Typed access to one object of an untrusted JSON document (a plan, an index, a bundle manifest);
    every refusal names the field's path."""

    def __init__(self, doc: object, path: str, what: str):
        if not isinstance(doc, dict):
            raise BadInput(f"{what}: {path} is not an object")
        self.doc, self.path, self.what = doc, path, what

    def fail(self, key: str, problem: str):
        raise BadInput(f"{self.what}: {self.path}.{key} {problem}")

    def get(self, key: str, kind: type, *, optional: bool = False):
        value = self.doc.get(key)
        if value is None and optional:
            return None
        if type(value) is not kind:  # not isinstance: True is not a member number
            self.fail(key, f"is not {'an' if kind in (int, dict) else 'a'} {_KIND_NAMES[kind]}")
        return value

    def choice(self, key: str, options, problem: str) -> str:
        """A string among OPTIONS (any container of strings: an object of another type is no key)."""
        value = self.doc.get(key)
        if not isinstance(value, str) or value not in options:
            self.fail(key, problem)
        return str(value)

    def count(self, key: str, low: int = 0, high: int | None = None) -> int:
        value = self.get(key, int)
        if value < low or (high is not None and value > high):
            self.fail(key, f"is {value}, outside {low}..{high if high is not None else ''}")
        return value

    def strings(self, key: str, *, pattern: re.Pattern | None = None, optional: bool = False) -> list[str]:
        values = self.get(key, list, optional=optional) or []
        for n, value in enumerate(values):
            if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
                self.fail(f"{key}[{n}]", "is not a sha256 digest" if pattern is DIGEST else "is not a string")
        return values

    def numbers(self, key: str, count: int, *, optional: bool = False) -> list[int]:
        """Member numbers: ints in 0..count-1, ascending and each once (the order join merges in)."""
        values = self.get(key, list, optional=optional) or []
        last = -1
        for n, value in enumerate(values):
            if type(value) is not int or not 0 <= value < count:
                self.fail(f"{key}[{n}]", f"is not a member number (0..{count - 1})")
            if value <= last:
                self.fail(f"{key}[{n}]", f"repeats or comes before member {last}")
            last = value
        return values


_KIND_NAMES = {int: "integer", str: "string", list: "list", dict: "object", bool: "boolean"}
