"""Where pack writes a bundle (OutputTarget): a store directory (DirTarget, here) or one tar stream
on stdout (isep.stream.StreamTarget)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import BinaryIO, Callable, Protocol, TypeVar

from .archive import JSON_CAP, load_json
from .bundle import (ISULA_RECORD, LOCK_WAIT, Store, encode_isula_manifest, encode_manifest, find_part,
                     merge_manifest)
from .errors import BadInput, EnvironmentFailure
from .files import FileSink
from .names import BUNDLE_MANIFEST, ISULA_MANIFEST, SIGNATURE_FILE
from .parts import Sink, drain
from .signing import sign_manifest


SectionT = TypeVar("SectionT", bound=Sink)


class OutputTarget(Protocol[SectionT]):
    """What pack writes through. Parts are opened by file name and written as they stream; the app
    section (one-shot packs) is opened before its name is known, read back, and named (or dropped)
    at the end; finish() writes the bundle manifest last and abort() leaves nothing behind."""

    @property
    def existing(self) -> dict | None:
        """The store's manifest, whose parts can be reused (None: nothing to reuse)."""

    @property
    def spool_dir(self) -> str | None:
        """Where a one-shot pack may spool a layer (None: the system's temporary directory)."""

    @property
    def reference_doc(self) -> dict | None:
        """The manifest of the store the receiver holds (--delta-from), whose part names a new
        version of a base or lib must not take (None: no such store)."""

    @property
    def spool_compression(self) -> str | None:
        """The compression parts are written to this target with when it is not the pack's own: a
        target that reads every part back to encode it again (--delta-from) takes them plain, "none"
        (None: the pack's)."""

    def open(self, file_name: str) -> Sink: ...

    def holds_part(self, entry: dict) -> bool: ...

    def open_section(self) -> SectionT: ...

    def reopen(self, out: SectionT) -> BinaryIO: ...

    def name(self, out: SectionT, file_name: str | None) -> None: ...

    def finish(self, parts: list[dict], images: list[dict], isula: bytes | None) -> dict: ...

    def abort(self) -> None: ...


