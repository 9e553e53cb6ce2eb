"""Thin joins (--have): which bottom layers the device's engine already holds, and which members of
the parts an archive for it leaves out.

Engines key a layer by its chain (the layer and every layer below it): Docker's graph-driver stores
by chainID, containerd's snapshots likewise. Docker 20.10, 26 and 28 (containerd store) and
`ctr images import` read a layer file only when they lack that chain, so an archive whose manifest
lists every layer but leaves out the files of layers the engine has loads; podman refuses it.
"""
from __future__ import annotations

import posixpath

from .archive import follow_links, symlinks_in
from .refs import Held

LEGACY_LAYER_FILE = "layer.tar"
LEGACY_SIBLINGS = ("json", "VERSION")  # Docker's legacy per-layer directory: read only by pre-1.10 loads


def covered_layers(diff_ids: list[str], held: list[Held]) -> int:
    """How many of an image's bottom layers the engine already has: layer i counts only when some
    held image starts with the image's first i+1 diffIDs."""
    best = 0
    for h in held:
        n = 0
        for mine, theirs in zip(diff_ids, h.diff_ids):
            if mine != theirs:
                break
            n += 1
        best = max(best, n)
    return best


def uncovered_reason(diff_ids: list[str], position: int, held: list[Held]) -> str:
    """Why --have does not cover layer `position`: what the held image closest to it has there."""
    if not held:
        return "no --have image"
    closest = max(held, key=lambda h: covered_layers(diff_ids, [h]))
    if position < len(closest.diff_ids):
        return f"{closest.display} has {closest.diff_ids[position]} there"
    return f"{closest.display} holds only {len(closest.diff_ids)} layer(s)"


def left_out_members(records: list[dict], layer_paths: list[str], covered: int) -> set[str]:
    """Names of the members a thin archive leaves out: the files holding the bottom `covered` layers,
    the symlinks that lead to them, and (legacy layout) the rest of their `<v1id>/` directory; a
    member that an uncovered layer also needs (the same diffID higher up) stays. records: the member
    records of the parts at hand."""
    table = {rec["name"]: rec for rec in records}
    link_of = symlinks_in(table)
    kept_files = {follow_links(path, link_of) for path in layer_paths[covered:]}
    files = {follow_links(path, link_of) for path in layer_paths[:covered]} - kept_files
    files &= set(table)
    out = set(files)
    out.update(name for name, rec in table.items()
               if rec.get("type") == "symlink" and follow_links(name, link_of) in files)
    kept_dirs = {posixpath.dirname(p) for p in layer_paths[covered:]} | {posixpath.dirname(f) for f in kept_files}
    for name in list(out):
        folder, base = posixpath.split(name)
        if base != LEGACY_LAYER_FILE or not folder or folder in kept_dirs:
            continue
        out.update(n for n in (folder + "/", folder, *(f"{folder}/{s}" for s in LEGACY_SIBLINGS)) if n in table)
    return out
