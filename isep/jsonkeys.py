"""JSON as Go's encoding/json reads it. It matches an object's keys to a struct's fields without
regard to case and keeps the last match, so two keys that differ only in case, or a field spelled
otherwise, make Docker or containerd read another value than Python's json does; it also reads a
lone UTF-16 surrogate escape as U+FFFD and refuses NaN and Infinity, which Python accepts."""
from __future__ import annotations

import re

from .errors import BadInput

LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                            r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def check_text(text: str, what: str) -> None:
    """Refuse escapes Go decodes to other characters than Python does."""
    if "\\u" in text:
        found = LONE_SURROGATE.search(text)
        if found:
            raise BadInput(f"{what}: JSON escape {found.group()!r} is a lone surrogate, which Go reads "
                           f"as U+FFFD")


def refuse_constant(what: str):
    def hook(name: str):
        raise BadInput(f"{what}: JSON constant {name}, which Go refuses")
    return hook


# Field names of the documents loaders decode into Go structs. encoding/json matches keys without
# regard to case (last one wins), so only these exact spellings may stand for them.
LOADER_FIELDS = ("Config", "RepoTags", "Layers", "Parent", "LayerSources", "config", "layers",
                 "manifests", "mediaType", "digest", "size", "annotations", "rootfs", "diff_ids", "os",
                 "architecture", "variant", "schemaVersion", "platform", "imageLayoutVersion", "urls")
FOLDED_FIELDS: dict[str, set] = {}
for _field in LOADER_FIELDS:
    FOLDED_FIELDS.setdefault(_field.casefold(), set()).add(_field)


def unique_keys(pairs: list, what: str, loader_fields: bool, shared_fields: frozenset[str] = frozenset(),
                memo: dict[str, str] | None = None) -> dict:
    """An object whose keys are distinct as Go compares them (case folded), and that spells every
    field a loader reads exactly: otherwise isep and the loader could read different values. The
    string values of shared_fields are taken from memo, so that a value repeated in many records
    (a member type, the digest of empty content) is held once."""
    seen: dict[str, str] = {}
    for key, _ in pairs:
        folded = key.casefold()
        if folded in seen:
            raise BadInput(f"{what}: JSON key {key!r} repeats {seen[folded]!r} (Go's decoder takes the "
                           f"last, matching keys without regard to case)")
        if loader_fields and folded in FOLDED_FIELDS and key not in FOLDED_FIELDS[folded]:
            raise BadInput(f"{what}: JSON key {key!r} is spelled unlike the field {sorted(FOLDED_FIELDS[folded])[0]!r} "
                           f"that Go's decoder reads it as")
        seen[folded] = key
    if shared_fields and memo is not None:
        return {key: memo.setdefault(value, value) if key in shared_fields and isinstance(value, str) else value
                for key, value in pairs}
    return dict(pairs)
