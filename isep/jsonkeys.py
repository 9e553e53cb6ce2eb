"""JSON object keys as Go's encoding/json reads them: it matches an object's keys to a struct's
fields without regard to case and keeps the last match, so two keys that differ only in case, or
a field spelled otherwise, make Docker or containerd read another value than Python's json does."""
from __future__ import annotations

from .errors import BadInput

# Field names of the documents loaders decode into Go structs. encoding/json matches keys without
# regard to case (last one wins), so only these exact spellings may stand for them.
LOADER_FIELDS = ("Config", "RepoTags", "Layers", "Parent", "LayerSources", "config", "layers",
                 "manifests", "mediaType", "digest", "size", "annotations", "rootfs", "diff_ids", "os",
                 "architecture", "variant", "schemaVersion", "platform", "imageLayoutVersion", "urls")
FOLDED_FIELDS: dict[str, set] = {}
for _field in LOADER_FIELDS:
    FOLDED_FIELDS.setdefault(_field.casefold(), set()).add(_field)


def unique_keys(pairs: list, what: str, loader_fields: bool) -> dict:
    """An object whose keys are distinct as Go compares them (case folded), and that spells every
    field a loader reads exactly: otherwise isep and the loader could read different values."""
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
    return dict(pairs)
