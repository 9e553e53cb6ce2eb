"""Dropping releases from a store (`isep-prune STORE --keep IMAGE... | --keep-last N`).

The images kept are those named and/or the last N added per repository (the store manifest keeps
images in the order packs added them). A part stays when a kept image's join needs it: its own parts
as the join resolves them (by name, else by layers), and for a delta part, the store parts carrying
the layers its deltas and references read, followed to the end. A part no image of the store names
(a base packed alone for later apps) is not a release's and stays. Under the store lock the new
manifest is written first (atomically, isula-build's `manifest` beside it); then the other part files
are unlinked. A crash in between leaves unlisted part files: isep-verify notes them as strays and the
next prune removes them. A signature no longer matches the pruned manifest: it is removed.

Pull directories (`.isep-tmp-pull-*`, what an interrupted `isep-join oci://` fetched, kept for a rerun
to resume) go too, unless a running pull holds one: each pull flocks its directory's lock file for as
long as it runs, and the prune removes a directory only while holding that lock itself (renamed away
first, so that a pull starting meanwhile makes a new one). A rerun of a removed pull fetches again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .archive import JSON_CAP, load_json
from .bundle import (BUNDLE_SCHEMA, DELTA_SCHEMA, ISULA_RECORD, LOCK_WAIT, Bundle, Store, encode_isula_manifest,
                     encode_manifest, find_part, isep_part_inputs, parse_manifest, select_image)
from .deltajoin import StoreLayers
from .errors import BadInput, IsepError, UsageError, os_error
from .limits import MANIFEST_CAP
from .names import BUNDLE_MANIFEST, ISULA_MANIFEST, SIGNATURE_FILE, looks_like_part_file, normalize, split_tag
from .pull import PRUNED_PREFIX, PULL_PREFIX, pull_directory_in_use, remove_idle_pull_directory


@dataclass
class PrunePlan:
    """What a prune keeps and removes; `doc` is the manifest to write (None: it stays as it is)."""

    store: str
    kept_images: list[dict]
    dropped_images: list[dict]
    removed_parts: list[str]          # listed in the manifest, needed by no kept image
    strays: list[str]                 # part files the manifest does not list (an interrupted prune's)
    pull_dirs: list[str] = field(default_factory=list)  # interrupted pulls' directories no pull holds
    doc: dict | None = None
    freed_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def removed(self) -> list[str]:
        return sorted(self.removed_parts + self.strays) + [name + "/" for name in self.pull_dirs]

    def to_json(self) -> dict:
        return {"store": self.store, "removed": self.removed, "freed_bytes": self.freed_bytes,
                "images_kept": [_label(im) for im in self.kept_images],
                "images_dropped": [_label(im) for im in self.dropped_images]}


def _label(image: dict) -> str:
    return (image.get("tags") or [image["config"]["digest"]])[0]


# --- what stays ------------------------------------------------------------------------------------

def kept_images(doc: dict, keep: Sequence[str], keep_last: int | None, where: str) -> list[dict]:
    """The image entries to keep, in manifest order: each --keep name's (the entry a join of that name
    uses) and the last KEEP_LAST entries of each repository."""
    images = doc["images"]
    chosen = {id(select_image(images, name, where)) for name in keep}
    if keep_last is not None:
        by_repo: dict[str, list[dict]] = {}
        for image in images:
            repos = {split_tag(normalize(t))[0] for t in image.get("tags") or []} or {""}
            for repo in repos:
                by_repo.setdefault(repo, []).append(image)
        for entries in by_repo.values():
            chosen.update(id(im) for im in entries[-keep_last:] if keep_last > 0)
    return [im for im in images if id(im) in chosen]


def image_parts(bundle: Bundle, image: dict, *, strict: bool) -> list[dict]:
    """The part entries a join of IMAGE reads (bundle.isep_part_inputs). Not STRICT (an image to be
    dropped, which may be damaged): the parts it names, when its join could not be resolved."""
    try:
        return [p.entry for p in isep_part_inputs(bundle, image, {}) if p.entry is not None]
    except IsepError:
        if strict:
            raise
        return [e for e in (find_part(bundle.doc, f) for f in image["parts"]) if e is not None]


def needed_parts(bundle: Bundle, images: list[dict], *, strict: bool = True) -> set[str]:
    """The part files the images' joins read, delta parts' store references followed to the end."""
    layers = StoreLayers([bundle])
    todo = [e for im in images for e in image_parts(bundle, im, strict=strict)]
    needed: set[str] = set()
    while todo:
        entry = todo.pop()
        if entry["file"] in needed:
            continue
        needed.add(entry["file"])
        for need in entry.get("needs") or []:
            hit = layers.find(need)  # where a join reads it: the first part carrying it plain
            carrier = hit[1] if hit is not None else find_part(bundle.doc, str(need.get("part")))
            if carrier is not None:
                todo.append(carrier)
    return needed


def plan_prune(store: Store, keep: Sequence[str], keep_last: int | None) -> PrunePlan:
    """Read the store's manifest and decide; nothing is changed."""
    if not keep and keep_last is None:
        raise UsageError("name what to keep: --keep IMAGE (repeatable) and/or --keep-last N")
    raw = store.read_raw(BUNDLE_MANIFEST, MANIFEST_CAP + 1)
    if raw is None:
        raise UsageError(f"{store.path} holds no {BUNDLE_MANIFEST}: not an isep store")
    doc = parse_manifest(raw, os.path.join(store.path, BUNDLE_MANIFEST))
    bundle = Bundle(store.path, "isep", doc=doc, manifest_bytes=raw)
    kept = kept_images(doc, keep, keep_last, store.path)
    dropped = [im for im in doc["images"] if not any(im is k for k in kept)]
    needed = needed_parts(bundle, kept)
    releases = needed_parts(bundle, doc["images"], strict=False)  # parts some image of the store reads
    removed = [p["file"] for p in doc["parts"] if p["file"] in releases and p["file"] not in needed]
    listed = {p["file"] for p in doc["parts"]}
    plan = PrunePlan(store.path, kept, dropped, removed, _stray_parts(store, listed), _idle_pull_dirs(store))
    plan.freed_bytes = sum(_size(store, name) for name in plan.removed_parts + plan.strays)
    plan.freed_bytes += sum(_tree_size(os.path.join(store.path, name)) for name in plan.pull_dirs)
    if dropped or removed:
        plan.doc = {**doc, "images": kept, "parts": [p for p in doc["parts"] if p["file"] not in removed]}
        plan.doc["schema"] = DELTA_SCHEMA if any("from" in rec for p in plan.doc["parts"]
                                                 for rec in p["members"]) else BUNDLE_SCHEMA
    return plan


