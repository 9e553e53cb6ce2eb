"""A release pulled from a registry: its manifest, bundle manifest and signatures first, then only
the parts (or delta parts) the device's store lacks, resumably, as a received bundle that
isep-join joins and keeps like a bundle stream."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .artifact import Artifact, Descriptor, Fetch, check_listed, parse_artifact, plan_pull
from .bundle import DELTA_SCHEMA, LOCK_WAIT, Bundle, Store, encode_manifest, lock_holder, parse_manifest
from .errors import BadInput, EnvironmentFailure, IntegrityError, os_error
from .names import BUNDLE_MANIFEST
from .parts import part_opener
from .registry import RegistryClient, RegistryRef
from .verify import Report

PULL_PREFIX = ".isep-tmp-pull-"  # in the store: what an interrupted pull fetched, found again by a rerun
BLOB_DIR = ".isep-blobs"         # inside it, blobs by digest (never a part's file name: check_file_name)
PULL_LOCK = ".isep-pull.lock"    # inside it, flocked by the pull using it, for as long as it runs
PRUNED_PREFIX = ".isep-tmp-pruned-"  # a pull directory isep-prune took away, while it removes it
Warn = Callable[[str], None]


@dataclass
class Release:
    """A release artifact resolved once to its manifest digest, with its bundle manifests read."""

    ref: RegistryRef
    digest: str
    artifact: Artifact
    bundle: Bundle
    deltas: list[Bundle]


def open_release(client: RegistryClient, ref: RegistryRef, trust: Optional[str], warn: Warn) -> Release:
    """The release's manifest, bundle manifest and signature (checked with TRUST before anything
    else is fetched), and the delta bundles it carries (one the registry lost is left out, said)."""
    body, digest = client.get_manifest(ref.repository, ref.reference)
    artifact = parse_artifact(body, str(ref))
    bundle = _read_bundle(client, ref, artifact.config, artifact.signature, str(ref))
    check_listed(artifact, bundle.doc, str(ref))
    if trust is not None:
        bundle.check_signature(trust)
    deltas = []
    for d in artifact.delta_manifests:
        what = f"{ref} delta bundle {d.digest[7:19]}"
        if client.blob_size(ref.repository, d.digest) is None:
            warn(f"{what} is gone from the registry (garbage-collected?): parts it would spare are fetched whole")
            continue
        delta = _read_bundle(client, ref, d, artifact.delta_signatures.get(d.digest), what)
        check_listed(artifact, delta.doc, what, delta_of=d.digest)
        if trust is not None:
            delta.check_signature(trust)
        deltas.append(delta)
    return Release(ref, digest, artifact, bundle, deltas)


def _read_bundle(client: RegistryClient, ref: RegistryRef, manifest: Descriptor, signature: Optional[Descriptor],
                 what: str) -> Bundle:
    raw = client.fetch_bytes(ref.repository, manifest.digest, manifest.size)
    sig = None if signature is None else client.fetch_bytes(ref.repository, signature.digest, signature.size)
    doc = parse_manifest(raw, f"{what}: {BUNDLE_MANIFEST}")
    return Bundle(what, "isep", doc=doc, manifest_bytes=raw, signature=sig)


def plan_fetches(client: RegistryClient, release: Release, image: dict, store: Optional[Bundle],
                 warn: Warn, engine_holds: int = 0) -> list[Fetch]:
    """plan_pull, with each chosen delta part's presence checked first (HEAD): a delta bundle the
    registry lost a part of is dropped and the plan made again without it."""
    deltas = list(release.deltas)
    while True:
        plan = plan_pull(release.bundle.doc, image, [d.doc for d in deltas], store, engine_holds)
        lost = next((f for f in plan if f.delta
                     and client.blob_size(release.ref.repository, f.digest) is None), None)
        if lost is None:
            return plan
        warn(f"delta part {lost.entry['file']} ({lost.digest[7:19]}) is gone from the registry "
             f"(garbage-collected?): fetching the plain part instead")
        deltas = [d for d in deltas if not any(p["sha256"] == lost.digest for p in d.doc["parts"])]


@dataclass
class PullDirectory:
    """A pull directory of a store held by this run: its lock file flocked until close(), so that
    isep-prune (remove_idle_pull_directory) never removes it under the pull."""

    path: str
    lock_fd: int

    def close(self) -> None:
        os.close(self.lock_fd)


def pull_directory(store: Store, release_digest: str, wait: float = LOCK_WAIT) -> PullDirectory:
    """Where a pull into STORE fetches: a directory of the store named after the release, so that
    an interrupted pull resumes from what it left there; locked (another pull of the same release
    into the same store is waited for up to WAIT seconds, then refused: both would write its blobs)."""
    path = os.path.join(store.path, PULL_PREFIX + release_digest[7:23])
    lock_path = os.path.join(path, PULL_LOCK)
    deadline = time.monotonic() + max(wait, 0)
    while True:
        holder = "isep-prune"
        try:
            os.makedirs(os.path.join(path, BLOB_DIR), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            fd = None  # isep-prune took the directory away between the two: made again below
        except OSError as exc:
            raise os_error(exc, f"cannot make the pull directory {path}") from None
        if fd is not None:
            if _try_lock(fd) and _same_file(fd, lock_path):
                return PullDirectory(path, fd)
            holder = lock_holder(fd)
            os.close(fd)  # locked by another pull, or taken away by isep-prune meanwhile (then made again)
        if time.monotonic() >= deadline:
            raise EnvironmentFailure(f"{path} is busy: another isep-join of the same release into {store.path} "
                                     f"holds it ({holder})")
        time.sleep(0.2)


def remove_idle_pull_directory(store_path: str, name: str) -> bool:
    """Remove the pull directory NAME of the store at STORE_PATH (an interrupted pull's) unless a
    running pull holds its lock. It is renamed away while this holds the lock (made if missing), so
    a pull that opens or waits for that lock meanwhile finds it gone and makes a new directory.
    True: removed."""
    path = os.path.join(store_path, name)
    if not _is_directory(path):
        return False
    try:
        fd = os.open(os.path.join(path, PULL_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return False  # gone meanwhile, or not a pull directory isep made: left alone
    gone = os.path.join(store_path, PRUNED_PREFIX + name[len(PULL_PREFIX):])
    try:
        if not _try_lock(fd):
            return False
        try:
            os.rename(path, gone)
        except OSError as exc:
            raise os_error(exc, f"cannot remove {path}") from None
    finally:
        os.close(fd)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def pull_directory_in_use(path: str) -> bool:
    """Whether a running pull holds the pull directory at PATH (its lock taken and given back at once)."""
    try:
        fd = os.open(os.path.join(path, PULL_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not _try_lock(fd):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _is_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def fetch_parts(client: RegistryClient, repository: str, plan: list[Fetch],
                pull_dir: str) -> tuple[dict[str, str], int]:
    """Fetch the planned blobs into pull_dir (a complete one from an interrupted run is kept, a
    partial one resumed); every blob's size and sha256 are checked before it is used. Returns
    (part file name -> path, bytes transferred by this run)."""
    blob_dir = os.path.join(pull_dir, BLOB_DIR)
    os.makedirs(blob_dir, exist_ok=True)
    files, moved = {}, 0
    for fetch in plan:
        path = os.path.join(blob_dir, fetch.digest[7:])
        if not _kept_blob_is_whole(path, fetch):
            moved += client.fetch_blob(repository, fetch.digest, fetch.size, path)
        files[fetch.entry["file"]] = path
    return files, moved


def _kept_blob_is_whole(path: str, fetch: Fetch) -> bool:
    """Whether an earlier run's blob at PATH is FETCH's, sha256 and all (it was checked when it was
    fetched, but has lain in the store since: a changed one is removed and fetched again)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, f"cannot read {path}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == fetch.size and file_sha256(path) == fetch.digest:
        return True
    _remove(path)
    return False


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise os_error(exc, f"cannot read {path}") from None
    return "sha256:" + digest.hexdigest()


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, f"cannot remove {path}") from None


