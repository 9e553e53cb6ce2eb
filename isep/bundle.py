"""Bundles: a directory (the store) of parts plus isep-bundle.json, written atomically and safely.

Every file is created with O_EXCL|O_NOFOLLOW relative to the directory's descriptor under a
temporary dot-name, then renamed; names come only from check_file_name, so nothing is written
outside the directory whatever the input says.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
from contextlib import contextmanager

from . import __version__
from .archive import load_json
from .errors import BadInput, EnvironmentFailure, UsageError, signals_deferred
from .names import check_file_name

BUNDLE_SCHEMA = "isep-bundle/1"
BUNDLE_MANIFEST = "isep-bundle.json"
ISULA_MANIFEST = "manifest"
LOCK_FILE = "isep-bundle.lock"
TEMP_PREFIX = ".isep-tmp-"
MANIFEST_CAP = 64 << 20
MAX_TRAILER = 65 << 20  # the tar reader accepts at most 64 MiB of zeros after the end-of-archive marker


def write_all(fh, data) -> None:
    """Write every byte to an unbuffered file: its write() may write less (a disk filling up) and
    only the next call reports the error."""
    view = memoryview(data)
    while len(view):
        written = fh.write(view)
        if written is None:  # a sink that reports nothing took it all
            return
        view = view[written:]


def os_error(exc: OSError, what: str) -> EnvironmentFailure:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    return EnvironmentFailure(f"{what}: {reason}")


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

    def create_temp(self, final_name: str, *, internal: bool = False):
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
            try:
                os.unlink(name, dir_fd=self.fd)
            except OSError:
                pass
            self.temps.discard(name)

    def prepare_file(self, final_name: str, data: bytes) -> str:
        """A complete temporary copy of a file, to be committed (renamed) later."""
        temp, fh = self.create_temp(final_name, internal=True)
        try:
            with fh:
                write_all(fh, data)
                os.fsync(fh.fileno())
        except OSError as exc:
            raise os_error(exc, f"cannot write {os.path.join(self.path, final_name)}") from None
        return temp

    def open_read(self, name: str):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            raise os_error(exc, f"cannot open {os.path.join(self.path, name)}") from None
        return os.fdopen(fd, "rb", buffering=0)

    def read_manifest(self) -> dict | None:
        raw = self.read_raw(BUNDLE_MANIFEST, MANIFEST_CAP + 1)
        return None if raw is None else parse_manifest(raw, os.path.join(self.path, BUNDLE_MANIFEST))

    def read_raw(self, name: str, limit: int) -> bytes | None:
        if not self.exists(name):
            return None
        with self.open_read(name) as fh:
            return fh.read(limit)

    @contextmanager
    def locked(self):
        """Serialises the read-merge-write of the bundle manifest between concurrent packs."""
        try:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=self.fd)
        except OSError as exc:
            raise os_error(exc, f"cannot lock {self.path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def parse_manifest(data: bytes, what: str) -> dict:
    if len(data) > MANIFEST_CAP:
        raise BadInput(f"{what}: larger than {MANIFEST_CAP >> 20} MiB")
    doc = load_json(data, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
        raise BadInput(f"{what}: not an isep bundle manifest")
    if doc["schema"] != BUNDLE_SCHEMA:
        raise BadInput(f"{what}: unknown schema {doc['schema']!r} (this isep reads {BUNDLE_SCHEMA})")
    parts = doc.get("parts")
    images = doc.get("images")
    if not isinstance(parts, list) or not isinstance(images, list):
        raise BadInput(f"{what}: parts and images must be lists")
    for part in parts:
        if not isinstance(part, dict):
            raise BadInput(f"{what}: a part entry is not an object")
        problem = check_file_name(part.get("file"), f"{what}: part")
        if problem:
            raise BadInput(problem)
        for key, kind in (("size", int), ("raw_size", int), ("sha256", str), ("members", list),
                          ("role", str), ("compression", str)):
            if not isinstance(part.get(key), kind):
                raise BadInput(f"{what}: part {part['file']} has no valid {key!r}")
        for rec in part["members"]:  # join and verify index these fields
            if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and type(rec.get("seq")) is int
                    and type(rec.get("size")) is int and isinstance(rec.get("type"), str)
                    and (rec["type"] not in ("symlink", "hardlink") or isinstance(rec.get("link"), str))):
                raise BadInput(f"{what}: part {part['file']} lists a member without name, seq, size or type")
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("parts"), list) \
                or not isinstance(image.get("diff_ids"), list):
            raise BadInput(f"{what}: an image entry lacks parts or diff_ids")
        config = image.get("config")
        if not (isinstance(config, dict) and isinstance(config.get("digest"), str)
                and isinstance(config.get("member"), str)):
            raise BadInput(f"{what}: an image entry has no valid config")
        lists = [image["parts"], image["diff_ids"], image.get("tags") or [], image.get("layer_paths") or []]
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists):
            raise BadInput(f"{what}: an image entry lists something other than strings")
        trailer = image.get("trailer_size", 1024)
        if type(trailer) is not int or not 1024 <= trailer <= MAX_TRAILER or trailer % 512:
            raise BadInput(f"{what}: an image entry has an invalid trailer_size")
    return doc


def encode_manifest(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()


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
    return doc


def find_part(doc: dict, file_name: str) -> dict | None:
    return next((p for p in doc["parts"] if p["file"] == file_name), None)


def part_for_layers(doc: dict, role: str, diff_ids: list[str]) -> dict | None:
    """A part of the given role carrying exactly this stack (for reuse and for joins by diffID)."""
    return next((p for p in doc["parts"] if p["role"] == role and p.get("diff_ids") == diff_ids), None)
