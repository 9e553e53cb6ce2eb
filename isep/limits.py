"""How many members an archive may have, the JSON caps that follow from it, and the memory a delta
may be given, in one place.

Every document that lists an archive's members (the index, the plan, the bundle manifest) grows by
a few hundred bytes per member. Each is refused above its cap when read; each producer refuses to
write a document over the cap its consumer applies, so that a bundle pack calls complete is
always one that verify and join accept (docs/formats.md, "Limits").
"""
from __future__ import annotations

import re

from .errors import BadInput, UsageError

MAX_MEMBERS = 200_000        # members of one archive; also member records in one store's manifest
MEMBER_JSON = 512            # bytes a member may take in a document: ~300 with names of ~80 bytes
FIXED_JSON = 4 << 20         # images, configs and parts around the member lists
INDEX_CAP = FIXED_JSON + MAX_MEMBERS * MEMBER_JSON
PLAN_CAP = INDEX_CAP + MAX_MEMBERS * 64   # the index's records, plus each member's part and layer
MANIFEST_CAP = PLAN_CAP
DOCUMENT_CAP = max(INDEX_CAP, PLAN_CAP, MANIFEST_CAP)   # any of them given as a file (--base, --plan)
MAX_TRAILER = 65 << 20  # the tar reader accepts at most 64 MiB of zeros after the end-of-archive marker


def check_member_count(count: int, what: str) -> None:
    """Refuse an archive at its member MAX_MEMBERS + 1, before anything was written."""
    if count > MAX_MEMBERS:
        raise BadInput(f"{what}: over {MAX_MEMBERS:,} members, the most isep supports")


def check_document_size(size: int, cap: int, what: str) -> None:
    """A document this run would write that its reader would refuse."""
    if size > cap:
        raise BadInput(f"{what} would be {size:,} bytes, over the {cap:,}-byte limit its readers apply "
                       f"(at most {MAX_MEMBERS:,} members of at most {MEMBER_JSON} bytes on average)")


MIN_DELTA_MEMORY = 32 << 20  # two of delta.py's smallest segments (MIN_SEGMENT)
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_delta_memory(text: str, option: str = "--delta-memory") -> int:
    """A byte count: 1073741824, 512M, 1G, 1GiB; at least MIN_DELTA_MEMORY. Here rather than in
    delta.py so that commands check the option without importing the delta machinery."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{option} takes a size such as 512M or 2G (got {text!r})")
    value = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if value < MIN_DELTA_MEMORY:
        raise UsageError(f"{option} must be at least {MIN_DELTA_MEMORY >> 20} MiB")
    return value