@dataclass
class Pulled:
    """What a pull fetched, as a received bundle (its part files where fetch_parts left them)."""

    received: Bundle
    files: dict[str, str]
    moved: int

    def settle(self) -> None:
        """After a successful join: the fetched blobs under their part file names, where keeping a
        received bundle (isep.stream.keep_received) and adopting rebuilt parts expect them."""
        for name, path in self.files.items():
            os.replace(path, os.path.join(self.received.path, name))


def pull_parts(client: RegistryClient, release: Release, image: dict, store: Optional[Bundle], pull_dir: str,
               warn: Warn, engine_holds: int = 0) -> Pulled:
    """The parts of IMAGE that STORE lacks (plan_fetches), fetched into pull_dir."""
    plan = plan_fetches(client, release, image, store, warn, engine_holds)
    files, moved = fetch_parts(client, release.ref.repository, plan, pull_dir)
    return Pulled(received_bundle(release, image, plan, files, pull_dir), files, moved)


def received_bundle(release: Release, image: dict, plan: list[Fetch], files: dict[str, str],
                    pull_dir: str) -> Bundle:
    """The fetched parts as a received bundle (as a bundle stream's): the release's own manifest
    and signature when every part was fetched plain, else a manifest listing what was fetched."""
    doc = release.bundle.doc
    whole = not any(f.delta for f in plan) and sorted(files) == sorted(p["file"] for p in doc["parts"])
    opened = {name: part_opener(path) for name, path in files.items()}
    if whole:
        return Bundle(pull_dir, "isep", doc=doc, manifest_bytes=release.bundle.manifest_bytes,
                      signature=release.bundle.signature, files=opened)
    made = {**doc, "parts": [f.entry for f in plan], "images": [image]}
    if any(f.delta for f in plan):
        made["schema"] = DELTA_SCHEMA
    return Bundle(pull_dir, "isep", doc=made, manifest_bytes=bytes(encode_manifest(made)), files=opened)