def _stray_parts(store: Store, listed: set[str]) -> list[str]:
    try:
        names = os.listdir(store.fd)
    except OSError as exc:
        raise os_error(exc, f"cannot list {store.path}") from None
    return sorted(n for n in names if looks_like_part_file(n) and n not in listed and _is_file(store, n))


def _idle_pull_dirs(store: Store) -> list[str]:
    """Pull directories no running pull holds, and those a prune took away but did not finish removing."""
    try:
        names = os.listdir(store.fd)
    except OSError as exc:
        raise os_error(exc, f"cannot list {store.path}") from None
    return sorted(n for n in names if n.startswith(PRUNED_PREFIX) or (n.startswith(PULL_PREFIX)
                  and not pull_directory_in_use(os.path.join(store.path, n))))


def _tree_size(path: str) -> int:
    total = 0
    for top, _, names in os.walk(path):
        total += sum(_lsize(os.path.join(top, n)) for n in names)
    return total


def _lsize(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _is_file(store: Store, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=store.fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _size(store: Store, name: str) -> int:
    try:
        return os.stat(name, dir_fd=store.fd, follow_symlinks=False).st_size
    except OSError:
        return 0


# --- doing it ----------------------------------------------------------------------------------------

def prune(path: str, keep: Sequence[str], keep_last: int | None, *, dry_run: bool = False,
          wait: float = LOCK_WAIT, warn: Callable[[str], None] = lambda message: None) -> PrunePlan:
    """Plan, and unless DRY_RUN carry out, a prune of the store at PATH (under its lock)."""
    store = Store(path, create=False)
    try:
        if dry_run:
            return plan_prune(store, keep, keep_last)
        with store.locked(wait, warn):
            plan = plan_prune(store, keep, keep_last)
            if plan.doc is not None:
                _write_manifests(store, plan, warn)
            for name in plan.removed_parts + plan.strays:  # after the manifest: a crash leaves strays
                _unlink(store, name)
            _remove_pull_dirs(store, plan, warn)
            _sync(store)
        return plan
    finally:
        store.close()


def _remove_pull_dirs(store: Store, plan: PrunePlan, warn: Callable[[str], None]) -> None:
    """Each idle pull directory, its lock taken again: a pull that started since keeps its own."""
    for name in list(plan.pull_dirs):
        path = os.path.join(store.path, name)
        if name.startswith(PRUNED_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif not remove_idle_pull_directory(store.path, name):
            warn(f"{path} left: a pull is using it")
            plan.pull_dirs.remove(name)


def _write_manifests(store: Store, plan: PrunePlan, warn: Callable[[str], None]) -> None:
    """The pruned isep-bundle.json (and isula-build's manifest, if isep wrote it), each written in
    full then renamed; the stale signature goes first."""
    assert plan.doc is not None
    isula = _pruned_isula(store, plan, warn)
    if isula:
        plan.doc[ISULA_RECORD] = "sha256:" + hashlib.sha256(isula).hexdigest()
    elif isula is not None:
        plan.doc.pop(ISULA_RECORD, None)
    data = encode_manifest(plan.doc)
    bundle_temp = store.prepare_file(BUNDLE_MANIFEST, data)
    isula_temp = store.prepare_file(ISULA_MANIFEST, isula) if isula else None
    if store.exists(SIGNATURE_FILE):
        _unlink(store, SIGNATURE_FILE)
        warn(f"{os.path.join(store.path, SIGNATURE_FILE)} removed: it signed the manifest before the prune; "
             f"the next isep-pack --sign into the store signs it again")
    if isula_temp is not None:
        store.commit(isula_temp, ISULA_MANIFEST, replace=True)
    elif isula == b"":
        _unlink(store, ISULA_MANIFEST)  # every entry named a dropped image
    store.commit(bundle_temp, BUNDLE_MANIFEST, replace=True)
    _sync(store)


def _pruned_isula(store: Store, plan: PrunePlan, warn: Callable[[str], None]) -> bytes | None:
    """isula-build's manifest without the entries of dropped images or removed parts: b"" when none
    is left, None when there is no `manifest` or isep did not write it (then it is left alone)."""
    assert plan.doc is not None
    raw = store.read_raw(ISULA_MANIFEST, JSON_CAP + 1)
    if raw is None:
        return None
    where = os.path.join(store.path, ISULA_MANIFEST)
    if plan.doc.get(ISULA_RECORD) != "sha256:" + hashlib.sha256(raw).hexdigest():
        warn(f"{where} was not written by isep: left as it is (its entries may name removed parts)")
        return None
    try:
        entries = load_json(raw, where)
    except BadInput:
        entries = None
    if not isinstance(entries, dict):
        warn(f"{where} is not an isula-build manifest: left as it is")
        return None
    gone = set(plan.removed_parts)
    tags = {t for im in plan.kept_images for t in im.get("tags") or []}
    kept = {tag: e for tag, e in entries.items()
            if tag in tags and isinstance(e, dict) and not {e.get(r) for r in ("app", "lib", "base")} & gone}
    return encode_isula_manifest(kept) if kept else b""


def _unlink(store: Store, name: str) -> None:
    try:
        os.unlink(name, dir_fd=store.fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, f"cannot remove {os.path.join(store.path, name)}") from None


def _sync(store: Store) -> None:
    try:
        os.fsync(store.fd)
    except OSError:
        pass

