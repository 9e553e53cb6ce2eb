"""isep-push: a bundle (and delta bundles leading to it) pushed as one release artifact."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from .artifact import Upload, artifact_blobs, artifact_manifest, leads_to
from .bundle import Bundle, open_bundle
from .errors import IntegrityError, UsageError, os_error
from .registry import RegistryClient, RegistryRef

Report = Callable[[Upload, str], None]  # hears each blob's outcome: present, mounted or uploaded


def open_release_bundle(path: str, what: str) -> Bundle:
    """An isep bundle directory to push (an isula-build bundle has no isep manifest to carry)."""
    bundle = open_bundle(path)
    if bundle.kind != "isep":
        raise UsageError(f"{what} {path} is an isula-build bundle; isep-push needs an isep bundle (isep-pack -o DIR)")
    return bundle


def require_tag(ref: RegistryRef) -> str:
    if ref.tag is None:
        raise UsageError(f"{ref}: push to a tag (oci://HOST/REPO:TAG), not to a digest")
    return ref.tag


def push_release(client: RegistryClient, ref: RegistryRef, bundle: Bundle, deltas: Sequence[Bundle],
                 mount_from: Sequence[str], report: Report) -> str:
    """Push every blob of the release, then its manifest: the tag moves only when the whole release
    is in the registry. Returns the manifest's digest."""
    tag = require_tag(ref)
    for delta in deltas:
        if not leads_to(delta.doc, bundle.doc):
            raise UsageError(f"--delta {delta.path}: none of its parts is a part of {bundle.path} "
                             f"(a delta bundle is isep-pack of the same save with --delta-from an earlier release)")
    config, layers = artifact_blobs(bundle, deltas)
    body = artifact_manifest(config.descriptor, [u.descriptor for u in layers])  # too big: refused before a byte
    for upload in layers:
        _check_local(upload)
    for upload in [*layers, config]:
        report(upload, _push(client, ref.repository, upload, mount_from))
    return client.put_manifest(ref.repository, tag, body)


def _check_local(upload: Upload) -> None:
    """A part file whose size differs from its manifest entry is refused before anything is pushed
    (the registry checks each upload's sha256)."""
    if upload.path is None:
        return
    try:
        size = os.stat(upload.path).st_size
    except OSError as exc:
        raise os_error(exc, f"cannot read {upload.path}") from None
    if size != upload.descriptor.size:
        raise IntegrityError(f"{upload.path}: {size} bytes, its bundle manifest records {upload.descriptor.size}")


def _push(client: RegistryClient, repository: str, upload: Upload, mount_from: Sequence[str]) -> str:
    d = upload.descriptor
    if upload.data is not None:
        return client.push_bytes(repository, d.digest, upload.data)
    assert upload.path is not None
    return client.push_blob(repository, d.digest, d.size, upload.path, mount_from=mount_from)
