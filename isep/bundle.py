"""Bundles: a directory (the store) of parts plus isep-bundle.json, written atomically and safely,
and opened again to choose an image and the part files it needs.

Every file is created with O_EXCL|O_NOFOLLOW relative to the directory's descriptor under a
temporary dot-name, then renamed; names come only from check_file_name, so nothing is written
outside the directory whatever the input says. Reading: open_bundle (an isep store or an
isula-build directory), select_image, and isep_part_inputs / isula_part_inputs, which check that
the chosen parts carry every layer in an order the join can merge.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Sequence

from . import __version__
from .archive import JSON_CAP, load_json
from .errors import BadInput, EnvironmentFailure, IntegrityError, Misfit, UsageError, os_error
from .files import open_for_reading, write_all
from .jsondoc import encode_document
from .limits import MANIFEST_CAP
from .manifestcheck import BUNDLE_SCHEMA, DELTA_SCHEMA, check_manifest
from .names import (BUNDLE_MANIFEST, ISULA_MANIFEST, LOCK_FILE, SIGNATURE_FILE, check_file_name, display_name,
                    same_image_name)
from .parts import Opener, PartInput, part_opener
from .refs import Held
from .signals import signals_deferred
from .signing import MAX_SIGNATURE, verify_manifest
from .thin import covered_layers, uncovered_reason

TEMP_PREFIX = ".isep-tmp-"
ISULA_RECORD = "isula_manifest"  # isep-bundle.json's sha256 of the isula-build `manifest` isep wrote
LOCK_WAIT = 60.0  # seconds a pack waits for another pack's lock on the store (--wait)


class Store:
    """An output directory opened once; all file operations go through its descriptor."""

    def __init__(self, path: str, *, create: bool = True):
        self.path = path
        self.created = False
        if create:
            try:
                os.mkdir(path, 0o755)
                self.created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise os_error(exc, f"cannot create {path}") from None
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise os_error(exc, f"cannot open {path}") from None
        if stat.S_ISLNK(st.st_mode):
            raise EnvironmentFailure(f"refusing to use {path}: it is a symbolic link (name the real directory)")
        if not stat.S_ISDIR(st.st_mode):
            raise EnvironmentFailure(f"{path} is not a directory")
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise os_error(exc, f"cannot open {path}") from None
        self.temps: set[str] = set()

    def close(self) -> None:
        os.close(self.fd)

    def remove_if_created_empty(self) -> None:
        """After a failed first run: the directory this Store made goes again, if still empty."""
        if self.created:
            try:
                os.rmdir(self.path)
            except OSError:
                pass

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def create_temp(self, final_name: str, *, internal: bool = False) -> tuple[str, BinaryIO]:
        """A new temporary file for final_name, opened for binary writing."""
        problem = None if internal else check_file_name(final_name, "output file")
        if problem:
            raise UsageError(problem)
        name = f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final_name}"[:255]
        with signals_deferred():  # created and recorded (for discard_temps) as one step
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=self.fd)
            except OSError as exc:
                raise os_error(exc, f"cannot create a file in {self.path}") from None
            self.temps.add(name)
        return name, os.fdopen(fd, "wb", buffering=0)

    def commit(self, temp_name: str, final_name: str, *, replace: bool = False) -> None:
        """Rename a finished temporary file to its final name; never replaces a file unless asked."""
        if not replace and self.exists(final_name):
            raise EnvironmentFailure(f"refusing to overwrite {os.path.join(self.path, final_name)}")
        try:
            os.rename(temp_name, final_name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as exc:
            raise os_error(exc, f"cannot write {os.path.join(self.path, final_name)}") from None
        self.temps.discard(temp_name)

    def discard_temps(self) -> None:
        for name in list(self.temps):
            self.remove(name)

    def remove(self, name: str) -> None:
        """Remove a file this run made (a temporary one, or one it renamed a moment ago), if it can."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            pass
        self.temps.discard(name)

    def prepare_file(self, final_name: str, data: bytes | bytearray) -> str:
        """A complete temporary copy of a file, to be committed (renamed) later."""
        temp, fh = self.create_temp(final_name, internal=True)
        try:
            with fh:
                write_all(fh, data)
                os.fsync(fh.fileno())
        except OSError as exc:
            raise os_error(exc, f"cannot write {os.path.join(self.path, final_name)}") from None
        return temp

    def open_read(self, name: str) -> BinaryIO:
        """A file of the store, refused unless it is a regular file (a FIFO would block forever)."""
        return open_for_reading(name, os.path.join(self.path, name), dir_fd=self.fd)

    def read_manifest(self) -> dict | None:
        raw = self.read_raw(BUNDLE_MANIFEST, MANIFEST_CAP + 1)
        return None if raw is None else parse_manifest(raw, os.path.join(self.path, BUNDLE_MANIFEST))

    def read_raw(self, name: str, limit: int) -> bytes | None:
        if not self.exists(name):
            return None
        with self.open_read(name) as fh:
            return fh.read(limit)

    def holds_part(self, entry: dict) -> bool:
        """Whether a part the manifest lists is here as recorded (a stat: its size, not its sha256,
        which isep-verify checks); False when its file is gone, IntegrityError when it is not what
        the manifest recorded."""
        where = os.path.join(self.path, entry["file"])
        try:
            st = os.stat(entry["file"], dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise os_error(exc, f"cannot check {where}") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{where}: the store's manifest lists it as a part, but it is not a regular file")
        if st.st_size != entry["size"]:
            raise IntegrityError(f"{where}: {st.st_size} bytes, the store's manifest records {entry['size']}; "
                                 f"isep-verify {self.path} tells what else is damaged")
        return True

    @contextmanager
    def locked(self, wait: float = LOCK_WAIT, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Serialises the read-merge-write of the bundle manifest between concurrent packs. A lock
        held by another process is waited for up to WAIT seconds (ON_WAIT hears it once), then the
        store is reported busy (EnvironmentFailure)."""
        try:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o644, dir_fd=self.fd)
        except OSError as exc:
            raise os_error(exc, f"cannot lock {self.path}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise EnvironmentFailure(f"cannot lock {self.path}: {LOCK_FILE} is not a regular file")
            self._acquire(fd, wait, on_wait)
            yield
        finally:
            os.close(fd)

    def _acquire(self, fd: int, wait: float, on_wait: Callable[[str], None] | None) -> None:
        deadline = time.monotonic() + max(wait, 0)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            holder = lock_holder(fd)
            if time.monotonic() >= deadline:
                raise EnvironmentFailure(f"{self.path} is busy: its lock is held by {holder} (waited "
                                         f"{wait:g} s; see --wait)")
            if not told and on_wait is not None:
                on_wait(f"waiting for the lock on {self.path}, held by {holder} (up to {wait:g} s)")
                told = True
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))


def lock_holder(fd: int) -> str:
    """Who holds the flock on FD's file: "pid N" from /proc/locks (Linux), else "another process"."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            for line in fh:
                fields = line.split()  # 1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return "another process"


# Member record fields whose values repeat across members (kinds, digests of equal content): one
# string object each instead of one per member keeps join and verify under their peak (formats.md).
SHARED_MEMBER_FIELDS = frozenset(("type", "compression", "sha256", "xxh3", "diff_id", "media_type"))


def parse_manifest(data: bytes, what: str) -> dict:
    if len(data) > MANIFEST_CAP:
        raise BadInput(f"{what}: larger than {MANIFEST_CAP:,} bytes")
    doc = load_json(data, what, MANIFEST_CAP, shared_fields=SHARED_MEMBER_FIELDS)
    return check_manifest(doc, what)


def encode_manifest(doc: dict) -> bytearray:
    """isep-bundle.json as written (member records one per line); refused when join and verify
    would refuse to read it."""
    return encode_document(doc, MANIFEST_CAP, BUNDLE_MANIFEST)


def new_manifest() -> dict:
    return {"schema": BUNDLE_SCHEMA, "created_by": f"isep {__version__}", "parts": [], "images": []}


def merge_manifest(existing: dict | None, parts: list[dict], images: list[dict]) -> dict:
    """The store's manifest plus new parts and images; an image already present (same config and
    tags) is replaced by the new entry."""
    doc = existing or new_manifest()
    known = {p["file"]: p for p in doc["parts"]}
    for part in parts:
        known[part["file"]] = part
    doc["parts"] = list(known.values())
    keys = {(im["config"]["digest"], tuple(im["tags"])) for im in images}
    doc["images"] = [im for im in doc["images"]
                     if (im.get("config", {}).get("digest"), tuple(im.get("tags") or [])) not in keys] + images
    doc["created_by"] = f"isep {__version__}"
    if any(is_delta_part(p) for p in doc["parts"]):
        doc["schema"] = DELTA_SCHEMA
    return doc


def is_delta_part(entry: dict) -> bool:
    """A part whose members are, in part, deltas against or references to a store's parts."""
    return any(isinstance(rec, dict) and "from" in rec for rec in entry.get("members") or [])


def find_part(doc: dict, file_name: str) -> dict | None:
    return next((p for p in doc["parts"] if p["file"] == file_name), None)


def part_for_layers(doc: dict, role: str, diff_ids: list[str]) -> dict | None:
    """A part of the given role carrying exactly this stack (for reuse and for joins by diffID)."""
    return next((p for p in doc["parts"] if p["role"] == role and p.get("diff_ids") == diff_ids), None)


def encode_isula_manifest(entries: dict) -> bytes:
    """Go's json.Marshal of map[string]tarballInfo: keys sorted, fields in struct order, one line."""
    return json.dumps({k: entries[k] for k in sorted(entries)}, separators=(",", ":")).encode()


# --- opening a bundle to join or verify --------------------------------------------------------------

@dataclass
class Bundle:
    """A bundle to join from: an isep store (with isep-bundle.json) or an isula-build directory."""

    path: str
    kind: str                       # "isep" | "isula"
    doc: dict = field(default_factory=dict)    # isep-bundle.json (kind "isep")
    isula: dict = field(default_factory=dict)  # isula-build's manifest (kind "isula")
    files: dict[str, Opener] = field(default_factory=dict)  # received part files (a bundle stream)
    manifest_bytes: bytes = b""     # isep-bundle.json as stored, for signature checks
    signature: bytes | None = None  # isep-bundle.json.sig, when there is one

    def check_signature(self, allowed_signers: str) -> str:
        """The principal that signed this bundle's manifest; IntegrityError otherwise."""
        if self.kind != "isep":
            raise IntegrityError(f"{self.path}: an isula-build bundle carries no signature")
        return verify_manifest(self.manifest_bytes, self.signature, allowed_signers)

    def manifest_changed(self) -> None:
        """DOC was changed (a received bundle kept in part, or with rebuilt parts): its manifest is
        encoded again, and its signature no longer holds (a store's merged manifest is unsigned)."""
        self.manifest_bytes = bytes(encode_manifest(self.doc))
        self.signature = None


def open_bundle(path: str) -> Bundle:
    """The bundle in a directory: an isep store, else an isula-build bundle."""
    store = Store(path, create=False)
    try:
        opened = _open_isep(store)
        if opened is not None:
            return opened
        if store.exists(ISULA_MANIFEST):
            with store.open_read(ISULA_MANIFEST) as fh:
                isula = load_json(fh.read(JSON_CAP + 1), os.path.join(path, ISULA_MANIFEST))
            if not isinstance(isula, dict) or not isula:
                raise BadInput(f"{os.path.join(path, ISULA_MANIFEST)}: not an isula-build manifest")
            return Bundle(path, "isula", isula=isula)
    finally:
        store.close()
    raise UsageError(f"{path} holds neither {BUNDLE_MANIFEST} nor isula-build's {ISULA_MANIFEST}")


def open_local_store(path: str) -> Bundle | None:
    """The isep store a bundle stream is joined against (`isep-join STORE -`); None when the
    directory is missing or holds no isep-bundle.json yet (a device's first delivery)."""
    if not os.path.lexists(path):
        return None
    store = Store(path, create=False)  # a symlink or a file in its place is still refused
    try:
        return _open_isep(store)
    finally:
        store.close()


def _open_isep(store: Store) -> Bundle | None:
    raw = store.read_raw(BUNDLE_MANIFEST, MANIFEST_CAP + 1)
    if raw is None:
        return None
    doc = parse_manifest(raw, os.path.join(store.path, BUNDLE_MANIFEST))
    return Bundle(store.path, "isep", doc=doc, manifest_bytes=raw,
                  signature=store.read_raw(SIGNATURE_FILE, MAX_SIGNATURE + 1))


def select_image(images: list[dict], name: str | None, where: str) -> dict:
    """The image to join: the only one, or the newest entry with that name or config digest."""
    if name is None:
        if len(images) == 1:
            return images[0]
        listing = ", ".join(n for im in images for n in (im.get("tags") or [])[:1]) or "untagged images"
        raise UsageError(f"{where} holds {len(images)} images ({listing}); name one")
    hits = [im for im in images if any(same_image_name(t, name) for t in (im.get("tags") or []))]
    if not hits and name.startswith("sha256:"):
        hits = [im for im in images if im.get("config", {}).get("digest", "").startswith(name)]
    if not hits:
        listing = ", ".join(n for im in images for n in (im.get("tags") or [])) or "untagged images"
        raise UsageError(f"no image {name!r} in {where} (it holds: {listing})")
    return hits[-1]  # the newest entry for that name


def safe_join(directory: str, name: str) -> str:
    """directory/name for a part name read from a manifest, refused unless it is a plain file name."""
    problem = check_file_name(name, f"part name in {directory}")
    if problem:
        raise BadInput(problem)
    return os.path.join(directory, name)


def isep_part_inputs(bundle: Bundle, image: dict, overrides: dict[str, str],
                     extra: Sequence[Bundle] = (), have: list[Held] | None = None) -> list[PartInput]:
    """The parts an image needs: by file name, else (another release's store) by role and diffIDs.
    With `have` (a thin join), a base or lib part may be missing when the engine holds its layers."""
    docs = [bundle] + list(extra)
    out = []
    entries = []
    for order, file_name in enumerate(image["parts"]):
        found = _find_part(docs, image, order, file_name, thin=have is not None)
        if found is None:
            continue  # check_thin_coverage below names any layer neither a part nor the engine has
        b, entry = found
        entries.append(entry)
        role = entry["role"]
        path = overrides.get(role)
        if path:
            opener = part_opener(path, named_by_user=True)
        else:
            opener = b.files.get(entry["file"]) or part_opener(safe_join(b.path, entry["file"]))
        out.append(PartInput(label=path or entry["file"], opener=opener, entry=entry,
                             expected_sha256=entry["sha256"], expected_size=entry["size"], order=order))
    if have is None:
        check_coverage(image, entries)
    else:
        check_thin_coverage(image, entries, have)
    check_order(image, entries, whole=len(entries) == len(image["parts"]))
    return out


def _find_part(docs: list[Bundle], image: dict, order: int, file_name: str, *,
               thin: bool) -> tuple[Bundle, dict] | None:
    """The image's part at `order`: by file name, else by layers. None only in a thin join, for a
    base or lib part that is not at hand (the engine's layers may stand in for it)."""
    optional = thin and order < len(image["parts"]) - 1
    misfit = None
    for b in docs:
        entry = find_part(b.doc, file_name)
        if entry is not None and not _stack_fits(entry, image):
            misfit = misfit or (b, entry)  # another version of a floating tag's base under this name?
            continue
        if entry is not None:
            if optional and not _at_hand(b, entry):
                break  # listed in the manifest but deleted from the store to save room
            return b, entry
    if misfit is not None:
        # the version that fits; else the part of that name as it is (the join's checks of every
        # layer decide, as for any part)
        return _other_version(docs, image, misfit[1]) or misfit
    return _part_by_layers(docs, image, order == len(image["parts"]) - 1, file_name, required=not optional)


def _other_version(docs: list[Bundle], image: dict, named: dict) -> tuple[Bundle, dict] | None:
    """The part of NAMED's role whose stack is the longest bottom of the image's."""
    fits = [(b, e) for b in docs for e in b.doc["parts"]
            if e["role"] == named["role"] and isinstance(e.get("diff_ids"), list) and e["diff_ids"]
            and _stack_fits(e, image)]
    return max(fits, key=lambda hit: len(hit[1]["diff_ids"]), default=None)


def _stack_fits(entry: dict, image: dict) -> bool:
    """Whether a base or lib part found by name carries the bottom of the image's stack."""
    stack = entry.get("diff_ids")
    return entry["role"] == "app" or not isinstance(stack, list) or stack == image["diff_ids"][:len(stack)]


def _at_hand(bundle: Bundle, entry: dict) -> bool:
    return entry["file"] in bundle.files or os.path.isfile(safe_join(bundle.path, entry["file"]))


def _part_by_layers(docs: list[Bundle], image: dict, is_app: bool, file_name: str, *,
                    required: bool = True) -> tuple[Bundle, dict] | None:
    ids = image["diff_ids"]
    best = None
    for b in docs:
        for entry in b.doc["parts"]:
            stack = entry.get("diff_ids") or []
            if is_app or entry["role"] == "app" or stack != ids[:len(stack)]:
                continue
            if not required and not _at_hand(b, entry):
                continue
            if best is None or len(stack) > len(best[1].get("diff_ids") or []):
                best = (b, entry)
    if best is None and required:
        raise UsageError(f"part {file_name} of {display_name(image)} is not in the "
                         f"bundle, and no part there carries its layers")
    return best


def _carried(entries: list[dict]) -> set[str]:
    carried: set[str] = set()
    for entry in entries:
        carried.update(entry.get("layers") or [])
        carried.update(m.get("diff_id") or m.get("sha256") for m in entry["members"] if m.get("type") == "file")
    return carried


def check_coverage(image: dict, entries: list[dict]) -> None:
    """Every layer of the image is carried by one of its parts."""
    carried = _carried(entries)
    missing = [d for d in image["diff_ids"] if d not in carried]
    if missing:
        raise IntegrityError(f"layer {missing[0]} of the image is in none of its parts")


def check_thin_coverage(image: dict, entries: list[dict], have: list[Held]) -> None:
    """Every layer is carried by a part or, with its whole chain, held by the engine (--have); checked
    before the first byte is written, since Docker 28 registers the image name before it finds a layer
    file missing."""
    carried = _carried(entries)
    ids = image["diff_ids"]
    covered = covered_layers(ids, have)
    for i, diff_id in enumerate(ids[covered:], start=covered):
        if diff_id not in carried:
            raise Misfit(f"layer {i} ({diff_id}) of {display_name(image)} is in no part at hand and --have "
                         f"does not show its chain ({uncovered_reason(ids, i, have)})")


def check_order(image: dict, entries: list[dict], *, whole: bool = True) -> None:
    """Parts merge by stream position (seq): each lists its members in stream order, the parts of one
    save never list a position twice, and a byte-exact image's parts hold positions 0..N-1 exactly.
    A damaged seq would otherwise reorder the archive without any hash noticing."""
    by_save: dict = {}
    for entry in entries:
        seqs = [m["seq"] for m in entry["members"]]
        if any(b <= a for a, b in zip(seqs, seqs[1:])):
            raise IntegrityError(f"part {entry.get('file')}: its members are not in stream order")
        seen = by_save.setdefault(entry.get("save"), set())
        if seen & set(seqs):
            raise IntegrityError(f"part {entry.get('file')}: lists a stream position another part lists")
        seen.update(seqs)
    if whole and image.get("byte_exact") and len(by_save) == 1:  # its own parts, not another release's base
        everything = set().union(*by_save.values())
        if everything != set(range(len(everything))):
            raise IntegrityError("the parts of a byte-exact image do not hold one whole save")


def isula_part_inputs(bundle: Bundle, name: str | None, overrides: dict[str, str]) -> list[PartInput]:
    """isula-build's bundles: gzip legacy-layout tarballs checked against the manifest's sha256."""
    keys = list(bundle.isula)
    if name is None:
        # the tags of one image are keys with the same app tarball
        apps = {str(e.get("app")) if isinstance(e, dict) else k for k, e in bundle.isula.items()}
        if len(apps) != 1:
            raise UsageError(f"{bundle.path} holds {len(apps)} images ({', '.join(keys)}); name one")
        key = keys[0]
    else:
        hits = [k for k in keys if same_image_name(k, name)]
        if not hits:
            raise UsageError(f"no image {name!r} in {bundle.path} (it holds: {', '.join(keys)})")
        key = hits[0]
    entry = bundle.isula[key]
    if not isinstance(entry, dict):
        raise BadInput(f"{bundle.path}/manifest: entry {key!r} is not an object")
    out = []
    for order, (role, file_key, hash_key) in enumerate(
            (("base", "base", "baseHash"), ("lib", "lib", "libHash"), ("app", "app", "appHash"))):
        file_name = entry.get(file_key) or ""
        if not isinstance(file_name, str):
            raise BadInput(f"{bundle.path}/manifest: {file_key} of {key!r} is not a string")
        if not file_name and role != "lib":
            raise BadInput(f"{bundle.path}/manifest: {key!r} has no {role} tarball")
        if not file_name and role not in overrides:
            continue  # saved without a lib (isula-build itself cannot load these)
        if not isinstance(entry.get(hash_key) or "", str):
            raise BadInput(f"{bundle.path}/manifest: {hash_key} of {key!r} is not a string")
        path = overrides.get(role) or safe_join(bundle.path, file_name)
        out.append(PartInput(label=path, opener=part_opener(path, named_by_user=role in overrides), entry=None,
                             expected_sha256=entry.get(hash_key) or None, order=order))
    return out
