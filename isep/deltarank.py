"""Choosing the reference a layer's delta is made against: what is known of a layer before its
bytes are read, and how alike two layers are likely to be."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

HEX_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LayerInfo:
    """What is known about a layer before its bytes are read: from the save's index and config
    (target) or from a store's manifest (candidates)."""

    diff_id: str
    size: int
    repository: str = ""      # the image's repository, without tag
    position: int = -1        # index among the image's layers
    role: str = "app"
    created_by: str = ""      # the config history's step, when known
    name: str = ""            # the layer's path in its save
    newness: int = 0          # a candidate's part's place in its store's manifest: later is newer


def similarity(target: LayerInfo, candidate: LayerInfo) -> float:
    """Higher is more alike: same repository and position first, then the build step, size and
    name. Only an order: the delta's size is what decides."""
    score = 0.0
    if target.repository and target.repository == candidate.repository:
        score += 4
    if target.position >= 0 and target.position == candidate.position:
        score += 3
    if target.role == candidate.role:
        score += 1
    if target.created_by and candidate.created_by:
        score += 3 * difflib.SequenceMatcher(None, target.created_by, candidate.created_by).ratio()
    if target.size and candidate.size:
        score += 2 * min(target.size, candidate.size) / max(target.size, candidate.size)
    if _meaningful(target.name) and _meaningful(candidate.name):
        score += difflib.SequenceMatcher(None, target.name, candidate.name).ratio()
    return score


def _meaningful(name: str) -> bool:
    return bool(name) and not HEX_NAME.search(name)  # digest-named blobs say nothing of content


def rank_references(target: LayerInfo, candidates: Iterable[LayerInfo]) -> list[LayerInfo]:
    """Candidates best first; none of them is the target itself (that one is not shipped). Equally
    similar candidates: the newest release first (a store appends the parts each pack adds), as a
    floating tag's next version is closest to its last."""
    pool = {c.diff_id: c for c in candidates if c.diff_id != target.diff_id and c.size}
    return sorted(pool.values(), key=lambda c: (-similarity(target, c), -c.newness, c.diff_id))