def remove_pull_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- isep-verify oci:// -----------------------------------------------------------------------------

def verify_release(client: RegistryClient, ref: RegistryRef, trust: Optional[str], deep: bool,
                   report: Report, temp_dir: str) -> None:
    """Check an artifact: its manifest, bundle manifests (and signatures with TRUST), every blob's
    presence and size; with DEEP every part's sha256 by fetching it into temp_dir, one at a time."""
    def lost(message: str) -> None:
        report.add("delta bundle", False, message)
    try:
        release = open_release(client, ref, None, lost)
    except (BadInput, IntegrityError) as exc:
        report.add("manifest", False, str(exc))
        return
    report.add("manifest", True, f"{ref} is {release.digest}: {len(release.artifact.parts)} part(s), "
                                 f"{len(release.deltas)} delta bundle(s)")
    if trust is not None:
        for bundle in [release.bundle, *release.deltas]:
            try:
                report.add("signature", True, f"{bundle.path}: signed by {bundle.check_signature(trust)}")
            except IntegrityError as exc:
                report.add("signature", False, str(exc))
    for d in release.artifact.parts.values():
        size = client.blob_size(ref.repository, d.digest)
        if report.add("blob", size == d.size, f"{d.title} ({d.digest}): "
                      + ("missing" if size is None else f"{size} bytes, {d.size} listed")) and deep:
            _fetch_and_drop(client, ref, d, report, temp_dir)


def _fetch_and_drop(client: RegistryClient, ref: RegistryRef, d: Descriptor, report: Report, temp_dir: str) -> None:
    path = os.path.join(temp_dir, d.digest[7:])
    try:
        client.fetch_blob(ref.repository, d.digest, d.size, path)
    except IntegrityError as exc:
        report.add("blob sha256", False, f"{d.title}: {exc}")
        return
    os.unlink(path)
    report.add("blob sha256", True, f"{d.title}: {d.size} bytes, sha256 matches")