class DirTarget:
    """Parts go to temporary names in the store and are renamed when all is done, manifest last."""

    def __init__(self, store: Store, sign_key: str | None = None, *, lock_wait: float = LOCK_WAIT,
                 warn: Callable[[str], None] | None = None):
        self.store = store
        self.sign_key = sign_key
        self.lock_wait = lock_wait
        self.warn = warn or (lambda message: None)
        self.existing = store.read_manifest()
        self.spool_dir: str | None = store.path
        self.reference_doc: dict | None = None
        self.spool_compression: str | None = None
        self._outs: list[tuple[FileSink, str | None]] = []

    def holds_part(self, entry: dict) -> bool:
        return self.store.holds_part(entry)

    def open(self, file_name: str) -> FileSink:
        temp, fh = self.store.create_temp(file_name)
        out = FileSink(fh, temp, f"{file_name} in {self.store.path}")
        self._outs.append((out, file_name))
        return out

    def open_section(self) -> FileSink:
        return self.open("app-section")

    def reopen(self, out: FileSink) -> BinaryIO:
        return self.store.open_read(out.temp_name)

    def name(self, out: FileSink, file_name: str | None) -> None:
        """Give a section its final name (None: drop it)."""
        if file_name is None:  # read back already: remove it now, not at the end (it was left behind)
            if not out.raw.closed:
                out.raw.close()
            self.store.remove(out.temp_name)
            self._outs = [(o, n) for o, n in self._outs if o is not out]
            return
        self._outs = [(o, file_name if o is out else n) for o, n in self._outs]

    def finish(self, parts: list[dict], images: list[dict], isula: bytes | None) -> dict:
        for out, _ in self._outs:
            if not out.raw.closed:
                out.close()
        final = {n: o.temp_name for o, n in self._outs if n is not None}
        committed: list[str] = []
        try:
            with self.store.locked(self.lock_wait, self.warn):
                return self._commit(parts, images, isula, final, committed)
        except BaseException:
            for name in committed:  # ours, renamed a moment ago: a bundle is complete or absent
                self.store.remove(name)
            raise

    def _commit(self, parts, images, isula, final, committed) -> dict:
        current = self.store.read_manifest()
        known = {p["file"]: p for p in (current or {}).get("parts", [])}
        adopted: dict[str, dict] = {}
        for part in parts:
            temp = final.pop(part["file"])
            old = known.get(part["file"])
            if old is not None and not self.store.holds_part(old):
                old = None  # listed, but its file is gone: ours takes its place
            if old is not None and old.get("sha256") == part["sha256"]:
                self.store.remove(temp)  # the store already holds this very part
                continue
            if old is not None and part["role"] != "app" and old.get("role") == part["role"] \
                    and old.get("diff_ids") == part["diff_ids"]:
                self.store.remove(temp)  # a concurrent pack of another save stored these layers first:
                adopted[part["file"]] = old  # reuse them, as a pack started a moment later would
                continue
            if old is not None:
                raise EnvironmentFailure(
                    f"{os.path.join(self.store.path, part['file'])} already holds a different part; "
                    f"pack into another directory or choose another name with --rename")
            self.store.commit(temp, part["file"])
            committed.append(part["file"])
        for temp in final.values():
            self.store.remove(temp)
        self._check_reused(current, parts, images)
        if adopted:
            parts = [adopted.get(p["file"], p) for p in parts]
            for image in images:
                if set(image["parts"]) & set(adopted):
                    image["byte_exact"] = False
            if isula is not None:
                isula = rehash_isula_manifest(isula, adopted)
        doc = merge_manifest(current, parts, images)
        isula = None if isula is None else self._isula_to_write(current, isula)
        if isula is not None:
            doc[ISULA_RECORD] = "sha256:" + hashlib.sha256(isula).hexdigest()
        elif self.store.exists(ISULA_MANIFEST) and doc.get(ISULA_RECORD) != self._isula_sha256():
            doc.pop(ISULA_RECORD, None)  # the `manifest` there now is not the one isep wrote
        # both manifests written in full first (a full disk fails here, changing nothing), then renamed
        isula_temp = None if isula is None else self.store.prepare_file(ISULA_MANIFEST, isula)
        data = encode_manifest(doc)
        sig_temp = None if self.sign_key is None else self.store.prepare_file(
            SIGNATURE_FILE, sign_manifest(data, self.sign_key))
        bundle_temp = self.store.prepare_file(BUNDLE_MANIFEST, data)
        if isula_temp is not None:
            self.store.commit(isula_temp, ISULA_MANIFEST, replace=True)
        if sig_temp is not None:  # the signature first: a crash between leaves a mismatch, which is refused
            self.store.commit(sig_temp, SIGNATURE_FILE, replace=True)
        self.store.commit(bundle_temp, BUNDLE_MANIFEST, replace=True)
        try:
            os.fsync(self.store.fd)
        except OSError:
            pass
        return doc

    def _check_reused(self, current: dict | None, parts: list[dict], images: list[dict]) -> None:
        """The store's parts this pack reuses are still there: an isep-prune may have removed them
        while it ran, and the image would name a part the store lacks."""
        ours = {p["file"] for p in parts}
        for name in {n for im in images for n in im["parts"]} - ours:
            if self.existing is None or find_part(self.existing, name) is None:
                continue  # not the store's (--parts app into a store without it): nothing was reused
            now = find_part(current or {"parts": []}, name)
            if now is None or not self.store.holds_part(now):
                raise EnvironmentFailure(f"{os.path.join(self.store.path, name)}, which this pack reuses, was "
                                         f"removed while it ran (isep-prune?); pack again")

    def _isula_to_write(self, current: dict | None, new: bytes) -> bytes | None:
        """isula-build's manifest to write: NEW, merged into the store's when isep wrote that one;
        None (with a warning) when the store holds a `manifest` isep did not write."""
        old = self._isula_entries(current)
        if old is None:
            self.warn(f"{os.path.join(self.store.path, ISULA_MANIFEST)} was not written by isep: left "
                      f"as it is, without isula-build's entries for this pack")
            return None
        return encode_isula_manifest({**old, **json.loads(new)})

    def _isula_entries(self, current: dict | None) -> dict | None:
        """The entries of the store's isula manifest ({} when there is none); None when the file
        there is not one isep wrote: its sha256 is not the one isep-bundle.json records, and (for
        stores packed before the record) it is not an isula manifest whose entries name its parts."""
        if not self.store.exists(ISULA_MANIFEST):
            return {}
        raw = self.store.read_raw(ISULA_MANIFEST, JSON_CAP + 1) or b""
        try:
            entries = load_json(raw, os.path.join(self.store.path, ISULA_MANIFEST))
        except BadInput:
            return None
        if not isinstance(entries, dict):
            return None
        recorded = (current or {}).get(ISULA_RECORD)
        if recorded is not None:
            return entries if recorded == "sha256:" + hashlib.sha256(raw).hexdigest() else None
        known = {p["file"] for p in (current or {}).get("parts", [])}
        ours = entries and all(isinstance(e, dict) and e.get("app") in known for e in entries.values())
        return entries if ours else None

    def _isula_sha256(self) -> str | None:
        raw = self.store.read_raw(ISULA_MANIFEST, JSON_CAP + 1)
        return None if raw is None else "sha256:" + hashlib.sha256(raw).hexdigest()

    def abort(self) -> None:
        drain()
        for out, _ in self._outs:
            try:
                out.raw.close()
            except OSError:
                pass
        self.store.discard_temps()
        self.store.remove_if_created_empty()


def rehash_isula_manifest(isula: bytes, parts: dict[str, dict]) -> bytes:
    """isula-build's manifest, its entries naming a part file of PARTS (file -> manifest entry) with
    that part's hash: a part adopted from the store, or one a DeltaTarget compressed as it shipped."""
    entries = json.loads(isula)
    for entry in entries.values():
        for role in ("base", "lib", "app"):
            part = parts.get(entry.get(role))
            if part is not None:
                entry[role + "Hash"] = part["sha256"][len("sha256:"):]
    return encode_isula_manifest(entries)
